"""MMPareto's gradient combine as Triton kernels (ops ``mmmod::_pair_moments`` and
``mmmod::combine_``; reference: mmmod/reference/combine.py, docs/semantics.md section 11).

The kernels see a modality's (fused, summed) gradient pairs through two bucket tables of one
layout (mmmod/backends/triton/table.py; equal sizes, so equal chunks of ``BLOCK`` elements of one tensor);
the table's field positions arrive as compile-time arguments, so this file imports Triton only.
``orig[t]`` is the row of table tensor ``t`` in the op's ``[n, ...]`` arrays (empty tensors and
other dtypes are left out of a table).

``_pair_moments_kernel``: grid = the chunks; per element, in float64, ``a = g_mm * scale``,
``b = g_sum - a``, and the chunk's ``(|a|^2, |b|^2, a.b)`` to ``partial[3 chunk + k]``.
``_pair_moments_finish_kernel``: grid = the tensors; each sums its chunks' partials in chunk
order (``BLOCK_P`` lanes, then one fixed-shape reduction) into its row of ``out``: the moments
do not depend on the GPU or the launch.
``_combine_kernel``: grid = the chunks; ``g_sum <- round(g_mm * c_fused + g_sum * c_summed)``
in float32 (float64 for float64 gradients) with ``c_fused = factors[orig, 0] * scale`` formed in
float64 and rounded once, as the reference; the launcher turns FMA contraction off.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .utils import round_to


@triton.jit
def _chunk_ptrs(f_meta, s_meta, stats_map, pid, BLOCK: tl.constexpr, DT: tl.constexpr,
                META_FIELDS: tl.constexpr, F_PTR: tl.constexpr, F_NUMEL: tl.constexpr,
                F_SCHUNK: tl.constexpr):
    t = tl.load(stats_map + pid)
    row = t * META_FIELDS
    fp = tl.load(f_meta + row + F_PTR).to(tl.pointer_type(DT))
    sp = tl.load(s_meta + row + F_PTR).to(tl.pointer_type(DT))
    n = tl.load(s_meta + row + F_NUMEL)
    j = pid - tl.load(s_meta + row + F_SCHUNK)
    idx = j.to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    return t, fp, sp, idx, idx < n


@triton.jit
def _pair_moments_kernel(f_meta, s_meta, stats_map, scale_ptr, partial, HAS_SCALE: tl.constexpr,
                         BLOCK: tl.constexpr, DT: tl.constexpr, META_FIELDS: tl.constexpr,
                         F_PTR: tl.constexpr, F_NUMEL: tl.constexpr, F_SCHUNK: tl.constexpr):
    pid = tl.program_id(0)
    t, fp, sp, idx, msk = _chunk_ptrs(f_meta, s_meta, stats_map, pid, BLOCK, DT, META_FIELDS,
                                      F_PTR, F_NUMEL, F_SCHUNK)
    a = tl.load(fp + idx, mask=msk, other=0.0).to(tl.float64)  # exact
    s = tl.load(sp + idx, mask=msk, other=0.0).to(tl.float64)
    if HAS_SCALE:
        a = a * tl.load(scale_ptr)
    b = s - a
    tl.store(partial + 3 * pid, tl.sum(a * a, axis=0))
    tl.store(partial + 3 * pid + 1, tl.sum(b * b, axis=0))
    tl.store(partial + 3 * pid + 2, tl.sum(a * b, axis=0))


@triton.jit
def _pair_moments_finish_kernel(s_meta, partial, orig, out, BLOCK: tl.constexpr,
                                BLOCK_P: tl.constexpr, META_FIELDS: tl.constexpr,
                                F_NUMEL: tl.constexpr, F_SCHUNK: tl.constexpr):
    t = tl.program_id(0)
    row = t * META_FIELDS
    n = tl.load(s_meta + row + F_NUMEL)
    first = tl.load(s_meta + row + F_SCHUNK)
    count = (n + BLOCK - 1) // BLOCK
    lanes = tl.arange(0, BLOCK_P)
    aa = tl.zeros([BLOCK_P], dtype=tl.float64)
    bb = tl.zeros([BLOCK_P], dtype=tl.float64)
    ab = tl.zeros([BLOCK_P], dtype=tl.float64)
    for c in range(0, count, BLOCK_P):
        m = (c + lanes) < count
        base = partial + 3 * (first + c + lanes)
        aa += tl.load(base, mask=m, other=0.0)
        bb += tl.load(base + 1, mask=m, other=0.0)
        ab += tl.load(base + 2, mask=m, other=0.0)
    o = tl.load(orig + t)
    tl.store(out + 3 * o, tl.sum(aa, axis=0))
    tl.store(out + 3 * o + 1, tl.sum(bb, axis=0))
    tl.store(out + 3 * o + 2, tl.sum(ab, axis=0))


@triton.jit
def _combine_kernel(f_meta, s_meta, stats_map, orig, factors, scale_ptr, HAS_SCALE: tl.constexpr,
                    BLOCK: tl.constexpr, DT: tl.constexpr, META_FIELDS: tl.constexpr,
                    F_PTR: tl.constexpr, F_NUMEL: tl.constexpr, F_SCHUNK: tl.constexpr):
    pid = tl.program_id(0)
    t, fp, sp, idx, msk = _chunk_ptrs(f_meta, s_meta, stats_map, pid, BLOCK, DT, META_FIELDS,
                                      F_PTR, F_NUMEL, F_SCHUNK)
    o = tl.load(orig + t)
    ca = tl.load(factors + 2 * o)
    cs = tl.load(factors + 2 * o + 1)
    if HAS_SCALE:
        ca = ca * tl.load(scale_ptr)
    a = tl.load(fp + idx, mask=msk, other=0.0)
    s = tl.load(sp + idx, mask=msk, other=0.0)
    if DT == tl.float64:
        tl.store(sp + idx, a * ca + s * cs, mask=msk)
    else:
        new = a.to(tl.float32) * ca.to(tl.float32) + s.to(tl.float32) * cs.to(tl.float32)
        tl.store(sp + idx, round_to(new, DT), mask=msk)
