"""Launchers of ops ``fused_sgd_`` / ``fused_adam_``: the fused modulated SGD / Adam update of
one bucket (kernels/fused_update_kernel.py; docs/fused.md), with ``reference_sgd_`` /
``reference_adam_``'s contract (mmmod/optim/fused.py). Each bucket's table is a
:class:`~mmmod.backends.triton.table.FusedTable` from the backend's table cache; scalars travel
in a float64 tensor (lr, weight decay, ...), Adam's per-tensor bias corrections in another."""
from __future__ import annotations

import torch

from ...reference.philox import seed_int64
from .launch import launch, on, tl_dtype

#: Philox counters per program (4 * BLOCK_C elements), warps per program
BLOCK_C = 256
WARPS = 4


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


def fused_sgd_(be, params, grads, momentum_buffers, buffer_ready, offsets, k, sigma,
               update_scale, lr, weight_decay, momentum, dampening, nesterov, maximize, seed,
               step, modality) -> None:
    """The op ``fused_sgd_`` (its schema's argument order)."""
    use_momentum = momentum != 0
    states = (("momentum_buffers", momentum_buffers),) if use_momentum else ()
    device = _check("fused_sgd_", params, grads, states, offsets)
    if device is None:
        return
    if not any(p.numel() for p in params):
        return
    with on(device):
        # empty tensors keep their rows (no chunks, never dereferenced), so sigma[t] is row t's
        # without a device-side gather
        bufs = momentum_buffers if use_momentum else [None] * len(params)
        ready = buffer_ready if use_momentum else [False] * len(params)
        tab = be.meta_cache.fused(grads, params, bufs, [None] * len(params), offsets, ready,
                                  BLOCK_C)
        k, sig, u = _scalars(device, k, sigma, update_scale)
        hyper = torch.tensor([lr, weight_decay, momentum, 1 - dampening, 0, 0, 0, 0, 0],
                             dtype=torch.float64).to(device, non_blocking=True)
        dt = params[0].dtype
        import triton.language as tl
        acc = tl.float64 if dt == torch.float64 else tl.float32
        launch(be.modules.fused_update._fused_sgd_kernel, (tab.n_chunks,), tab.table,
               tab.chunk_map, k, sig if sig is not None else k, u if u is not None else k,
               hyper, seed_int64(seed), int(step) & 0xFFFFFFFF, int(modality) & 0x7FFFFFFF,
               BLOCK_C=BLOCK_C, DT=tl_dtype(dt), ACC=acc, NOISE=sig is not None,
               UPDATE=u is not None, MAXIMIZE=bool(maximize), DECAY=weight_decay != 0,
               MOMENTUM=use_momentum, NESTEROV=bool(nesterov), num_warps=WARPS)


def fused_adam_(be, params, grads, exp_avgs, exp_avg_sqs, steps, offsets, k, sigma,
                update_scale, lr, beta1, beta2, eps, weight_decay, decoupled, maximize, seed,
                step, modality) -> None:
    """The op ``fused_adam_`` (its schema's argument order)."""
    device = _check("fused_adam_", params, grads,
                    (("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs)), offsets)
    if device is None:
        return
    if len(steps) != len(params) or any(float(s) < 1 for s in steps):
        raise ValueError("mmmod.fused_adam_: one step count >= 1 per param (after this step's "
                         "increment)")
    if not any(p.numel() for p in params):
        return
    with on(device):
        tab = be.meta_cache.fused(grads, params, exp_avgs, exp_avg_sqs, offsets,
                                  [False] * len(params), BLOCK_C)
        k, sig, u = _scalars(device, k, sigma, update_scale)
        w1 = 1 - beta1
        # the Python float arithmetic of _single_tensor_adam, per tensor (steps may differ)
        bias = []
        for i in range(len(params)):
            t = float(steps[i])
            bias += [-(lr / (1 - beta1 ** t)), (1 - beta2 ** t) ** 0.5]
        dt = params[0].dtype
        import triton.language as tl
        acc = tl.float64 if dt == torch.float64 else tl.float32
        # values torch turns into the opmath type (float32 unless float64) before using them
        cast = (lambda v: v) if dt == torch.float64 else (
            lambda v: float(torch.tensor(v, dtype=torch.float32)))
        hyper = torch.tensor([cast(lr), cast(weight_decay), 0, 0, cast(w1), cast(beta2),
                              cast(eps), cast(1 - lr * weight_decay), cast(1 - beta2)],
                             dtype=torch.float64).to(device, non_blocking=True)
        bias_t = torch.tensor([cast(b) for b in bias], dtype=torch.float64).to(
            device, non_blocking=True)
        launch(be.modules.fused_update._fused_adam_kernel, (tab.n_chunks,), tab.table,
               tab.chunk_map, k, sig if sig is not None else k, u if u is not None else k,
               hyper, bias_t, seed_int64(seed), int(step) & 0xFFFFFFFF,
               int(modality) & 0x7FFFFFFF, BLOCK_C=BLOCK_C, DT=tl_dtype(dt), ACC=acc,
               NOISE=sig is not None, UPDATE=u is not None, MAXIMIZE=bool(maximize),
               DECAY=weight_decay != 0, DECOUPLED=bool(decoupled), SMALL_W=abs(w1) < 0.5,
               num_warps=WARPS)
