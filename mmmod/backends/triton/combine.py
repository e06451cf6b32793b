"""Launchers of MMPareto's combine (ops ``_pair_moments`` and ``combine_``, signatures of
mmmod/_ops; kernels/combine_kernel.py; reference mmmod/reference/combine.py).

Per call and dtype group: one bucket table per operand list from the backend's cache (equal
sizes, so equal chunks), then two launches for the moments (chunk partials, per-tensor
fixed-order finish) and one for the combine. Nothing reads a device value on the host: the
factors and the scale stay device tensors the kernels read. Empty tensors get a zero row and are
never launched over; a non-contiguous gradient is combined in a contiguous copy written back.
"""
from __future__ import annotations

import torch

from ...reference.combine import (check_groups, check_moments, check_pair_inputs,
                                  grouped_factors)
from .launch import launch, on, tl_dtype
from .table import F_NUMEL, F_PTR, F_SCHUNK, META_FIELDS

#: elements per chunk program, its warps, partials per step of the finishing reduction
BLOCK = 4096
WARPS = 8
BLOCK_P = 256
#: the bucket tables' noise chunks are unused here: one per tensor keeps the tables small
_NOISE_BLOCK = 1 << 30
#: the table's field positions, compile-time arguments of the kernels
_FIELDS = dict(META_FIELDS=META_FIELDS, F_NUMEL=F_NUMEL, F_SCHUNK=F_SCHUNK)


def _rows(be, items, device) -> torch.Tensor:
    """int32 [T] device tensor of each table tensor's row in the op's arrays (the layout's
    only dependency): built once per device and pattern, kept by the backend's cache."""
    return be.meta_cache.flags([x[0] for x in items], device)


def _tables(be, fused, summed):
    """Per dtype of the non-empty tensors: (dtype, [(row, fused, contiguous summed, summed)],
    the fused and the summed gradients' bucket tables from the backend's cache; equal sizes, so
    equal chunks). Built once per op call, both passes of a combine share them."""
    by_dtype: dict = {}
    for i, (a, s) in enumerate(zip(fused, summed)):
        if s.numel() > 0:
            by_dtype.setdefault(s.dtype, []).append(
                (i, a.detach().contiguous(), s if s.is_contiguous() else s.contiguous(), s))
    out, cache = [], be.meta_cache
    for dtype, items in by_dtype.items():
        zeros = [0] * len(items)
        out.append((dtype, items, cache.get([x[1] for x in items], zeros, BLOCK, _NOISE_BLOCK),
                    cache.get([x[2] for x in items], zeros, BLOCK, _NOISE_BLOCK)))
    return out


def _moments(be, tables, n, fused_scale, device) -> torch.Tensor:
    out = torch.zeros((n, 3), dtype=torch.float64, device=device)
    if not tables:
        return out
    K = be.modules.combine
    scale = fused_scale if fused_scale is not None else out  # unread when HAS_SCALE is False
    with on(device):
        for dtype, items, fm, sm in tables:
            partial = torch.empty(3 * sm.n_stats_chunks, dtype=torch.float64, device=device)
            launch(K._pair_moments_kernel, (sm.n_stats_chunks,), fm.meta, sm.meta, sm.stats_map,
                   scale, partial, HAS_SCALE=fused_scale is not None, BLOCK=BLOCK,
                   DT=tl_dtype(dtype), F_PTR=F_PTR, num_warps=WARPS, **_FIELDS)
            launch(K._pair_moments_finish_kernel, (len(items),), sm.meta, partial,
                   _rows(be, items, device), out, BLOCK=BLOCK, BLOCK_P=BLOCK_P, **_FIELDS)
    return out


def pair_moments(be, fused, summed, fused_scale=None) -> torch.Tensor:
    check_pair_inputs("mmmod._pair_moments", fused, summed, fused_scale)
    device = summed[0].device if len(summed) else torch.device("cpu")
    return _moments(be, _tables(be, fused, summed), len(summed), fused_scale, device)


def combine_(be, summed, fused, moments, groups, gamma, fused_scale=None) -> torch.Tensor:
    check_pair_inputs("mmmod.combine_", fused, summed, fused_scale)
    if moments is not None:
        check_moments("mmmod.combine_", summed, moments)
    check_groups("mmmod.combine_", summed, groups)
    device = summed[0].device  # each group holds a tensor
    tables = _tables(be, fused, summed)
    if moments is None:  # this call's own first pass, over the same tables
        moments = _moments(be, tables, len(summed), fused_scale, device)
    # per modality its weights and its tensors' factors: O(tensors) float64 device ops of the
    # reference, no host read
    weights, fac = grouped_factors(moments, groups, gamma)
    if not tables:
        return weights
    K = be.modules.combine
    fac = fac.contiguous()
    scale = fused_scale if fused_scale is not None else fac  # unread when HAS_SCALE is False
    with on(device):
        for dtype, items, fm, sm in tables:
            launch(K._combine_kernel, (sm.n_stats_chunks,), fm.meta, sm.meta, sm.stats_map,
                   _rows(be, items, device), fac, scale, HAS_SCALE=fused_scale is not None,
                   BLOCK=BLOCK, DT=tl_dtype(dtype), F_PTR=F_PTR, num_warps=WARPS, **_FIELDS)
            for _, _, sc, s in items:
                if sc is not s:  # a non-contiguous gradient: its combined copy goes back
                    s.copy_(sc)
    return weights
