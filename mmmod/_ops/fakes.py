"""Fake (meta) implementations of the mmmod ops: output shapes and dtypes only, and the
metadata checks an op makes before anything is written (torch.compile, ``opcheck``)."""
from __future__ import annotations

import torch

from ..reference import combine, moments

#: elements per chunk of the CUDA kernels' bucket table (MMMOD_CUDA_CHUNK in csrc/cuda/cuda_api.h);
#: the fake of bucket_table sizes its output with it
CUDA_CHUNK = 1 << 16


def table_words(ntensors: int, nchunks: int) -> int:
    """int64 words of a bucket table (csrc/cuda/cuda_api.h: 2-word header, 5 per tensor, 2 per chunk)."""
    return 2 + 5 * ntensors + 2 * nchunks


def _scores_fake(logits, labels):
    return labels.new_empty((len(logits),), dtype=torch.float32)


def _coefficients_fake(scores, rule, alpha, beta_max):
    torch._check(scores.dim() == 1, lambda: "scores must be 1-D")
    return scores.new_empty(scores.shape, dtype=torch.float32)


def _modulate_fake(tensors, offsets, k, gate, noise, scaled, seed, step, modality):
    return None


def _modulate_capturable_fake(tensors, offsets, k, gate, noise, scaled, seed, step, modality,
                              table=None, step_tensor=None):
    return None


def _modulate_sigma_fake(tensors, offsets, k, gate, sigma, seed, step, modality, table=None,
                         step_tensor=None):
    torch._check_type(sigma.dtype == torch.float32,
                      lambda: f"mmmod.modulate_sigma_: sigma must be float32, got {sigma.dtype}")
    torch._check_value(sigma.dim() == 1 and sigma.shape[0] == len(tensors),
                       lambda: f"mmmod.modulate_sigma_: sigma must have shape [{len(tensors)}] "
                               f"(one per tensor), got {tuple(sigma.shape)}")
    torch._check_value(not tensors or sigma.device == tensors[0].device,
                       lambda: f"mmmod.modulate_sigma_: sigma is on {sigma.device} but the "
                               f"tensors are on {tensors[0].device}")
    return None


def _bucket_table_fake(tensors, offsets):
    torch._check(len(tensors) == len(offsets), lambda: "one offset per tensor")
    torch._check(len(tensors) > 0, lambda: "no tensors")
    nchunks = sum((t.numel() + CUDA_CHUNK - 1) // CUDA_CHUNK for t in tensors)
    return tensors[0].new_empty((table_words(len(tensors), nchunks),), dtype=torch.int64)


def _bucket_std_fake(tensors):
    return torch.empty((len(tensors),), dtype=torch.float64,
                       device=tensors[0].device if tensors else "cpu")


def _bucket_moments_fake(tensors):
    moments.check_moments_inputs(tensors)
    return torch.empty((len(tensors), 3), dtype=torch.float64,
                       device=tensors[0].device if tensors else "cpu")


def _philox_normal_fake(out, seed, step, modality, offset):
    return None


def _proximal_fake(grads, params, snapshots, beta):
    return beta.new_empty((), dtype=torch.float64)


def _pair_moments_fake(fused, summed, fused_scale=None):
    combine.check_pair_inputs("mmmod._pair_moments", fused, summed, fused_scale)
    return torch.empty((len(summed), 3), dtype=torch.float64,
                       device=summed[0].device if summed else "cpu")


def _combine_fake(summed, fused, moments, groups, gamma, fused_scale=None):
    combine.check_pair_inputs("mmmod.combine_", fused, summed, fused_scale)
    if moments is not None:
        combine.check_moments("mmmod.combine_", summed, moments)
    combine.check_groups("mmmod.combine_", summed, groups)
    return summed[0].new_empty((len(groups), 2), dtype=torch.float64)


def _no_output(*args):
    return None


FAKES = {
    "scores": _scores_fake,
    "coefficients": _coefficients_fake,
    "modulate_": _modulate_fake,
    "modulate_.capturable": _modulate_capturable_fake,
    "modulate_sigma_": _modulate_sigma_fake,
    "bucket_table": _bucket_table_fake,
    "_bucket_std": _bucket_std_fake,
    "_bucket_moments": _bucket_moments_fake,
    "_philox_normal_": _philox_normal_fake,
    "proximal_": _proximal_fake,
    "_pair_moments": _pair_moments_fake,
    "combine_": _combine_fake,
    "fused_sgd_": _no_output,
    "fused_adam_": _no_output,
}
