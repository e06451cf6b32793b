"""In-place modulation of a bucket, one launch per bucket (docs/semantics.md: "Modulation",
"Noise").

``_modulate_noise_kernel`` (OGM-GE): grid = the bucket's noise chunks. A chunk is BLOCK_C
consecutive Philox counters of one tensor; one ``tl.philox`` call per counter gives four words,
turned into four normals (two Box-Muller pairs) that land on the four stream elements
``4c .. 4c + 3`` (interleaved in registers), i.e. element e of the modality's stream gets output
``e % 4`` of counter ``e // 4`` = ``(lo32(e//4), hi32(e//4), step, modality)`` under key
``(lo32(seed), hi32(seed))``, exactly :mod:`mmmod.reference.philox`. Then
``g <- float32(k * g + sigma_t * n)`` rounded to g's dtype, with k and sigma_t read from
device memory. Seed and step are int64 and modality int32 by annotation, and all three are in
``do_not_specialize``: the compiled signature does not depend on their values (Triton would
otherwise type a Python int i32 or i64 by value and specialise the value 1), so a new seed or
step never recompiles. With ``STEP_PTR`` the step is instead read through ``step_ptr`` from a
0-d integer tensor on the device, so a captured CUDA graph draws fresh noise at every replay as
the counter advances; otherwise ``step_ptr`` is None (a compile-time constant, never read).

Rounding: the backend launches these kernels with ``enable_fp_fusion=False``, so
``k * g + sigma * n`` is two roundings and an add (no FMA), as in the reference, and the
Box-Muller below takes a round-to-nearest square root (``tl.sqrt_rn``; Triton's
``pair_uniform_to_normal`` uses the approximate one). log/cos/sin remain the GPU's
approximate instructions (see docs/triton.md for their error bounds).

``_scale_kernel`` (OGM / MLB): ``g <- float32(k * g)`` over the statistics chunks (or, for a
flat bucket, over one contiguous range with ``meta`` unused).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .utils import F_NCHUNK, F_NUMEL, F_OFFSET, F_PTR, F_SCHUNK, META_FIELDS, round_to


@triton.jit
def _box_muller(u_a, u_b):
    """The reference's Box-Muller step by step (mmmod/reference/philox.py): clamp, float32
    ``u_b * 2pi``, ``sqrt(log(u_a) * -2)`` correctly rounded, then ``r cos th``, ``r sin th``."""
    u_a = tl.maximum(u_a, 1.0e-7)
    th = u_b * 6.283185307179586  # the literal is rounded to float32, as torch.tensor(TWO_PI)
    r = tl.sqrt_rn(tl.log(u_a) * -2.0)
    return r * tl.cos(th), r * tl.sin(th)


@triton.jit
def _normals4(seed, counters, step, modality):
    """The four normals of each int64 Philox counter, interleaved: [4 * len(counters)]."""
    c0 = (counters & 0xFFFFFFFF).to(tl.uint32)
    c1 = ((counters >> 32) & 0xFFFFFFFF).to(tl.uint32)
    zero = c0 * 0
    c2 = zero + step
    c3 = zero + modality
    w0, w1, w2, w3 = tl.philox(seed, c0, c1, c2, c3)
    u0 = tl.uint_to_uniform_float(w0)
    u1 = tl.uint_to_uniform_float(w1)
    u2 = tl.uint_to_uniform_float(w2)
    u3 = tl.uint_to_uniform_float(w3)
    n0, n1 = _box_muller(u0, u1)
    n2, n3 = _box_muller(u2, u3)
    return tl.interleave(tl.interleave(n0, n2), tl.interleave(n1, n3))


@triton.jit(do_not_specialize=["seed", "step", "modality"])
def _modulate_noise_kernel(meta, noise_map, k_ptr, sigma, seed: tl.int64, step: tl.int64,
                           step_ptr, modality: tl.int32, BLOCK_C: tl.constexpr,
                           DT: tl.constexpr, STEP_PTR: tl.constexpr, ALIGNED: tl.constexpr):
    pid = tl.program_id(0)
    if STEP_PTR:  # the optimizer's device step counter (CUDA-graph replays advance it)
        step = tl.load(step_ptr).to(tl.int64) & 0xFFFFFFFF
    t = tl.load(noise_map + pid)
    row = meta + t * META_FIELDS
    ptr = tl.load(row + F_PTR).to(tl.pointer_type(DT))
    n = tl.load(row + F_NUMEL)
    off = tl.load(row + F_OFFSET)
    j = pid - tl.load(row + F_NCHUNK)
    c_first = off // 4 + j * BLOCK_C
    counters = c_first + tl.arange(0, BLOCK_C).to(tl.int64)
    z = _normals4(seed, counters, step.to(tl.uint32), modality.to(tl.uint32))
    k = tl.load(k_ptr)
    sg = tl.load(sigma + t)
    nz = sg * z
    if ALIGNED:
        # the host checked: every data pointer 16-byte aligned and every stream offset a
        # multiple of 4, so the chunk starts at element 4 * BLOCK_C * j of the tensor (the same
        # value as 4 * c_first - off, written so the compiler sees the divisibility) and a full
        # chunk is read and written with 16-byte vector accesses, unmasked; only a tensor's
        # last, partial chunk takes the masked path
        ptr = tl.multiple_of(ptr, 16)
        idx = (4 * BLOCK_C) * j + tl.arange(0, 4 * BLOCK_C).to(tl.int64)
        if (4 * BLOCK_C) * j + 4 * BLOCK_C <= n:
            g = tl.load(ptr + idx).to(tl.float32)
            tl.store(ptr + idx, round_to(g * k + nz, DT))
        else:
            msk = idx < n
            g = tl.load(ptr + idx, mask=msk, other=0.0).to(tl.float32)
            tl.store(ptr + idx, round_to(g * k + nz, DT), mask=msk)
    else:
        idx = 4 * c_first - off + tl.arange(0, 4 * BLOCK_C).to(tl.int64)
        msk = (idx >= 0) & (idx < n)
        g = tl.load(ptr + idx, mask=msk, other=0.0).to(tl.float32)
        gk = g * k
        tl.store(ptr + idx, round_to(gk + nz, DT), mask=msk)


@triton.jit
def _scale_kernel(meta, stats_map, k_ptr, flat_ptr, flat_n, BLOCK: tl.constexpr,
                  DT: tl.constexpr, FLAT: tl.constexpr, ALIGNED: tl.constexpr):
    pid = tl.program_id(0)
    if FLAT:
        ptr = flat_ptr
        n = flat_n
        j = pid
    else:
        t = tl.load(stats_map + pid)
        row = meta + t * META_FIELDS
        ptr = tl.load(row + F_PTR).to(tl.pointer_type(DT))
        n = tl.load(row + F_NUMEL)
        j = pid - tl.load(row + F_SCHUNK)
    start = j.to(tl.int64) * BLOCK
    idx = start + tl.arange(0, BLOCK).to(tl.int64)
    msk = idx < n
    k = tl.load(k_ptr)
    if ALIGNED:
        # every data pointer (or the flat range's start) 16-byte aligned, checked by the host:
        # a full chunk takes unmasked 16-byte vector accesses, a partial last chunk the mask
        ptr = tl.multiple_of(ptr, 16)
        if start + BLOCK <= n:
            g = tl.load(ptr + idx).to(tl.float32)
            tl.store(ptr + idx, round_to(g * k, DT))
        else:
            g = tl.load(ptr + idx, mask=msk, other=0.0).to(tl.float32)
            tl.store(ptr + idx, round_to(g * k, DT), mask=msk)
    else:
        g = tl.load(ptr + idx, mask=msk, other=0.0).to(tl.float32)
        tl.store(ptr + idx, round_to(g * k, DT), mask=msk)
