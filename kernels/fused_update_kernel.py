"""The fused modulated SGD / Adam update of one bucket (``ModulatedOptimizer(fused=True)`` on the
``triton`` backend; docs/fused.md). The definition is ``reference_sgd_`` / ``reference_adam_`` in
mmmod/optim/fused.py: torch's single-tensor step applied op for op to the modulated gradient.
The launchers are in mmmod/backends/triton/fused_update.py.

``_fused_sgd_kernel`` / ``_fused_adam_kernel``: grid = the bucket's chunks. A chunk is
``BLOCK_C`` consecutive Philox counters of one tensor (the noise chunks of the bucket tables,
mmmod/backends/triton/table.py: ``4 BLOCK_C`` stream elements, clipped to the tensor), so with
noise every Philox call yields four normals in registers, exactly as ``_modulate_noise_kernel``.
Per element the gradient is read once, ``x = round(k g + sigma n)`` (or ``round(k g)``) is formed
in registers and never stored, and torch's arithmetic follows: the parameter and the optimizer
state (momentum buffer; exp_avg, exp_avg_sq) are read and written once. Global memory per
element: SGD with momentum 4 reads/writes of the dtype's size plus the gradient read (20 B in
float32), Adam 28 B; per program its map entry and its tensor's table row (8 int64 words).

Rounding: launched with ``enable_fp_fusion=False`` (every multiply and add rounds on its own,
like the unfused modulation), except where torch's own kernels compute ``a * b + c`` with one
rounding (add with alpha, lerp, addcmul: ``tl.fma``); division and square root are the
correctly rounded ones (``div_rn`` / ``sqrt_rn``), as CUDA's defaults. Every intermediate torch
materialises as a tensor is rounded to the storage dtype (``R``). In float64 the arithmetic is
float64 (torch's opmath type), otherwise float32.

Table (``FusedTable`` in mmmod/backends/triton/table.py): 8 int64 words per tensor: gradient,
parameter, state 1 and state 2 pointers, numel, stream offset, first chunk, and a per-tensor
flag (SGD: momentum buffer ready); then the chunk map (chunk -> tensor). Scalars travel in a
float64 tensor (lr, weight decay, ...), Adam's per-tensor bias corrections in another (each
tensor may have its own step count).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .modulate_kernel import _normals4
from .utils import round_to


@triton.jit
def _R(x, DT: tl.constexpr, ACC: tl.constexpr):
    """x stored into a DT tensor and read back (identity for float32 / float64)."""
    if DT == ACC:
        return x
    else:
        return round_to(x.to(tl.float32), DT).to(ACC)


@triton.jit
def _chunk(table, cmap, k_ptr, sigma, seed, step, modality, BLOCK_C: tl.constexpr,
           DT: tl.constexpr, ACC: tl.constexpr, NOISE: tl.constexpr):
    """This program's tensor, element indices, mask, the modulated gradient (rounded to DT, in
    ACC) and the tensor's row."""
    pid = tl.program_id(0)
    t = tl.load(cmap + pid)
    row = table + t * 8
    n = tl.load(row + 4)
    off = tl.load(row + 5)
    j = pid - tl.load(row + 6)
    c_first = off // 4 + j * BLOCK_C
    idx = 4 * c_first - off + tl.arange(0, 4 * BLOCK_C).to(tl.int64)
    msk = (idx >= 0) & (idx < n)
    gp = tl.load(row + 0).to(tl.pointer_type(DT))
    g = tl.load(gp + idx, mask=msk, other=0.0).to(tl.float32)
    k = tl.load(k_ptr)
    if NOISE:
        counters = c_first + tl.arange(0, BLOCK_C).to(tl.int64)
        z = _normals4(seed, counters, step.to(tl.uint32), modality.to(tl.uint32))
        sg = tl.load(sigma + t)
        x = round_to(g * k + sg * z, DT).to(ACC)
    else:
        x = round_to(g * k, DT).to(ACC)
    return t, row, idx, msk, x


@triton.jit(do_not_specialize=["seed", "step", "modality"])
def _fused_sgd_kernel(table, cmap, k_ptr, sigma, u_ptr, hyper, seed: tl.int64, step: tl.int64,
                      modality: tl.int32, BLOCK_C: tl.constexpr, DT: tl.constexpr,
                      ACC: tl.constexpr, NOISE: tl.constexpr, UPDATE: tl.constexpr,
                      MAXIMIZE: tl.constexpr, DECAY: tl.constexpr, MOMENTUM: tl.constexpr,
                      NESTEROV: tl.constexpr):
    t, row, idx, msk, x = _chunk(table, cmap, k_ptr, sigma, seed, step, modality, BLOCK_C, DT,
                                 ACC, NOISE)
    pp = tl.load(row + 1).to(tl.pointer_type(DT))
    p0 = tl.load(pp + idx, mask=msk, other=0.0).to(ACC)
    lr = tl.load(hyper + 0).to(ACC)
    if MAXIMIZE:
        x = -x
    if DECAY:
        x = _R(tl.fma(p0, tl.load(hyper + 1).to(ACC), x), DT, ACC)  # grad.add(p, alpha=wd)
    if MOMENTUM:
        mom = tl.load(hyper + 2).to(ACC)
        one_minus_damp = tl.load(hyper + 3).to(ACC)
        bp = tl.load(row + 2).to(tl.pointer_type(DT))
        ready = tl.load(row + 7)
        if ready != 0:  # buf.mul_(momentum).add_(grad, alpha=1 - dampening)
            b = tl.load(bp + idx, mask=msk, other=0.0).to(ACC)
            b = _R(tl.fma(x, one_minus_damp, _R(b * mom, DT, ACC)), DT, ACC)
        else:  # buf = clone(grad)
            b = x
        tl.store(bp + idx, b.to(DT), mask=msk)
        if NESTEROV:
            x = _R(tl.fma(b, mom, x), DT, ACC)  # grad.add(buf, alpha=momentum)
        else:
            x = b
    pn = _R(tl.fma(x, -lr, p0), DT, ACC)  # p.add_(grad, alpha=-lr)
    if UPDATE:  # p <- p0 + u (p - p0)
        u = tl.load(u_ptr).to(ACC)
        pn = _R(p0 + _R(_R(pn - p0, DT, ACC) * u, DT, ACC), DT, ACC)
    tl.store(pp + idx, pn.to(DT), mask=msk)


@triton.jit(do_not_specialize=["seed", "step", "modality"])
def _fused_adam_kernel(table, cmap, k_ptr, sigma, u_ptr, hyper, bias, seed: tl.int64,
                       step: tl.int64, modality: tl.int32, BLOCK_C: tl.constexpr,
                       DT: tl.constexpr, ACC: tl.constexpr, NOISE: tl.constexpr,
                       UPDATE: tl.constexpr, MAXIMIZE: tl.constexpr, DECAY: tl.constexpr,
                       DECOUPLED: tl.constexpr, SMALL_W: tl.constexpr):
    t, row, idx, msk, x = _chunk(table, cmap, k_ptr, sigma, seed, step, modality, BLOCK_C, DT,
                                 ACC, NOISE)
    pp = tl.load(row + 1).to(tl.pointer_type(DT))
    p0 = tl.load(pp + idx, mask=msk, other=0.0).to(ACC)
    if MAXIMIZE:
        x = -x
    pc = p0
    if DECAY:
        if DECOUPLED:  # p.mul_(1 - lr * wd)
            pc = _R(p0 * tl.load(hyper + 7).to(ACC), DT, ACC)
        else:  # grad.add(p, alpha=wd)
            x = _R(tl.fma(pc, tl.load(hyper + 1).to(ACC), x), DT, ACC)
    ap = tl.load(row + 2).to(tl.pointer_type(DT))
    vp = tl.load(row + 3).to(tl.pointer_type(DT))
    a = tl.load(ap + idx, mask=msk, other=0.0).to(ACC)
    v = tl.load(vp + idx, mask=msk, other=0.0).to(ACC)
    w = tl.load(hyper + 4).to(ACC)  # 1 - beta1
    if SMALL_W:  # exp_avg.lerp_(grad, w): torch's two formulas
        ea = _R(tl.fma(w, x - a, a), DT, ACC)
    else:
        ea = _R(tl.fma(w - 1.0, x - a, x), DT, ACC)
    b2 = tl.load(hyper + 5).to(ACC)
    # exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    c2 = tl.load(hyper + 8).to(ACC)
    ev = _R(tl.fma(c2 * x, x, _R(v * b2, DT, ACC)), DT, ACC)
    tl.store(ap + idx, ea.to(DT), mask=msk)
    tl.store(vp + idx, ev.to(DT), mask=msk)
    neg_step_size = tl.load(bias + 2 * t).to(ACC)
    bc2_sqrt = tl.load(bias + 2 * t + 1).to(ACC)
    eps = tl.load(hyper + 6).to(ACC)
    # denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    if ACC == tl.float64:  # float64 division and square root round correctly by default
        den = _R(_R(tl.sqrt(ev) / bc2_sqrt, DT, ACC) + eps, DT, ACC)
        q = (neg_step_size * ea) / den
    else:
        den = _R(_R(tl.math.div_rn(_R(tl.sqrt_rn(ev), DT, ACC), bc2_sqrt), DT, ACC) + eps, DT,
                 ACC)
        q = tl.math.div_rn(neg_step_size * ea, den)
    # p.addcdiv_(exp_avg, denom, value=-step_size)
    pn = _R(pc + q, DT, ACC)
    if UPDATE:
        u = tl.load(u_ptr).to(ACC)
        pn = _R(p0 + _R(_R(pn - p0, DT, ACC) * u, DT, ACC), DT, ACC)
    tl.store(pp + idx, pn.to(DT), mask=msk)
