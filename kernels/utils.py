"""Small Triton helpers shared by the kernels (no libdevice: they also run in the interpreter)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import bucket as _bucket

# The bucket table layout (kernels/bucket.py) as compile-time constants. The compiler refuses a
# plain int global inside @triton.jit code ("Cannot access global variable ... from within
# @jit'ed function"; the interpreter accepts it), so the kernels use these tl.constexpr copies.
META_FIELDS = tl.constexpr(_bucket.META_FIELDS)
F_PTR = tl.constexpr(_bucket.F_PTR)
F_NUMEL = tl.constexpr(_bucket.F_NUMEL)
F_OFFSET = tl.constexpr(_bucket.F_OFFSET)
F_SCHUNK = tl.constexpr(_bucket.F_SCHUNK)
F_NCHUNK = tl.constexpr(_bucket.F_NCHUNK)

TORCH_TO_TL = {
    torch.float32: tl.float32,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float64: tl.float64,
}


def tl_dtype(dtype: torch.dtype):
    try:
        return TORCH_TO_TL[dtype]
    except KeyError:
        raise TypeError(f"mmmod triton kernels do not support dtype {dtype}") from None


@triton.jit
def round_to(x, DT: tl.constexpr):
    """float32 ``x`` rounded to ``DT`` with round-to-nearest-even (as torch's ``.to``).

    bf16 is rounded by hand on the bit pattern (the interpreter's float32 -> bf16 cast rounds
    ties away and the result must match torch bit for bit); the value is then exactly
    representable, so the final cast is exact on every target.
    """
    if DT == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bias = ((bits >> 16) & 1) + 0x7FFF
        rb = ((bits + bias) & 0xFFFF0000).to(tl.float32, bitcast=True)
        rb = tl.where(x != x, x, rb)
        return rb.to(tl.bfloat16)
    else:
        return x.to(DT)


@triton.jit
def tanh_f32(x):
    """tanh in float32 from exp/log only (no libdevice), accurate to a few ulp everywhere.

    tanh|x| = -t / (t + 2) with t = expm1(-2|x|), expm1 by Kahan's trick
    expm1(y) = (u - 1) * y / log(u), u = exp(y) (exact enough near 0, no cancellation).
    """
    ax = tl.abs(x)
    ax = tl.where(ax > 20.0, 20.0, ax)  # tanh(20) == 1 in float32; NaN passes through
    y = -2.0 * ax
    u = tl.exp(y)
    um1 = u - 1.0
    lg = tl.log(u)
    lg = tl.where(um1 == 0.0, 1.0, lg)
    t = tl.where(um1 == 0.0, y, tl.math.div_rn(um1 * y, lg))
    th = tl.math.div_rn(-t, t + 2.0)
    return tl.where(x < 0, -th, th)
