"""Where recorded rows go: a CSV file, TensorBoard, or any callable.

A logger is any object with ``write(rows)`` (and optionally ``flush()``, ``close()`` and
``check()``, called by ``add_logger`` to refuse an unusable destination before any step);
:meth:`mmmod.monitor.Recorder.add_logger` calls ``write`` with the rows recorded since the last
flush, every ``every`` steps. Rows are dicts of plain Python values with the keys ``step``,
``epoch``, ``samples``, ``modulated``, ``skipped``, ``score/<modality>``,
``coeff/<modality>`` and the extra values (``<key>``, ``<key>/<modality>`` or ``<key>/<i>``).
Optional packages (tensorboard) are imported only when such a logger is made.
"""
from __future__ import annotations

import csv
import os
from typing import Any, Callable

NUMERIC_SKIP = ("step",)  # the x axis, not a curve


class CSVLogger:
    """Append rows to a CSV file; the header is the first row's keys.

    ``append=True`` continues an existing file whose header matches (resuming a run).
    Empty cells are values that were not given (e.g. ``epoch`` when nothing set it).

    The file is opened at the first write and stays open: close it with :meth:`close` (or
    ``opt.recorder.close()``, which closes every logger), or use the logger as a context
    manager (``with CSVLogger(path) as log: ...``). One never closed is closed when collected.
    """

    def __init__(self, path: str | os.PathLike, append: bool = False) -> None:
        self.path = os.fspath(path)
        self.append = bool(append)
        self._file = None
        self._writer: csv.DictWriter | None = None
        self.columns: list[str] | None = None

    def check(self) -> None:
        """Refuse a path the rows could not be written to (its nearest existing folder is not
        a writable folder, or the path is a folder), before any step writes a row."""
        path = os.path.abspath(self.path)
        if os.path.isdir(path):
            raise ValueError(f"CSVLogger: {self.path} is a folder, not a file path")
        if os.path.exists(path) and not os.access(path, os.W_OK):
            raise PermissionError(f"CSVLogger: {self.path} is not writable")
        parent = os.path.dirname(path)
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent):
            raise ValueError(f"CSVLogger: cannot create {self.path}: {parent} is a file, not a "
                             f"folder")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise PermissionError(f"CSVLogger: cannot create {self.path}: {parent} is not "
                                  f"writable")

    def _open(self, columns: list[str]) -> None:
        parent = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(parent, exist_ok=True)
        existing = None
        if self.append and os.path.exists(self.path) and os.path.getsize(self.path) > 0:
            with open(self.path, newline="") as f:
                existing = next(csv.reader(f), None)
            if existing != columns:
                raise ValueError(f"CSVLogger: {self.path} has columns {existing}, the rows have "
                                 f"{columns}; cannot append")
        self._file = open(self.path, "a" if existing else "w", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=columns)
        if not existing:
            self._writer.writeheader()
        self.columns = columns

    def write(self, rows: list[dict]) -> None:
        if not rows:
            return
        if self._writer is None:
            self._open(list(rows[0]))
        for r in rows:
            if list(r) != self.columns:
                raise ValueError(f"CSVLogger: row keys {list(r)} differ from the file's "
                                 f"columns {self.columns}")
        self._writer.writerows([{k: _cell(v) for k, v in r.items()} for r in rows])

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        """Close the file (rows written so far are kept; a later write reopens it, appending)."""
        if self._file is not None:
            self._file.close()
            self._file = None
            self._writer = None
            self.append = True  # a later write continues the file under the same header

    def __enter__(self) -> "CSVLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        f = getattr(self, "_file", None)
        if f is not None:
            f.close()

    def __repr__(self) -> str:
        return f"CSVLogger({self.path!r})"


def _cell(v):
    if v is None:
        return ""
    if isinstance(v, bool):
        return int(v)
    return v


class TensorBoardLogger:
    """Scalars per row: ``<prefix>/score/audio``, ``<prefix>/coeff/visual``, ``<prefix>/skipped``...

    Give a ``log_dir`` (a ``torch.utils.tensorboard.SummaryWriter`` is made and owned, closed by
    :meth:`close`) or an existing ``writer`` (anything with ``add_scalar(tag, value, step)``,
    e.g. the one a training script or Lightning's ``TensorBoardLogger.experiment`` already has;
    it is flushed but not closed). Needs the ``tensorboard`` package for ``log_dir``.
    """

    def __init__(self, log_dir: str | os.PathLike | None = None, *, writer: Any = None,
                 prefix: str = "mmmod") -> None:
        if (log_dir is None) == (writer is None):
            raise ValueError("TensorBoardLogger needs exactly one of log_dir and writer")
        if writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:  # torch's module raises this when tensorboard is missing
                raise ImportError("TensorBoardLogger(log_dir=...) needs the tensorboard package: "
                                  "pip install tensorboard") from e
            writer = SummaryWriter(log_dir=os.fspath(log_dir))
            self._owns = True
        else:
            if not callable(getattr(writer, "add_scalar", None)):
                raise TypeError(f"writer must have add_scalar(tag, value, step), got "
                                f"{type(writer).__name__}")
            self._owns = False
        self.writer = writer
        self.prefix = prefix.rstrip("/")

    def write(self, rows: list[dict]) -> None:
        for r in rows:
            step = r["step"]
            for key, v in r.items():
                if key in NUMERIC_SKIP or v is None:
                    continue
                self.writer.add_scalar(f"{self.prefix}/{key}", float(v), step)

    def flush(self) -> None:
        f = getattr(self.writer, "flush", None)
        if callable(f):
            f()

    def close(self) -> None:
        self.flush()
        if self._owns:
            self.writer.close()

    def __enter__(self) -> "TensorBoardLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TensorBoardLogger(prefix={self.prefix!r})"


class CallbackLogger:
    """``fn(rows)`` at every flush: wandb, Lightning, printing (``register_log_hook`` uses it).

    ``per_row=True`` calls ``fn(row)`` once per row instead, e.g. ``wandb.log`` style::

        CallbackLogger(lambda r: wandb.log(r, step=r["step"]), per_row=True)
    """

    def __init__(self, fn: Callable[[Any], Any], per_row: bool = False) -> None:
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        self.fn, self.per_row = fn, bool(per_row)

    def write(self, rows: list[dict]) -> None:
        if self.per_row:
            for r in rows:
                self.fn(r)
        else:
            self.fn(rows)

    def __repr__(self) -> str:
        return f"CallbackLogger({getattr(self.fn, '__qualname__', self.fn)!r})"

