"""Small Triton helpers shared by the kernels (no libdevice: they also run in the interpreter)."""
from __future__ import annotations

import triton
import triton.language as tl

# The bucket table layout (the host side builds it: mmmod/backends/triton/table.py, whose plain
# ints these must equal; tests/kernels/test_triton_kernels.py checks) as compile-time constants. The
# compiler refuses a plain int global inside @triton.jit code ("Cannot access global variable
# ... from within @jit'ed function"; the interpreter accepts it), hence tl.constexpr.
META_FIELDS = tl.constexpr(5)
F_PTR = tl.constexpr(0)
F_NUMEL = tl.constexpr(1)
F_OFFSET = tl.constexpr(2)
F_SCHUNK = tl.constexpr(3)
F_NCHUNK = tl.constexpr(4)


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
