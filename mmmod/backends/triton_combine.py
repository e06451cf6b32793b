"""Host launchers of MMPareto's combine kernels (kernels/combine_kernel.py) for the triton
backend: the kernels of ops ``_pair_moments`` and ``combine_`` (signatures of mmmod/_ops).

Per call and dtype group: one bucket table per operand list (cached while the storages stay),
then two launches for the moments (chunk partials, per-tensor fixed-order finish) and one for
the combine. Nothing reads a device value on the host: the factors and the scale stay device
tensors the kernels read. Empty tensors get a zero row and are never launched over; a
non-contiguous gradient is combined in a contiguous copy that is written back.
"""
from __future__ import annotations

import contextlib
import importlib

import torch

from ..reference.combine import (check_moments, check_pair_inputs, mmpareto_factors,
                                 mmpareto_weights, ordered_sum)

#: elements per chunk program, its warps, partials per step of the finishing reduction
BLOCK = 4096
WARPS = 8
BLOCK_P = 256
#: the bucket tables' noise chunks are unused here: one per tensor keeps the tables small
_NOISE_BLOCK = 1 << 30

_cache = None
_orig_tensors: dict = {}


def _modules():
    # mmmod.kernels is importable once the triton backend has loaded it (its _load_kernels,
    # which maps the checkout's kernels/ when mmmod is not installed)
    imp = importlib.import_module
    return (imp("mmmod.kernels.combine_kernel"), imp("mmmod.kernels.bucket"),
            imp("mmmod.kernels.utils"), imp("mmmod.kernels.launch").launch)


def _meta_cache(bucket):
    global _cache
    if _cache is None:
        _cache = bucket.MetaCache()
    return _cache


def _orig(rows, device):
    """int64 [T] device tensor of the op's row of each table tensor; depends on the bucket's
    layout only, so it is built once per device and pattern and reused."""
    key = (device, tuple(rows))
    hit = _orig_tensors.get(key)
    if hit is None:
        hit = torch.tensor(key[1], dtype=torch.int64, device=device)
        _orig_tensors[key] = hit
    return hit


def _groups(fused, summed):
    """dtype -> [(row, fused, contiguous summed, summed)] of the non-empty tensors."""
    out: dict = {}
    for i, (a, s) in enumerate(zip(fused, summed)):
        if s.numel() > 0:
            out.setdefault(s.dtype, []).append(
                (i, a.detach().contiguous(), s if s.is_contiguous() else s.contiguous(), s))
    return out


def _fields(bucket):
    return dict(META_FIELDS=bucket.META_FIELDS, F_NUMEL=bucket.F_NUMEL, F_SCHUNK=bucket.F_SCHUNK)


def _device_ctx(device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def pair_moments(fused, summed, fused_scale=None) -> torch.Tensor:
    check_pair_inputs("mmmod._pair_moments", fused, summed, fused_scale)
    device = summed[0].device if len(summed) else torch.device("cpu")
    out = torch.zeros((len(summed), 3), dtype=torch.float64, device=device)
    groups = _groups(fused, summed)
    if not groups:
        return out
    K, bucket, utils, launch = _modules()
    cache = _meta_cache(bucket)
    scale = fused_scale if fused_scale is not None else out  # unread when HAS_SCALE is False
    with _device_ctx(device):
        for dtype, items in groups.items():
            fs, ss = [x[1] for x in items], [x[2] for x in items]
            zeros = [0] * len(fs)
            fm = cache.get(fs, zeros, BLOCK, _NOISE_BLOCK)
            sm = cache.get(ss, zeros, BLOCK, _NOISE_BLOCK)
            partial = torch.empty(3 * sm.n_stats_chunks, dtype=torch.float64, device=device)
            launch(K._pair_moments_kernel, (sm.n_stats_chunks,), fm.meta, sm.meta, sm.stats_map,
                   scale, partial, HAS_SCALE=fused_scale is not None, BLOCK=BLOCK,
                   DT=utils.tl_dtype(dtype), F_PTR=bucket.F_PTR, num_warps=WARPS,
                   **_fields(bucket))
            launch(K._pair_moments_finish_kernel, (len(ss),), sm.meta, partial,
                   _orig([x[0] for x in items], device), out, BLOCK=BLOCK, BLOCK_P=BLOCK_P,
                   **_fields(bucket))
    return out


def combine_(summed, fused, moments, gamma, fused_scale=None) -> torch.Tensor:
    check_pair_inputs("mmmod.combine_", fused, summed, fused_scale)
    check_moments("mmmod.combine_", summed, moments)
    # the weights and factors: O(tensors) float64 device ops of the reference, no host read
    weights = mmpareto_weights(ordered_sum(moments))
    groups = _groups(fused, summed)
    if not groups:
        return weights
    device = summed[0].device
    K, bucket, utils, launch = _modules()
    cache = _meta_cache(bucket)
    fac = mmpareto_factors(moments, weights, gamma).contiguous()
    scale = fused_scale if fused_scale is not None else fac  # unread when HAS_SCALE is False
    with _device_ctx(device):
        for dtype, items in groups.items():
            fs, ss = [x[1] for x in items], [x[2] for x in items]
            zeros = [0] * len(fs)
            fm = cache.get(fs, zeros, BLOCK, _NOISE_BLOCK)
            sm = cache.get(ss, zeros, BLOCK, _NOISE_BLOCK)
            launch(K._combine_kernel, (sm.n_stats_chunks,), fm.meta, sm.meta, sm.stats_map,
                   _orig([x[0] for x in items], device), fac, scale,
                   HAS_SCALE=fused_scale is not None, BLOCK=BLOCK, DT=utils.tl_dtype(dtype),
                   F_PTR=bucket.F_PTR, num_warps=WARPS, **_fields(bucket))
            for _, _, sc, s in items:
                if sc is not s:  # a non-contiguous gradient: its combined copy goes back
                    s.copy_(sc)
    return weights
