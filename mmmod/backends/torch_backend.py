"""``backend="torch"``: the reference itself; works on every device, never fused."""
from __future__ import annotations


from .. import ops, reference
from .base import Backend


class TorchBackend(Backend):
    name = "torch"
    # the reference rules are the methods' own torch rules (mmmod.methods): nothing native
    native_rules = frozenset()

    def available(self):
        return True, ""

    def supports(self, device):
        return True

    def scores(self, logits, labels):
        return reference.scores(logits, labels)

    def coefficients(self, scores, rule, alpha, beta_max):
        return reference.coefficients(scores, rule, alpha, beta_max)

    def modulate_bucket_(self, tensors, offsets, k, gate, *, noise, noise_std, seed, step, modality):
        reference.modulate_bucket_(tensors, offsets, k, gate, noise=noise, noise_std=noise_std,
                                   seed=seed, step=step, modality=modality)

    def modulate_sigma_bucket_(self, tensors, offsets, k, gate, sigma, *, seed, step, modality):
        reference.modulate_sigma_bucket_(tensors, offsets, k, gate, sigma, seed=seed, step=step,
                                         modality=modality)

    def bucket_moments(self, tensors):
        return ops._bucket_moments_ref(list(tensors))
