"""Training-time imbalance signals per modality, computed on the device for the history.

``ModulatedOptimizer(..., signals=("accuracy", "grad_norm", "speed"))`` adds, per step and per
modality, columns to the recorded rows (the same per-modality extras path as a method's
``log_values``, so ``history()``, the loggers and ``mmmod plot`` carry them):

* ``acc/<modality>`` (``"accuracy"``): the fraction of the step's samples whose unimodal logits,
  as given to ``observe``, rank the true class first. One argmax + compare + sum per observe on
  logits already in memory.
* ``grad_norm/<modality>`` (``"grad_norm"``): the L2 norm of the gradient of every parameter
  the modality was given with (its module, parameters or slices -- not only the tensors the
  method's ``param_filter`` selects), read before the modulation: what the loss gave it.
  One ``_foreach_norm`` pass over those gradients per step.
* ``speed/<modality>`` (``"speed"``): ``||g||^2 / ||theta||^2`` over the same tensors, the
  learning-speed measure of the "greedy learner" line of work (Wu et al., ICML 2022: their
  conditional learning speed is the log-ratio of it between modalities). One
  ``_foreach_norm`` pass over the gradients and one over the parameters per step.

Nothing is read on the host. Under data parallelism the accuracy is the global batch's: one
all-gather of ``M + 1`` floats per step over the optimizer's group, summed in rank order as the
scores are; gradients and parameters are identical on every rank under DDP, so their norms need
nothing. Under FSDP2 each rank holds shards: the sums of squares of sharded tensors are added
over each shard group (one all-gather of ``2M`` floats per group and step).
"""
from __future__ import annotations

import sys
from typing import Any, Sequence

import torch

#: the signals that can be asked for, and the history column (prefix) each one fills
SIGNALS = {"accuracy": "acc", "grad_norm": "grad_norm", "speed": "speed"}


def check(signals: Any) -> tuple[str, ...]:
    """``signals`` as a tuple of known names in :data:`SIGNALS` order (a clear error else)."""
    if signals is None:
        return ()
    if isinstance(signals, str):
        signals = (signals,)
    try:
        given = list(signals)
    except TypeError:
        raise TypeError(f"signals must be a sequence of names from {tuple(SIGNALS)}, got "
                        f"{type(signals).__name__} {signals!r}") from None
    for s in given:
        if not isinstance(s, str):
            raise TypeError(f"signals must be names from {tuple(SIGNALS)}, got "
                            f"{type(s).__name__} {s!r}")
        if s not in SIGNALS:
            raise ValueError(f"unknown signal {s!r}; expected names from {tuple(SIGNALS)}")
    return tuple(s for s in SIGNALS if s in given)


def _sharded_groups(p: torch.Tensor) -> tuple:
    """The process groups over which a DTensor parameter is sharded (one per sharded mesh
    dim), ``()`` for an ordinary tensor or a replicated one."""
    dt = sys.modules.get("torch.distributed.tensor")
    if dt is None or not isinstance(p, getattr(dt, "DTensor", ())):
        return ()
    groups = []
    for dim, placement in enumerate(p.placements):
        if placement.is_shard():
            groups.append(p.device_mesh.get_group(dim))
    return tuple(groups)


class Signals:
    """The per-step signal state of one optimizer: accuracy counts summed over the observes
    of a step, and the gradient / parameter sums of squares read before the modulation.

    ``entries``: per modality, the entries (tensors or ``ParamSlice``) the modality was given
    with, every one of them (``selection.expand``, no filter).
    """

    def __init__(self, kinds: Sequence[str], names: Sequence[str], entries: Sequence[Sequence],
                 device: torch.device) -> None:
        from ..slices import ParamSlice
        self.kinds = tuple(kinds)
        self.names = list(names)
        self.device = device
        self.wants_norms = "grad_norm" in self.kinds or "speed" in self.kinds
        # entries bucketed by the shard groups their sums are added over; () = not sharded
        self._buckets: dict[tuple, list[tuple[int, Any]]] = {}
        seen: set[int] = set()
        for m, row in enumerate(entries):
            for e in row:
                if id(e) in seen:
                    continue
                seen.add(id(e))
                p = e.param if isinstance(e, ParamSlice) else e
                self._buckets.setdefault(_sharded_groups(p), []).append((m, e))
        # per bucket: the modality of each tensor, as a device index for one index_add
        self._index = {key: torch.tensor([m for m, _ in items], dtype=torch.int64, device=device)
                       for key, items in self._buckets.items()}
        self.reset()

    def reset(self) -> None:
        """Drop the gradient sums read for the current step (after ``step``)."""
        self._sq = None

    # ---- observe --------------------------------------------------------------------------
    @torch.no_grad()
    def hits(self, logits: Sequence[torch.Tensor], labels: torch.Tensor) -> torch.Tensor | None:
        """This batch's correct unimodal predictions per modality (float32 ``[M]`` on the
        device), or ``None`` when accuracy is not asked for. The optimizer keeps their sum with
        the pending scores (``mmmod.optim.state``), so ``zero_grad`` drops them together."""
        if "accuracy" not in self.kinds:
            return None
        if all(z.shape == logits[0].shape for z in logits):
            hits = (torch.stack(list(logits)).argmax(2) == labels).sum(1)
        else:
            hits = torch.stack([(z.argmax(1) == labels).sum() for z in logits])
        return hits.to(torch.float32)

    # ---- gradients (before the modulation) ------------------------------------------------
    @torch.no_grad()
    def read_gradients(self) -> None:
        """Per modality the sums of squares of the gradients (and, for ``speed``, of the
        parameters) of its tensors: ``[2, M]`` float32, kept until the step is recorded. A
        later call in the same step (a closure optimizer's re-evaluation) replaces it."""
        if not self.wants_norms:
            return
        from ..optim import selection as sel
        total = None
        for key, items in self._buckets.items():
            grads, params, idx = [], [], []
            for i, (m, e) in enumerate(items):
                g = sel.grad_of(e)
                if g is None:
                    continue
                grads.append(g)
                params.append(sel.local_param_of(e))
                idx.append(i)
            part = torch.zeros((2, len(self.names)), dtype=torch.float32, device=self.device)
            if grads:
                index = self._index[key] if len(idx) == len(items) else self._index[key][idx]
                gn = torch.stack(torch._foreach_norm(grads)).to(self.device, torch.float32)
                part[0].index_add_(0, index, gn.square())
                if "speed" in self.kinds:
                    pn = torch.stack(torch._foreach_norm(params)).to(self.device, torch.float32)
                    part[1].index_add_(0, index, pn.square())
            for group in key:  # FSDP2: add the other shards' sums, rank order
                part = _sum_over(part, group)
            total = part if total is None else total + part
        self._sq = total

    # ---- the step's values ----------------------------------------------------------------
    @torch.no_grad()
    def values(self, process_group, hits: torch.Tensor | None, count: int) -> dict[str, torch.Tensor]:
        """The history columns of this step, ``{prefix: tensor [M]}`` (global under data
        parallelism: one all-gather of the accuracy counts). ``hits``: the step's summed
        :meth:`hits`, ``count``: its samples (host metadata). Sync-free."""
        from ..optim import distributed
        out: dict[str, torch.Tensor] = {}
        m = len(self.names)
        if "accuracy" in self.kinds:
            if hits is None:
                hits = torch.zeros(m, dtype=torch.float32, device=self.device)
            both = torch.cat([hits, torch.full((1,), float(count), dtype=torch.float32,
                                               device=hits.device)])
            both = distributed.all_reduce_scores(both, process_group)
            out["acc"] = both[:m] / both[m]  # 0/0 = NaN where nothing was observed
        if self.wants_norms:
            sq = self._sq if self._sq is not None else torch.full(
                (2, m), float("nan"), dtype=torch.float32, device=self.device)
            if "grad_norm" in self.kinds:
                out["grad_norm"] = sq[0].sqrt()
            if "speed" in self.kinds:
                out["speed"] = sq[0] / sq[1]
        return out


def _sum_over(part: torch.Tensor, group) -> torch.Tensor:
    """``part`` summed over the ranks of ``group`` in rank order (one all-gather)."""
    from ..optim import distributed
    dev = distributed.collective_device(group)
    table = distributed.all_gather_rows(part.to(dev), group)
    total = table[0].clone()
    for r in range(1, table.shape[0]):
        total += table[r]
    return total.to(part.device)
