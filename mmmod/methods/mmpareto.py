"""MMPareto (Wei & Hu, ICML 2024, "MMPareto: Boosting Multimodal Learning with Innocent
Unimodal Assistance"), as GeWu-Lab/MMPareto_ICML2024's ``code/MMPareto.py`` computes it.

Each encoder m has two objectives: the fused (multimodal) loss and its own unimodal loss. Per
step and modality, if the two gradients' cosine over the encoder is positive they are weighted
1/2 each, else by the two-vector min-norm (MGDA) weights; per tensor the combined gradient
``2 (w_mm g_mm + w_m g_m)`` is brought up to the norm of the summed gradient when that is larger,
and multiplied by ``gamma`` (``alpha``, default 1.5). Every other parameter keeps the summed
loss's gradient. Training calls ``opt.backward({"multimodal": L_mm, "audio": L_a, ...})``
(docs/multi_objective.md); the combine's math is ``mmmod.reference.combine`` (docs/semantics.md
section 11).
"""
from __future__ import annotations

import torch

from .. import backends
from .base import Method, register


class MMPareto(Method):
    name = "mmpareto"
    summary = ("MMPareto: per encoder, the fused and unimodal objectives' gradients combined "
               "by the sign rule / min-norm weights, rescaled to the summed gradient's norm")
    default_alpha = 1.5  # MMPareto.py line 178: gamma = 1.5
    default_filter = "all"  # every encoder tensor (MMPareto.py lines 74-84)
    hyperparameters = ("alpha",)
    scales = False  # the combine is the whole method: no scaling pass
    needs_scores = False  # no scores: step() needs no observe()
    combines_objectives = True
    # a tensor's norm and the modality's inner products are over whole tensors: on shards
    # (FSDP2) the per-shard moments are summed over the shard group before the weights
    shard_safe = True
    whole_tensor_stats = True

    def init_state(self, num_modalities, device=None):
        # the last step's (w_mm, w_m) per modality, for logging; 1/2 before the first step
        return {"weights": torch.full((num_modalities, 2), 0.5, dtype=torch.float64,
                                      device=device)}

    def coefficients(self, scores, *, alpha, beta_max, state):
        return torch.ones_like(scores, dtype=torch.float32)

    @torch.no_grad()
    def combine_(self, fused, summed, state, *, alpha, names, fused_scale=None, backend=None,
                 shards=None, kept=None):
        """``shards`` (a ``ShardPlan``, with ``kept``: each modality's entry indices of the
        given tensors) when some tensor is a shard: every modality's moments are summed over
        the shards (one collective per shard group) before any weight."""
        weights = state["weights"]
        if weights.shape[0] != len(summed):
            raise ValueError(f"MMPareto state holds {weights.shape[0]} modalities, the "
                             f"gradients {len(summed)}")
        for m, s in enumerate(summed):
            if not s:
                raise ValueError(f"modality {names[m]!r}: no tensor to combine")
        backend = backend or "auto"
        # the ops' two passes (mmmod/_ops: the backend's kernels), the weights computed on the
        # device between them: mmmod.reference.combine.mmpareto_combine_, in one combine_ call
        # per device covering every modality there (groups: each modality's number of
        # tensors). At encoder sizes a call's tensor lists and this method's own Python cost
        # as much as the arithmetic, so the usual case (one device, no shards) is one call and
        # no copy: the returned weights become the state's.
        dev = summed[0][0].device
        if shards is None and all(s[0].device == dev for s in summed) and weights.device == dev:
            state["weights"] = backends.kernel("combine_", backend, dev)(
                [t for row in summed for t in row], [t for row in fused for t in row], None,
                [len(row) for row in summed], float(alpha), fused_scale)
            return
        self._combine_per_device(fused, summed, state, alpha, fused_scale, backend, shards, kept)

    @staticmethod
    def _combine_per_device(fused, summed, state, alpha, fused_scale, backend, shards, kept):
        """The general case: modalities on several devices, or shards (on shards the moments
        are summed over the shard groups between the passes: _pair_moments first)."""
        weights = state["weights"]
        by_device: dict[torch.device, list[int]] = {}
        for m, s in enumerate(summed):
            by_device.setdefault(s[0].device, []).append(m)
        flat = {dev: ([t for m in ms for t in fused[m]], [t for m in ms for t in summed[m]])
                for dev, ms in by_device.items()}
        # the GradScaler's inverse scale where each device's kernels read it (a device copy)
        scale = {dev: fused_scale if fused_scale is None or fused_scale.device == dev
                 else fused_scale.to(dev, non_blocking=True) for dev in by_device}
        rows = dict.fromkeys(by_device)
        if shards is not None:
            per_modality = [None] * len(summed)
            for dev, ms in by_device.items():
                f, s = flat[dev]
                r = backends.kernel("_pair_moments", backend, dev)(f, s, scale[dev])
                for m, rm in zip(ms, r.split([len(summed[m]) for m in ms])):
                    per_modality[m] = rm
            per_modality = shards.sum_rows_over_shards(per_modality, kept)
            rows = {dev: torch.cat([per_modality[m] for m in ms]) for dev, ms in by_device.items()}
        for dev, ms in by_device.items():
            f, s = flat[dev]
            w = backends.kernel("combine_", backend, dev)(
                s, f, rows[dev], [len(summed[m]) for m in ms], float(alpha), scale[dev])
            for m, wm in zip(ms, w.to(weights.device).unbind()):
                weights[m].copy_(wm)

    def log_values(self, state):
        return {"w_mm": state["weights"][:, 0].float()}


register(MMPareto())
