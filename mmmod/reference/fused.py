"""The fused modulated update of one bucket (``mmmod::fused_sgd_`` / ``fused_adam_``), in
plain torch: the definition every kernel is tested against.

``reference_sgd_`` / ``reference_adam_`` apply the very tensor operations of torch's
``_single_tensor_sgd`` / ``_single_tensor_adam`` to the modulated gradient ``k g + sigma_i n``
(or ``k g``), so they equal "modulate, then torch's step" bit for bit. The gradient itself is
not written. See docs/fused.md.
"""
from __future__ import annotations

import torch

from .philox import CHUNK, philox_normal


def modulated_grad(g: torch.Tensor, k: torch.Tensor, sigma_i, seed: int, step, modality: int,
                   offset: int) -> torch.Tensor:
    """``k g + sigma_i n`` (or ``k g`` when ``sigma_i`` is None) in float32, cast to g's dtype:
    what ``mmmod.reference.modulate_bucket_`` writes into g, as a new tensor."""
    flat = g.detach().reshape(-1)
    out = torch.empty_like(flat)
    kf = k.float()
    for s in range(0, flat.numel(), CHUNK):
        part = flat[s:s + CHUNK]
        if sigma_i is None:
            out[s:s + CHUNK] = part.float() * kf
        else:
            z = philox_normal(seed, step, modality, offset + s, part.numel(), g.device)
            out[s:s + CHUNK] = part.float() * kf + sigma_i * z
    return out.view(g.shape)


@torch.no_grad()
def reference_sgd_(params, grads, momentum_buffers, buffer_ready, offsets, k, sigma, update_scale,
                   *, lr, weight_decay, momentum, dampening, nesterov, maximize, seed, step,
                   modality) -> None:
    """torch's ``_single_tensor_sgd`` on the modulated gradients, op for op."""
    for i, (p, g) in enumerate(zip(params, grads)):
        grad = modulated_grad(g, k, None if sigma is None else sigma[i], seed, step, modality,
                              offsets[i])
        p0 = p.clone() if update_scale is not None else None
        if maximize:
            grad = -grad
        if weight_decay != 0:
            grad = grad.add(p, alpha=weight_decay)
        if momentum != 0:
            buf = momentum_buffers[i]
            if not buffer_ready[i]:
                buf.copy_(grad)
            else:
                buf.mul_(momentum).add_(grad, alpha=1 - dampening)
            grad = grad.add(buf, alpha=momentum) if nesterov else buf
        p.add_(grad, alpha=-lr)
        if p0 is not None:
            _scale_update_(p, p0, update_scale)


@torch.no_grad()
def reference_adam_(params, grads, exp_avgs, exp_avg_sqs, steps, offsets, k, sigma, update_scale,
                    *, lr, beta1, beta2, eps, weight_decay, decoupled, maximize, seed, step,
                    modality) -> None:
    """torch's ``_single_tensor_adam`` (non-capturable, amsgrad off) on the modulated
    gradients, op for op; ``steps[i]`` is the step count after this step's increment."""
    for i, (p, g) in enumerate(zip(params, grads)):
        grad = modulated_grad(g, k, None if sigma is None else sigma[i], seed, step, modality,
                              offsets[i])
        p0 = p.clone() if update_scale is not None else None
        if maximize:
            grad = -grad
        if weight_decay != 0:
            if decoupled:
                p.mul_(1 - lr * weight_decay)
            else:
                grad = grad.add(p, alpha=weight_decay)
        exp_avg, exp_avg_sq = exp_avgs[i], exp_avg_sqs[i]
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        t = float(steps[i])
        bias_correction1 = 1 - beta1 ** t
        bias_correction2 = 1 - beta2 ** t
        step_size = lr / bias_correction1
        bias_correction2_sqrt = bias_correction2 ** 0.5
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        p.addcdiv_(exp_avg, denom, value=-step_size)
        if p0 is not None:
            _scale_update_(p, p0, update_scale)


def _scale_update_(p, p0, u):
    """p <- p0 + u (p - p0): ``update.scale_updates``' arithmetic for one tensor."""
    p.sub_(p0)
    p.mul_(u.to(p.device))
    p.add_(p0)
