"""Launcher of op ``proximal_`` (InfoReg's proximal correction of one modality's bucket,
docs/semantics.md section 10): ``_proximal_kernel`` over three bucket tables of one layout
(gradients, parameters, snapshots), then ``_proximal_finish_kernel`` (kernels/proximal_kernel.py)
for the Fisher increment, per dtype group."""
from __future__ import annotations

import torch

from ...reference.proximal import check_inputs
from .launch import launch, on, tl_dtype

#: elements per chunk (one program), warps per chunk program, partials per finishing step
BLOCK = 4096
WARPS = 8
BLOCK_P = 256
#: the tables' noise chunks are unused here: one per tensor keeps the tables small
_NOISE_BLOCK = 1 << 30


def proximal_(be, grads, params, snapshots, beta) -> torch.Tensor:
    """The op on one device: Triton kernels on CUDA (or on CPU under TRITON_INTERPRET=1).
    Returns the Fisher increment, float64 0-d on beta's device."""
    check_inputs(grads, params, snapshots, beta)
    K = be.modules
    device = beta.device
    out = torch.zeros((), dtype=torch.float64, device=device)
    groups: dict = {}
    for g, p, p0 in zip(grads, params, snapshots):
        if g.numel() > 0:
            groups.setdefault(g.dtype, []).append((g, p, p0))
    if not groups:
        return out
    b = beta.detach().to(device=device, dtype=torch.float32).reshape(1)
    cache = be.meta_cache
    with on(device):
        for dtype, items in groups.items():
            gs = [g if g.is_contiguous() else g.contiguous() for g, _, _ in items]
            ps = [p.detach().contiguous() for _, p, _ in items]
            p0s = [p0.contiguous() for _, _, p0 in items]
            zeros = [0] * len(gs)
            gm = cache.get(gs, zeros, BLOCK, _NOISE_BLOCK)
            pm = cache.get(ps, zeros, BLOCK, _NOISE_BLOCK)
            p0m = cache.get(p0s, zeros, BLOCK, _NOISE_BLOCK)
            partial = torch.empty(gm.n_stats_chunks, dtype=torch.float64, device=device)
            aligned = all(t.data_ptr() % 16 == 0 for t in gs + ps + p0s)
            launch(K.proximal._proximal_kernel, (gm.n_stats_chunks,), gm.meta, pm.meta,
                   p0m.meta, gm.stats_map, b, partial, BLOCK=BLOCK, DT=tl_dtype(dtype),
                   ALIGNED=aligned, num_warps=WARPS)
            part_out = torch.empty(1, dtype=torch.float64, device=device)
            # 1 where the tensor counts for the Fisher (>= 2 dims): shapes only, built once
            flags = cache.flags([g.dim() >= 2 for g in gs], device)
            launch(K.proximal._proximal_finish_kernel, (1,), gm.meta, partial, flags, part_out,
                   len(gs), BLOCK=BLOCK, BLOCK_P=BLOCK_P)
            out += part_out[0]
            for (g, _, _), gc in zip(items, gs):
                if gc is not g:  # a non-contiguous gradient: its corrected copy goes back
                    g.copy_(gc)
    return out
