"""The reference of every mmmod op, with the op's own signature (mmmod/_ops: the schemas).

Each function here takes exactly the arguments of its op's schema and is that op's default
(``CompositeExplicitAutograd``) implementation, the kernel of ``backend="torch"``, and the
fallback of any backend that has no kernel for the op. :data:`REFERENCES` maps op names to
them; the definitions themselves live in the modules beside this one.
"""
from __future__ import annotations

import torch

from . import combine, fused, moments, proximal
from .coefficients import coefficients as _coefficients
from .modulate import modulate_bucket_, modulate_sigma_bucket_, tensor_std
from .philox import philox_normal
from .scores import scores as _scores


def scores(logits, labels):
    out = _scores(logits, labels)
    return out.to(labels.device) if len(logits) == 0 else out


def coefficients(scores, rule, alpha, beta_max):
    return _coefficients(scores, rule, alpha, beta_max)


def modulate_(tensors, offsets, k, gate, noise, scaled, seed, step, modality):
    modulate_bucket_(tensors, offsets, k, gate, noise=noise, noise_std="scaled" if scaled else "raw",
                     seed=seed, step=step, modality=modality)


def modulate_capturable(tensors, offsets, k, gate, noise, scaled, seed, step, modality,
                        table=None, step_tensor=None):
    # the table only says where the tensors live: the reference walks the tensors themselves
    modulate_(tensors, offsets, k, gate, noise, scaled, seed,
              step if step_tensor is None else step_tensor, modality)


def modulate_sigma_(tensors, offsets, k, gate, sigma, seed, step, modality, table=None,
                    step_tensor=None):
    modulate_sigma_bucket_(tensors, offsets, k, gate, sigma, seed=seed,
                           step=step if step_tensor is None else step_tensor, modality=modality)


def bucket_std(tensors):
    out = [tensor_std(t) for t in tensors]
    if not out:
        return torch.zeros(0, dtype=torch.float64)
    return torch.stack([s.to(out[0].device) for s in out])


def bucket_moments(tensors):
    return moments.bucket_moments(list(tensors))


def philox_normal_(out, seed, step, modality, offset):
    out.copy_(philox_normal(seed, step, modality, offset, out.numel(), out.device).view(out.shape))


def proximal_(grads, params, snapshots, beta):
    proximal.check_inputs(grads, params, snapshots, beta)
    return proximal.proximal_(grads, params, snapshots, beta)


def pair_moments(fused, summed, fused_scale=None):
    combine.check_pair_inputs("mmmod._pair_moments", fused, summed, fused_scale)
    out = combine.pair_moments(fused, summed, fused_scale)
    return out.to(summed[0].device) if len(summed) == 0 else out


def combine_(summed, fused, moments, groups, gamma, fused_scale=None):
    combine.check_pair_inputs("mmmod.combine_", fused, summed, fused_scale)
    if moments is not None:
        combine.check_moments("mmmod.combine_", summed, moments)
    combine.check_groups("mmmod.combine_", summed, groups)
    if moments is None:
        moments = combine.pair_moments(fused, summed, fused_scale)
    return combine.weights_and_combine_(fused, summed, moments, gamma, fused_scale, groups)


def fused_sgd_(params, grads, momentum_buffers, buffer_ready, offsets, k, sigma, update_scale, lr,
               weight_decay, momentum, dampening, nesterov, maximize, seed, step, modality):
    fused.reference_sgd_(params, grads, momentum_buffers, buffer_ready, offsets, k, sigma,
                         update_scale, lr=lr, weight_decay=weight_decay, momentum=momentum,
                         dampening=dampening, nesterov=nesterov, maximize=maximize, seed=seed,
                         step=step, modality=modality)


def fused_adam_(params, grads, exp_avgs, exp_avg_sqs, steps, offsets, k, sigma, update_scale, lr,
                beta1, beta2, eps, weight_decay, decoupled, maximize, seed, step, modality):
    fused.reference_adam_(params, grads, exp_avgs, exp_avg_sqs, steps, offsets, k, sigma,
                          update_scale, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                          weight_decay=weight_decay, decoupled=decoupled, maximize=maximize,
                          seed=seed, step=step, modality=modality)


#: op name (as in its schema) -> its reference; ``bucket_table`` (a CUDA kernel's device
#: metadata) has none
REFERENCES = {
    "scores": scores,
    "coefficients": coefficients,
    "modulate_": modulate_,
    "modulate_.capturable": modulate_capturable,
    "modulate_sigma_": modulate_sigma_,
    "_bucket_std": bucket_std,
    "_bucket_moments": bucket_moments,
    "_philox_normal_": philox_normal_,
    "proximal_": proximal_,
    "_pair_moments": pair_moments,
    "combine_": combine_,
    "fused_sgd_": fused_sgd_,
    "fused_adam_": fused_adam_,
}
