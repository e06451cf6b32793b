"""Launcher of op ``_bucket_moments`` (sharded OGM-GE's per-tensor statistics): the statistics
kernel's chunk partials, then one program per tensor combining them in the sigma kernel's
fixed order (``_moments_kernel``, kernels/stats_kernel.py): two launches, no atomics, the same
bits on every run."""
from __future__ import annotations

import torch

from ...reference.moments import check_moments_inputs
from .launch import aligned, launch, on, tl_dtype, warps


def bucket_moments(be, tensors):
    """float64 ``(count, mean, M2)`` rows ``[T, 3]``. Every tensor keeps its table row (an
    empty one owns no chunk and gets ``(0, 0, 0)``); a non-contiguous tensor is read through a
    contiguous copy."""
    tensors = list(tensors)
    check_moments_inputs(tensors)
    if not tensors:
        return torch.zeros((0, 3), dtype=torch.float64)
    device = tensors[0].device
    out = torch.zeros((len(tensors), 3), dtype=torch.float64, device=device)
    ts = [g.detach().contiguous() for g in tensors]
    live = [g for g in ts if g.numel() > 0]
    if not live:
        return out
    with on(device):
        K = be.modules
        meta = be.meta_cache.get(ts, [0] * len(ts), be.block, be.block_c)
        part = torch.empty(2 * meta.n_stats_chunks, dtype=torch.float64, device=device)
        launch(
            K.stats._stats_partial_kernel, (meta.n_stats_chunks,),
            meta.meta, meta.stats_map, part, BLOCK=be.block,
            DT=tl_dtype(ts[0].dtype), ALIGNED=aligned(live),
            num_warps=warps(be.block))
        launch(
            K.stats._moments_kernel, (meta.num_tensors,),
            meta.meta, part, out, BLOCK=be.block, BLOCK_P=be.block_p)
    return out
