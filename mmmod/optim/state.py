"""The run state of a ``ModulatedOptimizer`` in one holder object, and the rule that decides
which observed scores ``zero_grad()`` drops.

Training frameworks hand users a proxy of the optimizer: Lightning's ``LightningOptimizer``
re-classes itself as a subclass of the wrapped optimizer and keeps its own ``__dict__``
(forwarding only missing attributes; older releases copied the wrapped ``__dict__``
shallowly), so a method called on the proxy runs with ``self`` the proxy and an attribute it
rebinds (``self.epoch = e``) lands on the proxy alone. Everything a public method writes after
construction therefore lives in one :class:`RunState`, reached through the class-level
properties :func:`shared` makes: the proxy reads the holder through its forwarding (or its
copied reference) and writes go to the one object the real optimizer reads.

Scores and gradients (:func:`grad_marks`): ``zero_grad()`` drops the pending scores whose
backward has already run, and keeps those observed after the last backward. A plain loop
(``zero_grad, forward, observe, backward, step``) and Lightning's closure order (``forward,
observe, zero_grad, backward, step``) both score exactly the batches whose gradients the step
applies, with accumulation too; the scores of a step that a ``GradScaler`` skipped (their
backward ran, no ``step()`` consumed them) are dropped by the next ``zero_grad()``. A backward
is seen, with no host sync, as a change of the gradient object or of its version counter on
the first selected tensor of each modality (in-place accumulation and ``zero_()`` bump it).

Checkpoints (mmmod/optim/checkpoint.py) serialise the run's position through
:meth:`RunState.to_dict` and restore it with :meth:`RunState.load_dict`.
"""
from __future__ import annotations

import weakref
from typing import Any

import torch

from ..slices import ParamSlice
from .config import SCALARS


class RunState:
    """What changes while training: position, method state, pending and last scores,
    counters, recorder.

    ``score_sum`` / ``observed`` / ``samples``: every pending (micro-)batch, ``aux_sum``: the
    sum of a per-batch tensor kept alongside the scores (the accuracy signal's hits, or None); ``fresh_*``: the
    part observed after the last detected backward, set only while an older part exists
    (``fresh_sum is None`` means all pending scores are fresh); ``mark``: the gradients'
    identity at the last ``observe()`` or ``zero_grad()``. ``method_state``: the method's
    tensors (``Method.init_state``), updated in place; ``step_t``: the capturable noise counter
    on the device (None unless ``capturable=True``).
    """

    def __init__(self) -> None:
        self.epoch, self.step_count = 0, 0
        self.epoch_hooked = None  # the last epoch whose on_epoch ran
        self.seed = 0
        self.alpha = self.beta_max = None
        self.modulation_starts, self.modulation_ends = 0, None
        self.score_sum, self.observed, self.samples = None, 0, 0
        self.fresh_sum, self.fresh_observed, self.fresh_samples = None, 0, 0
        self.aux_sum = self.fresh_aux = None
        self.mark = None
        self.scores = self.coeffs = self.skipped = None  # skipped: device counter
        self.method_state: dict[str, torch.Tensor] = {}
        self.step_t = None
        self.recorder = None
        self.grad_scales = None  # attach_grad_scales: where observe() writes the coefficients
        self.early = None  # (scores, coefficients) fixed in observe() for the grad scales

    def clear_pending(self) -> None:
        self.early = None
        self.score_sum, self.observed, self.samples = None, 0, 0
        self.fresh_sum, self.fresh_observed, self.fresh_samples = None, 0, 0
        self.aux_sum = self.fresh_aux = None

    def add_scores(self, s: torch.Tensor, samples: int, marks: tuple,
                   aux: torch.Tensor | None = None) -> None:
        """Add one observed (micro-)batch (and its ``aux`` tensor); the older pending part
        becomes 'backed' when its backward ran since the previous observe."""
        if self.observed and marks_changed(self.mark, marks):
            self.fresh_sum, self.fresh_observed, self.fresh_samples = s, 1, samples
            self.fresh_aux = aux
        elif self.fresh_sum is not None:
            self.fresh_sum = self.fresh_sum + s
            self.fresh_observed += 1
            self.fresh_samples += samples
            self.fresh_aux = _add(self.fresh_aux, aux)
        self.aux_sum = _add(self.aux_sum, aux)
        self.score_sum = s if self.score_sum is None else self.score_sum + s
        self.observed += 1
        self.samples += samples
        self.mark = marks

    def drop_backed(self, marks: tuple) -> None:
        """``zero_grad()``'s rule (module docstring), given the gradients' marks before zeroing."""
        if not self.observed:
            return
        if marks_changed(self.mark, marks):  # a backward ran after the last observe
            self.clear_pending()
        elif self.fresh_sum is not None:
            self.score_sum, self.observed, self.samples = (
                self.fresh_sum, self.fresh_observed, self.fresh_samples)
            self.aux_sum = self.fresh_aux
            self.fresh_sum, self.fresh_observed, self.fresh_samples = None, 0, 0
            self.fresh_aux = None

    def to_dict(self) -> dict[str, Any]:
        """The run's position as a checkpoint saves it: step count (the device counter under
        capture, the truth there since replays run no Python: reading it syncs once per
        checkpoint, never per step), seed, epoch, the scalar hyperparameters, and clones of the
        method state, skipped count and last scores and coefficients."""
        out = {"step_count": self.step_count if self.step_t is None else int(self.step_t),
               "seed": self.seed, "epoch": self.epoch}
        out.update({h: getattr(self, h) for h in SCALARS})
        out["method_state"] = {k: v.clone() for k, v in self.method_state.items()}
        for key, v in (("skipped_steps", self.skipped), ("scores", self.scores),
                       ("coefficients", self.coeffs)):
            out[key] = None if v is None else v.clone()
        return out

    def load_dict(self, values: dict[str, Any]) -> None:
        """Restore what :meth:`to_dict` saved (validated by the caller). The method state
        dict stays the same object (the method's entries replaced, grown ones included), each
        entry on the device of the entry it replaces; the epoch's per-epoch work counts as
        done (its results are in the restored method state)."""
        for k in ("step_count", "seed", "epoch") + SCALARS:
            setattr(self, k, values[k])
        self.epoch_hooked = values["epoch"]
        if self.step_t is not None:
            self.step_t.fill_(self.step_count)
        fresh = dict(self.method_state)
        self.method_state.clear()
        for k, v in values["method_state"].items():
            device = fresh[k].device if k in fresh else v.device
            self.method_state[k] = v.detach().to(device).clone()
        self.skipped, self.scores, self.coeffs = (values["skipped_steps"], values["scores"],
                                                  values["coefficients"])

    def portable(self) -> "RunState":
        """A shallow copy without the recorder (history and loggers belong to this run)."""
        new = RunState.__new__(RunState)
        new.__dict__.update(self.__dict__)
        new.recorder = None
        new.mark = None  # weak references: neither picklable nor meaningful in a copy
        return new


def _add(total: torch.Tensor | None, x: torch.Tensor | None) -> torch.Tensor | None:
    if x is None:
        return total
    return x if total is None else total + x


# instance attributes of ModulatedOptimizer pickled before the holder held them -> holder
# fields (None: dropped, the step no longer keeps it)
_LEGACY = {"epoch": "epoch", "step_count": "step_count", "seed": "seed", "alpha": "alpha",
           "beta_max": "beta_max", "modulation_starts": "modulation_starts",
           "modulation_ends": "modulation_ends", "_epoch_hooked": "epoch_hooked",
           "_score_sum": "score_sum", "_observed": "observed", "_samples": "samples",
           "_scores": "scores", "_coeffs": "coeffs", "_skipped": "skipped",
           "_fused_pending": None, "_recorder": "recorder",
           "_grad_scales": "grad_scales", "_early": "early",
           "_method_state": "method_state", "_step_t": "step_t"}


def upgrade(state: dict) -> dict:
    """A pickled instance state from before the holder (or before it held the method state
    and the device step counter): those attributes moved into it."""
    state = dict(state)
    run = state.get("_run")
    if run is None:
        run = RunState()
    run.__dict__.pop("fused_pending", None)
    for old, field in _LEGACY.items():
        if old in state:
            value = state.pop(old)
            if field is not None:
                setattr(run, field, value)
    state["_run"] = run
    return state


def shared(field: str) -> property:
    """A class-level property that reads and writes ``self._run.<field>``."""
    def get(self) -> Any:
        return getattr(self._run, field)

    def put(self, value: Any) -> None:
        setattr(self._run, field, value)
    return property(get, put, doc=f"Shared run state ``{field}`` (mmmod.optim.state).")


def _grad_mark(entry) -> tuple | None:
    p = entry.param if isinstance(entry, ParamSlice) else entry
    g = p.grad
    return None if g is None else (weakref.ref(g), g._version)


def grad_marks(params) -> tuple:
    """The identity (object, version) of the gradient of each modality's first selected
    tensor: host metadata only."""
    return tuple(_grad_mark(ps[0]) if ps else None for ps in params)


def marks_changed(before: tuple | None, now: tuple) -> bool:
    if before is None:
        return any(m is not None for m in now)
    for a, b in zip(before, now):
        if (a is None) != (b is None):
            return True
        if a is not None and (a[0]() is not b[0]() or a[1] != b[1]):
            return True
    return False
