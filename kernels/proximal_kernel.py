"""InfoReg's proximal correction in one pass over a modality's bucket (op ``mmmod::proximal_``,
docs/semantics.md section 10; reference: ``proximal_`` in mmmod/methods/inforeg.py).

``_proximal_kernel``: grid = the bucket's chunks of ``BLOCK`` elements of one tensor (the
statistics chunks of the bucket tables, mmmod/backends/triton/table.py). Three bucket tables of
the same layout (gradients, parameters, snapshots: equal sizes, so equal chunks) give each
program its three pointers. Per element ``g <- round(float32(g) + beta (float32(p) -
float32(p0)))`` (the launcher turns FMA contraction off: each operation rounds as in the
reference), then the chunk's float64 sum of the squares of the stored values goes to ``partial[chunk]``. When
beta is 0 nothing is stored (the gradients stay bit-identical) and the squares are those of the
gradients as they are; beta is read from device memory, so no host sync decides it.

``_proximal_finish_kernel``: one program walks the tensors in order, sums each tensor's chunk
partials (``BLOCK_P`` lanes, chunks in order, then one fixed-shape reduction), divides by its
size and adds the tensors flagged as >= 2-D: the Fisher increment, in a fixed order (the result
does not depend on the GPU or the launch).

The host launcher (tables, dtype groups, non-contiguous copies) is ``proximal_`` in
mmmod/backends/triton/proximal.py.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .utils import F_NUMEL, F_PTR, F_SCHUNK, META_FIELDS, round_to


@triton.jit
def _chunk_body(gp, pp, p0p, idx, msk, b, DT: tl.constexpr, MASKED: tl.constexpr):
    """Correct one chunk in place (unless beta is 0) and return its float64 sum of squares."""
    if MASKED:
        graw = tl.load(gp + idx, mask=msk, other=0.0)
    else:
        graw = tl.load(gp + idx)
    if b != 0.0:
        if MASKED:
            p = tl.load(pp + idx, mask=msk, other=0.0).to(tl.float32)
            p0 = tl.load(p0p + idx, mask=msk, other=0.0).to(tl.float32)
        else:
            p = tl.load(pp + idx).to(tl.float32)
            p0 = tl.load(p0p + idx).to(tl.float32)
        new = round_to(graw.to(tl.float32) + b * (p - p0), DT)
        if MASKED:
            tl.store(gp + idx, new, mask=msk)
        else:
            tl.store(gp + idx, new)
        x = new.to(tl.float64)
    else:
        x = graw.to(tl.float64)
    return tl.sum(x * x, axis=0)


@triton.jit
def _proximal_kernel(g_meta, p_meta, p0_meta, stats_map, beta_ptr, partial,
                     BLOCK: tl.constexpr, DT: tl.constexpr, ALIGNED: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(stats_map + pid)
    row = t * META_FIELDS
    gp = tl.load(g_meta + row + F_PTR).to(tl.pointer_type(DT))
    pp = tl.load(p_meta + row + F_PTR).to(tl.pointer_type(DT))
    p0p = tl.load(p0_meta + row + F_PTR).to(tl.pointer_type(DT))
    n = tl.load(g_meta + row + F_NUMEL)
    j = pid - tl.load(g_meta + row + F_SCHUNK)
    start = j.to(tl.int64) * BLOCK
    idx = start + tl.arange(0, BLOCK).to(tl.int64)
    msk = idx < n
    b = tl.load(beta_ptr)
    if ALIGNED:
        # the host checked: all three data pointers of every tensor 16-byte aligned, so a full
        # chunk takes unmasked 16-byte vector accesses; a tensor's partial last chunk the mask
        gp = tl.multiple_of(gp, 16)
        pp = tl.multiple_of(pp, 16)
        p0p = tl.multiple_of(p0p, 16)
        if start + BLOCK <= n:
            s = _chunk_body(gp, pp, p0p, idx, msk, b, DT, False)
        else:
            s = _chunk_body(gp, pp, p0p, idx, msk, b, DT, True)
    else:
        s = _chunk_body(gp, pp, p0p, idx, msk, b, DT, True)
    tl.store(partial + pid, s)


@triton.jit
def _proximal_finish_kernel(g_meta, partial, flags, out, T, BLOCK: tl.constexpr,
                            BLOCK_P: tl.constexpr):
    lanes = tl.arange(0, BLOCK_P)
    total = tl.zeros([1], dtype=tl.float64)
    for t in range(0, T):
        row = t * META_FIELDS
        n = tl.load(g_meta + row + F_NUMEL)
        first = tl.load(g_meta + row + F_SCHUNK)
        count = (n + BLOCK - 1) // BLOCK
        acc = tl.zeros([BLOCK_P], dtype=tl.float64)
        for c in range(0, count, BLOCK_P):
            m = (c + lanes) < count
            acc += tl.load(partial + first + c + lanes, mask=m, other=0.0)
        s = tl.sum(acc, axis=0)
        flag = tl.load(flags + t)
        mean = s / tl.maximum(n, 1).to(tl.float64)
        total += tl.where((flag != 0) & (n > 0), mean, 0.0)
    tl.store(out + tl.arange(0, 1), total)
