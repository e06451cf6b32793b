"""A sync-free, bounded record of what the modulation did at every step.

:class:`Recorder` keeps the last ``capacity`` steps in one float32 ring buffer on the scores'
device (grown in blocks until it first fills). :meth:`Recorder.record` is called once per
optimizer step and only launches a few small device copies into the row ``count % capacity``
(a Python int): it never reads a device value on the host. The host reads the buffer only
when asked -- :meth:`history`, or a logger's flush every ``every`` steps -- and then in one
transfer.

Each row holds, for M modalities::

    skipped | score[0:M] | coeff[0:M] | extra values (flattened, in the order first recorded)

written by one ``cat`` + one copy (+ one fill for the flag); ``skipped`` is -1 where the caller
left it to be derived (any coefficient not finite, the optimizer's rule), done at read time so
the step pays no extra kernels for it.

and, on the host (Python values, no device involved), the step index, epoch, number of samples
the scores were summed over and whether the step was inside the modulation window.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Mapping, Sequence

import torch

# row keys that are not per-modality values; extra keys may not reuse them
HOST_FIELDS = ("step", "epoch", "samples", "modulated")
# device rows allocated at the first record; the ring doubles up to its capacity as steps come
_FIRST_BLOCK = 1024
RESERVED = HOST_FIELDS + ("skipped", "score", "coeff")


class RemovableHandle:
    """Returned by :meth:`Recorder.add_logger`; ``remove()`` flushes and detaches the logger."""

    def __init__(self, recorder: "Recorder", sink: "_Sink") -> None:
        self._recorder, self._sink = recorder, sink

    def remove(self) -> None:
        self._recorder._remove(self._sink)


class _Sink:
    __slots__ = ("logger", "every", "delivered", "retry_at")

    def __init__(self, logger, every: int, delivered: int) -> None:
        self.logger, self.every, self.delivered = logger, every, delivered
        self.retry_at = 0  # after a failed write: the row count of the next try


class _Hook:
    """Adapts ``fn(rows)`` to the logger protocol (``write(rows)``)."""

    def __init__(self, fn: Callable[[list[dict]], Any]) -> None:
        self.fn = fn

    def write(self, rows: list[dict]) -> None:
        self.fn(rows)

    def __repr__(self) -> str:
        return f"hook({getattr(self.fn, '__qualname__', self.fn)!r})"


class Recorder:
    """Per-step scores, coefficients, skipped flag and extra state in a device ring buffer.

    Args:
        names: the modality names, in the optimizer's order.
        capacity: rows kept (the last ``capacity`` steps). ``0`` keeps none for
            :meth:`history`; a logger added with ``every=N`` grows the ring to at least ``N``
            rows, since its rows are read from the ring at flush time.
        device: where the ring lives; default: the device of the first recorded scores.

    Memory: at most ``capacity * (2M + 1 + extra values) * 4`` bytes on the device, allocated as
    steps come (1024 rows first, doubling up to ``capacity``), plus four Python values per
    recorded row on the host.
    """

    def __init__(self, names: Sequence[str], capacity: int = 1024, *,
                 device: torch.device | str | None = None) -> None:
        names = [str(n) for n in names]
        if not names:
            raise ValueError("Recorder needs at least one modality name")
        if len(set(names)) != len(names):
            raise ValueError(f"modality names must be unique, got {names}")
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
            raise ValueError(f"capacity must be an int >= 0, got {capacity!r}")
        self.names = names
        self.capacity = capacity
        self.device = None if device is None else torch.device(device)
        self.count = 0                      # rows recorded so far (the ring's write cursor)
        self._first = 0                     # oldest row number the ring still holds validly
        self._buf: torch.Tensor | None = None
        self._extra: list[tuple[str, tuple[int, ...], int, int]] | None = None
        self._host: dict[int, tuple] = {}  # slot -> host values, filled as steps come
        self._sinks: list[_Sink] = []

    # ---- layout ----------------------------------------------------------------------------
    @property
    def width(self) -> int:
        """Floats per row on the device."""
        m = len(self.names)
        return 2 * m + 1 + (0 if not self._extra else self._extra[-1][3] - (2 * m + 1))

    def _check(self, scores, coeffs, skipped, extra) -> list[tuple[str, tuple[int, ...], int, int]]:
        """Validate one step's values (metadata only) and return the extra layout they imply."""
        m = len(self.names)
        for what, t in (("scores", scores), ("coeffs", coeffs)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{what} must be a tensor, got {type(t).__name__}")
            if t.shape != (m,):
                raise ValueError(f"{what} must have shape ({m},) for modalities {self.names}, "
                                 f"got {tuple(t.shape)}")
            if t.dtype.is_complex:
                raise TypeError(f"{what} must be real, got {t.dtype}")
        device = self.device if self._buf is None else self._buf.device
        device = scores.device if device is None else device
        if scores.device != device or coeffs.device != device:
            raise ValueError(f"scores ({scores.device}) and coeffs ({coeffs.device}) must be on "
                             f"the recorder's device {device}")
        if isinstance(skipped, torch.Tensor):
            if skipped.numel() != 1 or skipped.dim() > 1:
                raise ValueError(f"skipped must be a 0-d tensor, got shape {tuple(skipped.shape)}")
            if skipped.device != device:
                raise ValueError(f"skipped is on {skipped.device}, expected {device}")
        elif skipped is not None and not isinstance(skipped, (bool, int)):
            raise TypeError(f"skipped must be a 0-d tensor, a bool or None, got "
                            f"{type(skipped).__name__}")
        layout, pos = [], 2 * m + 1
        for key, t in (extra or {}).items():
            if not isinstance(key, str) or not key or key in RESERVED or "/" in key:
                raise ValueError(f"extra key {key!r} must be a non-empty string without '/' "
                                 f"and not one of {RESERVED}")
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"extra[{key!r}] must be a tensor, got {type(t).__name__}")
            if t.dtype.is_complex:
                raise TypeError(f"extra[{key!r}] must be real, got {t.dtype}")
            if t.device != device:
                raise ValueError(f"extra[{key!r}] is on {t.device}, expected {device}")
            layout.append((key, tuple(t.shape), pos, pos + t.numel()))
            pos += t.numel()
        if self._extra is not None and layout != self._extra:
            raise ValueError(f"extra must keep the keys and shapes of the first recorded step "
                             f"{[(k, s) for k, s, _, _ in self._extra]}, got "
                             f"{[(k, s) for k, s, _, _ in layout]}")
        return layout

    # ---- the per-step path -------------------------------------------------------------------
    @torch.no_grad()
    def record(self, scores: torch.Tensor, coeffs: torch.Tensor,
               skipped: torch.Tensor | bool | None = None,
               extra: Mapping[str, torch.Tensor] | None = None, *, step: int | None = None,
               epoch: int | None = None, samples: int | None = None,
               modulated: bool | None = None) -> None:
        """Append one step. Sync-free: only device copies into a row (the ring grows in blocks until it first fills).

        ``skipped=None`` derives the flag as the optimizer does (any coefficient not finite).
        ``step`` defaults to the number of rows recorded before; ``samples`` (the number of
        samples the scores sum over) lets plots show the mean probability of the true class.
        Every argument is checked before anything is written.
        """
        layout = self._check(scores, coeffs, skipped, extra)
        if self.capacity == 0 and not self._sinks:
            self.count += 1  # nothing is kept: history is off and no logger needs the rows
            self._first = self.count
            return
        if self._buf is None:
            self._extra = layout
            # rows in blocks as steps come (history=N reserves nothing up front)
            self._buf = torch.zeros((min(self.capacity, _FIRST_BLOCK), self.width),
                                    dtype=torch.float32,
                                    device=scores.device if self.device is None else self.device)
        slot = self.count % self.capacity
        if slot >= self._buf.shape[0]:  # still filling: the ring has not wrapped yet
            self._grow(min(self.capacity, 2 * self._buf.shape[0]))
        row = self._buf[slot]
        # one cat + one copy whatever the number of extras (a few us of launches per step)
        parts = [scores, coeffs] + [extra[key].reshape(-1) for key, _, _, _ in layout]
        row[1:].copy_(torch.cat(parts))
        if skipped is None:
            row[0].fill_(-1.0)  # derived when read
        elif isinstance(skipped, torch.Tensor):
            row[0].copy_(skipped.reshape(()))
        else:
            row[0].fill_(float(bool(skipped)))
        self._host[slot] = (self.count if step is None else int(step),
                            None if epoch is None else int(epoch),
                            None if samples is None else int(samples),
                            None if modulated is None else bool(modulated))
        self.count += 1
        due = [s for s in self._sinks
               if self.count - s.delivered >= s.every and self.count >= s.retry_at]
        if due:
            self._deliver(due)

    # ---- reading ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.count - self._oldest()

    def _span(self, lo: int, hi: int) -> torch.Tensor:
        """Device rows lo..hi-1 (global row numbers, all still in the ring) in order."""
        a, b = lo % self.capacity, hi % self.capacity
        if hi - lo == 0:
            return self._buf[:0]
        if a < b or b == 0:
            return self._buf[a:b or self.capacity]
        return torch.cat((self._buf[a:], self._buf[:b]))

    def _oldest(self) -> int:
        return max(self._first, self.count - self.capacity)

    def history(self, format: str = "tensors"):
        """The kept steps, oldest first, in one host read.

        ``format="tensors"``: a dict of CPU tensors with N rows -- ``step``, ``epoch``,
        ``samples`` (int64, -1 where not given), ``modulated`` (bool; True where not given),
        ``skipped`` (bool), ``score`` and ``coeff`` ([N, M] float32, columns in
        :attr:`names` order) and each extra key ([N, *shape] float32).
        ``format="rows"``: a list of dicts of plain Python values, the rows loggers receive.
        """
        if format == "rows":
            return self._rows(self._oldest(), self.count)
        if format != "tensors":
            raise ValueError(f"format must be 'tensors' or 'rows', got {format!r}")
        m = len(self.names)
        lo, hi = self._oldest(), self.count
        if self._buf is None:
            block = torch.zeros((0, 2 * m + 1))
        else:
            block = self._span(lo, hi).cpu()  # the one host read
        host = [self._host[r % self.capacity] for r in range(lo, hi)]

        def col(i, fill):
            return [fill if h[i] is None else h[i] for h in host]
        out = {"step": torch.tensor(col(0, -1), dtype=torch.int64),
               "epoch": torch.tensor(col(1, -1), dtype=torch.int64),
               "samples": torch.tensor(col(2, -1), dtype=torch.int64),
               "modulated": torch.tensor(col(3, True), dtype=torch.bool),
               "skipped": torch.where(block[:, 0] < 0, ~torch.isfinite(block[:, m + 1:2 * m + 1]).all(1),
                                      block[:, 0] != 0),
               "score": block[:, 1:m + 1].clone(),
               "coeff": block[:, m + 1:2 * m + 1].clone()}
        for key, shape, a, b in self._extra or ():
            out[key] = block[:, a:b].reshape((block.shape[0],) + shape).clone()
        return out

    def _rows(self, lo: int, hi: int) -> list[dict]:
        if self._buf is None or hi <= lo:
            return []
        values = self._span(lo, hi).tolist()  # the one host read
        m = len(self.names)
        rows = []
        for r, v in zip(range(lo, hi), values):
            step, epoch, samples, modulated = self._host[r % self.capacity]
            row = {"step": step, "epoch": epoch, "samples": samples, "modulated": modulated,
                   "skipped": (bool(v[0]) if v[0] >= 0 else
                               not all(math.isfinite(x) for x in v[m + 1:2 * m + 1]))}
            for i, n in enumerate(self.names):
                row[f"score/{n}"] = v[1 + i]
            for i, n in enumerate(self.names):
                row[f"coeff/{n}"] = v[1 + m + i]
            for key, shape, a, b in self._extra or ():
                for label, x in zip(_labels(key, shape, self.names), v[a:b]):
                    row[label] = x
            rows.append(row)
        return rows

    # ---- loggers -----------------------------------------------------------------------------
    def add_logger(self, logger, every: int = 100) -> RemovableHandle:
        """Send rows to ``logger.write(rows)`` every ``every`` steps (one host read per flush).

        The logger gets the steps recorded from now on. ``flush()``/``close()`` of the logger are
        called by :meth:`flush`/:meth:`close` when it has them.
        """
        if not callable(getattr(logger, "write", None)):
            raise TypeError(f"logger must have a write(rows) method, got {type(logger).__name__}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an int >= 1, got {every!r}")
        check = getattr(logger, "check", None)
        if callable(check):
            check()  # e.g. CSVLogger: an unwritable path is refused here, not at a later step
        if every > self.capacity:
            self._resize(every)
        sink = _Sink(logger, every, self.count)
        self._sinks.append(sink)
        return RemovableHandle(self, sink)

    def register_log_hook(self, fn: Callable[[list[dict]], Any], every: int = 100) -> RemovableHandle:
        """Call ``fn(rows)`` every ``every`` steps with the new rows (dicts of plain values)."""
        if not callable(fn):
            raise TypeError(f"hook must be callable, got {type(fn).__name__}")
        return self.add_logger(_Hook(fn), every)

    @property
    def loggers(self) -> list:
        return [s.logger for s in self._sinks]

    def _deliver(self, sinks: list[_Sink], *, raise_errors: bool = False) -> None:
        """Write each sink's new rows. A logger that fails keeps its rows for the next delivery
        (while the ring holds them) and is warned about -- the step that recorded them is never
        broken by it -- or, with ``raise_errors`` (an explicit flush), the first error is raised
        after every other logger got its rows."""
        hi = self.count
        lo = max(min(s.delivered for s in sinks), hi - self.capacity)
        rows = self._rows(lo, hi)
        first_error = None
        for s in sinks:
            part = rows[max(s.delivered - lo, 0):]
            try:
                if part:
                    s.logger.write(part)
            except Exception as e:  # noqa: BLE001 (any logger error: reported, rows kept)
                s.retry_at = hi + s.every  # its next regular delivery
                if raise_errors:
                    first_error = first_error or e
                else:
                    warnings.warn(f"mmmod: logger {s.logger!r} failed to write {len(part)} rows "
                                  f"({type(e).__name__}: {e}); they are kept and retried at the "
                                  f"next delivery", RuntimeWarning, stacklevel=4)
                continue
            s.delivered = hi
        if first_error is not None:
            raise first_error

    def flush(self) -> None:
        """Deliver every logger's pending rows now (one host read) and flush the loggers."""
        pending = [s for s in self._sinks if s.delivered < self.count]
        if pending:
            self._deliver(pending, raise_errors=True)
        for s in self._sinks:
            f = getattr(s.logger, "flush", None)
            if callable(f):
                f()

    def close(self) -> None:
        """Flush, then close and detach every logger."""
        self.flush()
        for s in list(self._sinks):
            c = getattr(s.logger, "close", None)
            if callable(c):
                c()
        self._sinks.clear()

    def _remove(self, sink: _Sink) -> None:
        if sink in self._sinks:
            if sink.delivered < self.count:
                self._deliver([sink])
            self._sinks.remove(sink)

    def _resize(self, capacity: int) -> None:
        """Grow the ring, keeping the rows it holds at their global row number mod capacity."""
        lo, hi = self._oldest(), self.count
        host = [self._host[r % self.capacity] for r in range(lo, hi)] if self.capacity else []
        if self._buf is not None:
            kept = self._span(lo, hi)
            buf = torch.zeros((max(capacity if lo else min(capacity, _FIRST_BLOCK), hi),
                               self._buf.shape[1]), dtype=self._buf.dtype,
                              device=self._buf.device)
            if hi > lo:
                idx = torch.arange(lo, hi, dtype=torch.int64) % capacity
                buf.index_copy_(0, idx.to(buf.device), kept)
            self._buf = buf
        self._host = {}
        for r, h in zip(range(lo, hi), host):
            self._host[r % capacity] = h
        self.capacity = capacity
        self._first = lo  # the slots before lo in the grown ring hold nothing yet

    def _grow(self, rows: int) -> None:
        """More rows for a ring that has not wrapped yet (its rows sit at slots 0..count-1)."""
        buf = torch.zeros((rows, self._buf.shape[1]), dtype=self._buf.dtype,
                          device=self._buf.device)
        buf[:self._buf.shape[0]].copy_(self._buf)
        self._buf = buf

    def __repr__(self) -> str:
        return (f"Recorder(names={self.names}, capacity={self.capacity}, rows={len(self)}, "
                f"recorded={self.count}, loggers={self.loggers})")


def _labels(key: str, shape: tuple[int, ...], names: Sequence[str]) -> list[str]:
    """Row keys of an extra value: per modality for shape (M,), else by flat index."""
    n = math.prod(shape)
    if shape == ():
        return [key]
    if shape == (len(names),):
        return [f"{key}/{nm}" for nm in names]
    return [f"{key}/{i}" for i in range(n)]
