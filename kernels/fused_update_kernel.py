"""The fused modulated SGD / Adam update of one bucket (``ModulatedOptimizer(fused=True)`` on the
``triton`` backend; docs/fused.md). The definition is ``reference_sgd_`` / ``reference_adam_`` in
mmmod/optim/fused.py: torch's single-tensor step applied op for op to the modulated gradient.

``_fused_sgd_kernel`` / ``_fused_adam_kernel``: grid = the bucket's chunks. A chunk is
``BLOCK_C`` consecutive Philox counters of one tensor (the noise chunks of
kernels/bucket.py: ``4 BLOCK_C`` stream elements, clipped to the tensor), so with noise every
Philox call yields four normals in registers, exactly as ``_modulate_noise_kernel``. Per
element the gradient is read once, ``x = round(k g + sigma n)`` (or ``round(k g)``) is formed
in registers and never stored, and torch's arithmetic follows: the parameter and the optimizer
state (momentum buffer; exp_avg, exp_avg_sq) are read and written once. Global memory per
element: SGD with momentum 4 reads/writes of the dtype's size plus the gradient read (20 B in
float32), Adam 28 B; per program its map entry and its tensor's table row (``FIELDS`` int64).

Rounding: launched with ``enable_fp_fusion=False`` (every multiply and add rounds on its own,
like the unfused modulation), except where torch's own kernels compute ``a * b + c`` with one
rounding (add with alpha, lerp, addcmul: ``tl.fma``); division and square root are the
correctly rounded ones (``div_rn`` / ``sqrt_rn``), as CUDA's defaults. Every intermediate torch
materialises as a tensor is rounded to the storage dtype (``R``). In float64 the arithmetic is
float64 (torch's opmath type), otherwise float32.

Table (:func:`fused_table`, a new layout next to kernels/bucket.py's, which is left unchanged):
``FIELDS`` int64 words per tensor: gradient, parameter, state 1 and state 2 pointers, numel,
stream offset, first chunk, and a per-tensor flag (SGD: momentum buffer ready); then the chunk
map (chunk -> tensor). Scalars travel in a float64 tensor (lr, weight decay, ...), Adam's
per-tensor bias corrections in another (each tensor may have its own step count).
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import triton
import triton.language as tl

from .modulate_kernel import _normals4
from .launch import launch as _launch
from .utils import round_to, tl_dtype

#: Philox counters per program (4 * BLOCK_C elements), warps per program
BLOCK_C = 256
WARPS = 4
#: table words per tensor
FIELDS = 8
T_G, T_P, T_S1, T_S2, T_NUMEL, T_OFFSET, T_CHUNK, T_FLAG = range(FIELDS)
#: scalar slots (float64 tensor)
H_LR, H_WD, H_MOM, H_DAMP, H_B1W, H_B2, H_EPS, H_DECAY_MUL = range(8)


def _noise_chunks(numel: int, offset: int) -> int:
    if numel == 0:
        return 0
    return -(-((offset + numel - 1) // 4 - offset // 4 + 1) // BLOCK_C)


def fused_table(grads, params, states1, states2, offsets, flags, device):
    """The int64 table (module docstring) and the number of chunks. States may be absent
    (``None``: pointer 0, never dereferenced)."""
    rows, cmap = [], []
    for t, (g, p, s1, s2, off, fl) in enumerate(zip(grads, params, states1, states2, offsets,
                                                    flags)):
        n = g.numel()
        rows += [g.data_ptr(), p.data_ptr(), 0 if s1 is None else s1.data_ptr(),
                 0 if s2 is None else s2.data_ptr(), n, int(off), len(cmap), int(bool(fl))]
        cmap += [t] * _noise_chunks(n, int(off))
    # reused while the storages, sizes, offsets and flags stay put (every step after the first
    # with set_to_none=False gradients): no host-to-device upload per step
    key = (device, tuple(rows))
    hit = _tables.get(key)
    if hit is not None:
        _tables.move_to_end(key)
        return hit
    host = torch.tensor(rows + cmap, dtype=torch.int64)
    if device.type == "cuda":
        host = host.pin_memory()
    entry = (host.to(device, non_blocking=True), len(cmap))
    _tables[key] = entry
    if len(_tables) > TABLE_CACHE_SIZE:
        _tables.popitem(last=False)
    return entry


#: fused-update tables kept on the device (LRU, keyed by every word of the table)
TABLE_CACHE_SIZE = 64
_tables: OrderedDict = OrderedDict()


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


def _check(op, params, grads, states, offsets):
    if not params:
        return None
    p0 = params[0]
    for name, xs in (("grads", grads),) + tuple(states):
        if len(xs) != len(params):
            raise ValueError(f"mmmod.{op}: {len(params)} params but {len(xs)} {name}")
    if len(offsets) != len(params):
        raise ValueError(f"mmmod.{op}: {len(params)} params but {len(offsets)} offsets")
    for i, p in enumerate(params):
        if p.dtype != p0.dtype or p.device != p0.device or not p.is_contiguous():
            raise ValueError(f"mmmod.{op}: param {i} must be a contiguous {p0.dtype} tensor on "
                             f"{p0.device}, like param 0")
        for name, xs in (("grads", grads),) + tuple(states):
            x = xs[i]
            if (x.dtype != p.dtype or x.device != p.device or x.shape != p.shape
                    or not x.is_contiguous()):
                raise ValueError(f"mmmod.{op}: {name} {i} must be a contiguous {p.dtype} tensor "
                                 f"of shape {tuple(p.shape)} on {p.device}, like param {i}")
    tl_dtype(p0.dtype)  # refuses what the kernels do not take
    return p0.device


def _scalars(device, k, sigma, update_scale):
    k = k.detach().to(device=device, dtype=torch.float32).reshape(1)
    sig = None if sigma is None else sigma.detach().to(device=device, dtype=torch.float32)
    u = (None if update_scale is None
         else update_scale.detach().to(device=device, dtype=torch.float32).reshape(1))
    return k, sig, u


def sgd_(params, grads, momentum_buffers, buffer_ready, offsets, k, sigma, update_scale, *, lr,
         weight_decay, momentum, dampening, nesterov, maximize, seed, step, modality) -> None:
    """``reference_sgd_``'s contract on one bucket (module docstring)."""
    from mmmod.reference.philox import seed_int64
    use_momentum = momentum != 0
    states = (("momentum_buffers", momentum_buffers),) if use_momentum else ()
    device = _check("fused_sgd_", params, grads, states, offsets)
    if device is None:
        return
    if not any(p.numel() for p in params):
        return
    # empty tensors keep their rows (no chunks, never dereferenced), so sigma[t] is row t's
    # without a device-side gather
    bufs = momentum_buffers if use_momentum else [None] * len(params)
    ready = buffer_ready if use_momentum else [False] * len(params)
    table, n_chunks = fused_table(grads, params, bufs, [None] * len(params), offsets, ready,
                                  device)
    k, sig, u = _scalars(device, k, sigma, update_scale)
    hyper = torch.tensor([lr, weight_decay, momentum, 1 - dampening, 0, 0, 0, 0, 0],
                         dtype=torch.float64).to(device, non_blocking=True)
    dt = params[0].dtype
    acc = tl.float64 if dt == torch.float64 else tl.float32
    _launch(_fused_sgd_kernel, (n_chunks,), table, table[FIELDS * len(params):], k,
            sig if sig is not None else k, u if u is not None else k, hyper,
            seed_int64(seed), int(step) & 0xFFFFFFFF, int(modality) & 0x7FFFFFFF,
            BLOCK_C=BLOCK_C, DT=tl_dtype(dt), ACC=acc, NOISE=sig is not None,
            UPDATE=u is not None, MAXIMIZE=bool(maximize), DECAY=weight_decay != 0,
            MOMENTUM=use_momentum, NESTEROV=bool(nesterov), num_warps=WARPS)


def adam_(params, grads, exp_avgs, exp_avg_sqs, steps, offsets, k, sigma, update_scale, *, lr,
          beta1, beta2, eps, weight_decay, decoupled, maximize, seed, step, modality) -> None:
    """``reference_adam_``'s contract on one bucket (module docstring)."""
    from mmmod.reference.philox import seed_int64
    device = _check("fused_adam_", params, grads,
                    (("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs)), offsets)
    if device is None:
        return
    if len(steps) != len(params) or any(float(s) < 1 for s in steps):
        raise ValueError("mmmod.fused_adam_: one step count >= 1 per param (after this step's "
                         "increment)")
    if not any(p.numel() for p in params):
        return
    table, n_chunks = fused_table(grads, params, exp_avgs, exp_avg_sqs, offsets,
                                  [False] * len(params), device)
    k, sig, u = _scalars(device, k, sigma, update_scale)
    w1 = 1 - beta1
    # the Python float arithmetic of _single_tensor_adam, per tensor (steps may differ)
    bias = []
    for i in range(len(params)):
        t = float(steps[i])
        bias += [-(lr / (1 - beta1 ** t)), (1 - beta2 ** t) ** 0.5]
    dt = params[0].dtype
    acc = tl.float64 if dt == torch.float64 else tl.float32
    # values torch turns into the opmath type (float32 unless float64) before using them
    cast = (lambda v: v) if dt == torch.float64 else (
        lambda v: float(torch.tensor(v, dtype=torch.float32)))
    hyper = torch.tensor([cast(lr), cast(weight_decay), 0, 0, cast(w1), cast(beta2), cast(eps),
                          cast(1 - lr * weight_decay), cast(1 - beta2)],
                         dtype=torch.float64).to(device, non_blocking=True)
    bias_t = torch.tensor([cast(b) for b in bias], dtype=torch.float64).to(device,
                                                                           non_blocking=True)
    _launch(_fused_adam_kernel, (n_chunks,), table, table[FIELDS * len(params):], k,
            sig if sig is not None else k, u if u is not None else k, hyper, bias_t,
            seed_int64(seed), int(step) & 0xFFFFFFFF, int(modality) & 0x7FFFFFFF,
            BLOCK_C=BLOCK_C, DT=tl_dtype(dt), ACC=acc, NOISE=sig is not None,
            UPDATE=u is not None, MAXIMIZE=bool(maximize), DECAY=weight_decay != 0,
            DECOUPLED=bool(decoupled), SMALL_W=abs(w1) < 0.5, num_warps=WARPS)


__all__ = ["sgd_", "adam_", "fused_table", "BLOCK_C", "WARPS", "FIELDS"]
