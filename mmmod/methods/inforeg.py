"""InfoReg (Huang et al., CVPR 2025, "Adaptive Unimodal Regulation for Balanced Multimodal
Information Acquisition"), as GeWu-Lab/InfoReg_CVPR2025's main.py computes it.

Each epoch the trace of every modality's Fisher information (mean over each weight tensor of
its squared gradients, summed over the epoch's steps and the tensors) is recorded. At the start
of an epoch the relative growth of the trace over the last ten epochs tells whether the
modality is still in its prime learning window (growth > 0.04). During the window, a step on
which modality m strictly leads the scores pulls m's parameters back towards where the epoch
started:

    g <- g + beta_m (theta - theta_epoch_start),  beta_m = alpha exp(tanh(s_m - max_{j != m} s_j))

and beta = 0 for every other modality. The coefficients are 1 (no scaling); the correction is
:meth:`InfoReg.correct_grads_`, called by the optimizer before the modulation. Memory: one
snapshot of the selected parameters (their dtype) and a few scalars per modality. Transcription
and deviations: docs/semantics.md, section "InfoReg".
"""
from __future__ import annotations

import torch

from .. import backends
from ..reference.proximal import proximal_  # noqa: F401  (the correction's definition)
from .base import Method, real_number, register

#: relative trace growth above which a modality is in its prime learning window (main.py)
WINDOW_THRESHOLD = 0.04
#: epochs averaged by the window detector (main.py: the last ten traces)
WINDOW_EPOCHS = 10


def snapshot_key(m: int, i: int) -> str:
    """State key of tensor i of modality m's epoch-start copy."""
    return f"snapshot.{m}.{i}"


class InfoReg(Method):
    name = "inforeg"
    summary = ("information regulation: proximal pull of the leading modality towards its "
               "epoch-start weights during its prime learning window")
    default_alpha = 0.95  # main.py's audio branch: beta = 0.95 exp(tanh(gap))
    default_filter = "all"  # main.py regulates every parameter of the encoder
    hyperparameters = ("alpha",)
    needs_params = True
    scales = False  # coefficients are 1: the proximal correction is the whole method
    corrects_grads = True
    # the Fisher trace is a mean over each whole tensor: on shards, per-shard float64 sums of
    # squares added across the shard group (ShardPlan.sum_over_shards), then / the tensor's size
    whole_tensor_stats = True

    def __init__(self, threshold: float = WINDOW_THRESHOLD, name: str | None = None):
        self.threshold = real_number("threshold", threshold)
        if name is not None:
            self.name = name

    def init_state(self, num_modalities, device=None):
        f64 = dict(dtype=torch.float64, device=device)
        return {"beta": torch.zeros(num_modalities, dtype=torch.float32, device=device),
                # epoch 0 is inside the window (main.py: k = 1 when epoch == 0)
                "window": torch.ones(num_modalities, dtype=torch.float32, device=device),
                "fisher": torch.zeros(num_modalities, **f64),
                "traces": torch.zeros(0, num_modalities, **f64)}

    @torch.no_grad()
    def coefficients(self, scores, *, alpha, beta_max, state):
        m = scores.shape[0]
        s = scores.float()
        if state["beta"].shape != s.shape:
            raise ValueError(f"InfoReg state holds {state['beta'].shape[0]} modalities but the "
                             f"scores have {m}")
        if m == 1:  # nobody to lead
            others_max = torch.full_like(s, float("inf"))
        else:
            others_max = torch.stack([torch.stack([s[j] for j in range(m) if j != i]).amax()
                                      for i in range(m)])
        gap = s - others_max  # > 0 only for a strict leader
        beta = alpha * torch.exp(torch.tanh(gap))
        on = (gap > 0) & (state["window"].to(s.device) > 0)
        beta = torch.where(on, beta, torch.zeros_like(beta))
        bad = torch.isnan(s).any()
        state["beta"].copy_(torch.where(bad, torch.zeros_like(beta), beta))
        return self.nan_if_any_nan(scores, torch.ones_like(s))

    @torch.no_grad()
    def correct_grads_(self, params, grads, state, backend=None, shards=None):
        """The proximal correction of every modality, one fused pass per modality and device.

        ``backend`` is the optimizer's backend name (``None``: ``"auto"``): its kernel of
        ``mmmod::proximal_`` for the tensors' device runs (``backends.kernel``; ``"torch"``
        the reference, mmmod/reference/proximal.py).

        ``shards`` (a ``mmmod.optim.sharding.ShardPlan``, given when some selected tensor is an
        FSDP2 shard): the correction is element-wise, so each rank corrects its shard as is; a
        sharded tensor's Fisher term, the mean of its whole gradient squared, is each shard's
        float64 sum of squares (from the fused per-tensor moments), added across the shard
        group in rank order (one all-gather per group per step), divided by the tensor's size."""
        self._ensure_snapshot(state, params)
        beta = state["beta"]
        backend = "auto" if backend is None else backend
        fisher_device = state["fisher"].device
        located = shards.shards if shards is not None else [[None] * len(g) for g in grads]
        partial = [[None] * len(g) for g in grads]  # sharded tensors' local sums of squares
        incs = []
        for m, (ps, gs) in enumerate(zip(params, grads)):
            snaps = [state[snapshot_key(m, i)] for i in range(len(ps))]
            # tensors without a gradient are left out; one call per device (in first-seen
            # order) and kind: whole tensors, whose Fisher term the op returns, and shards
            calls: dict = {}
            for i, g in enumerate(gs):
                if g is not None:
                    calls.setdefault((g.device, located[m][i] is not None), []).append(i)
            inc = torch.zeros((), dtype=torch.float64, device=fisher_device)
            for (device, sharded), idx in calls.items():
                run = backends.kernel("proximal_", backend, device)
                part = run([gs[i] for i in idx], [ps[i].detach() for i in idx],
                           [snaps[i] for i in idx], beta[m].to(device))
                if not sharded:
                    inc = inc + part.to(fisher_device)
                    continue
                # the op's return holds the shards' own means, not the trace's: each shard's
                # sum of squares from its (count, mean, M2), one fused statistics pass per
                # dtype (mmmod::_bucket_moments), M2 + n mean^2 in float64
                by_dtype: dict = {}
                for i in idx:
                    if gs[i].dim() >= 2:
                        by_dtype.setdefault(gs[i].dtype, []).append(i)
                for members in by_dtype.values():
                    rows = backends.kernel("_bucket_moments", backend, device)(
                        [gs[i] for i in members])
                    sums = rows[:, 2] + rows[:, 0] * rows[:, 1].square()
                    for j, i in enumerate(members):
                        partial[m][i] = sums[j]
            incs.append(inc)
        if shards is not None and shards.located:
            totals = shards.sum_over_shards(partial)  # every rank joins, with or without grads
            for m, row in enumerate(totals):
                for i, total in enumerate(row):
                    # the tensor's dims, not its local gradient's presence: every rank adds the
                    # same terms (a tensor without a gradient anywhere adds an exact 0)
                    if total is not None and params[m][i].dim() >= 2:
                        n = located[m][i].global_numel
                        incs[m] = incs[m] + (total / n).to(fisher_device)
        state["fisher"].add_(torch.stack(incs))

    def check_state(self, state, params, names):
        """Every snapshot a checkpoint holds must match its (local) parameter's shape and
        dtype, and every parameter must have one once any does."""
        keys = [snapshot_key(m, i) for m, ps in enumerate(params) for i in range(len(ps))]
        if not any(k in state for k in keys):
            return  # saved before the first step: the snapshot is taken then
        for m, ps in enumerate(params):
            for i, p in enumerate(ps):
                snap = state.get(snapshot_key(m, i))
                if snap is None or snap.shape != p.shape or snap.dtype != p.dtype:
                    got = "missing" if snap is None else f"{snap.dtype} {tuple(snap.shape)}"
                    raise ValueError(
                        f"state_dict's InfoReg snapshot of tensor {i} of modality "
                        f"{names[m]!r} is {got}, the parameter is {p.dtype} "
                        f"{tuple(p.shape)} (a checkpoint of another model, or of another "
                        f"sharding: InfoReg's snapshot holds this rank's shards)")

    def on_epoch(self, state, epoch, *, names, params=None, **inputs):
        if inputs:
            raise TypeError(f"method {self.name!r} takes no per-epoch inputs besides params, "
                            f"got {sorted(inputs)}")
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an integer >= 0, got {epoch!r}")
        if params is None:
            raise TypeError(f"method {self.name!r} snapshots the parameters at each epoch: "
                            f"on_epoch needs params=[[tensor, ...] per modality]")
        if len(params) != state["fisher"].shape[0]:
            raise ValueError(f"InfoReg got parameters of {len(params)} modalities, state holds "
                             f"{state['fisher'].shape[0]}")
        with torch.no_grad():
            if epoch > 0:  # the start of epoch e closes epoch e - 1: record its trace
                state["traces"] = torch.cat([state["traces"], state["fisher"][None]])
            state["fisher"].zero_()
            traces = state["traces"]
            if epoch == 0 or traces.shape[0] == 0:
                state["window"].fill_(1.0)
            else:
                # main.py: tr1 = sum(last 10)/10, tr2 = sum(the 10 before the last)/10, summed
                # in list order (an absent epoch counts as nothing; the divisor stays 10)
                tr1 = _ordered_sum(traces[-WINDOW_EPOCHS:], traces.shape[1]) / WINDOW_EPOCHS
                tr2 = _ordered_sum(traces[-WINDOW_EPOCHS - 1:-1], traces.shape[1]) / WINDOW_EPOCHS
                k = (tr1 - tr2) / tr1
                state["window"].copy_((k > self.threshold).float())
            self._take_snapshot(state, params)

    def _take_snapshot(self, state, params):
        for m, ps in enumerate(params):
            for i, p in enumerate(ps):
                key = snapshot_key(m, i)
                old = state.get(key)
                if old is not None and old.shape == p.shape and old.dtype == p.dtype \
                        and old.device == p.device:
                    old.copy_(p.detach())
                else:
                    state[key] = p.detach().clone()

    def _ensure_snapshot(self, state, params):
        # no set_epoch(0) before the first step: the first step is the start of epoch 0
        if any(snapshot_key(m, i) not in state for m, ps in enumerate(params)
               for i in range(len(ps))):
            self._take_snapshot(state, params)

    def log_values(self, state):
        return {"beta": state["beta"], "window": state["window"]}


def _ordered_sum(rows: torch.Tensor, width: int) -> torch.Tensor:
    """Sum of the rows in order, from 0 (as Python's sum over the trace list; empty: 0)."""
    total = torch.zeros(width, dtype=rows.dtype, device=rows.device)
    for row in rows:
        total = total + row
    return total


register(InfoReg())
