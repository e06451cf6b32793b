"""The fused modulated-update operators (``torch.ops.mmmod.fused_sgd_`` / ``fused_adam_``).

Defined here, once, from Python, as :mod:`mmmod.ops` defines the modulation ops: a schema, a
fake (meta) implementation, and the plain-torch reference of :mod:`mmmod.optim.fused` as the
default (``CompositeExplicitAutograd``) implementation. The compiled extension adds a CPU kernel
(csrc/fused_update_cpu.cpp) with ``TORCH_LIBRARY_IMPL(mmmod, CPU, m)``.

One call updates one bucket (tensors of one modality, device, dtype and param group): per
element it modulates the gradient in registers (``k g + sigma_i n``, or ``k g``), never writing
it back, then applies torch's SGD or Adam/AdamW update to the parameter and its state.
``k`` and ``update_scale`` are 0-d float32 device tensors, ``sigma`` a float32 [T] device tensor
(already gated: 0 where the step's modulation is skipped), so no op reads a device value on the
host. See docs/fused.md.
"""
from __future__ import annotations

import torch

from . import ops as _ops  # noqa: F401  (the namespace and its library object)

NAMESPACE = "mmmod"

SCHEMAS = {
    # torch.optim.SGD's step on params with the modulated gradient; momentum_buffers is empty
    # when momentum is 0, buffer_ready[i] False makes buffer i start as the gradient (torch's
    # first step)
    "fused_sgd_": (
        "fused_sgd_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, "
        "bool[] buffer_ready, int[] offsets, Tensor k, Tensor? sigma, Tensor? update_scale, "
        "float lr, float weight_decay, float momentum, float dampening, bool nesterov, "
        "bool maximize, int seed, int step, int modality) -> ()"),
    # torch.optim.Adam / AdamW (decoupled) step; steps[i] is tensor i's step count after this
    # step's increment (the caller advances state["step"])
    "fused_adam_": (
        "fused_adam_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
        "Tensor(c!)[] exp_avg_sqs, float[] steps, int[] offsets, Tensor k, Tensor? sigma, "
        "Tensor? update_scale, float lr, float beta1, float beta2, float eps, "
        "float weight_decay, bool decoupled, bool maximize, int seed, int step, "
        "int modality) -> ()"),
}


def _defined() -> bool:
    try:
        torch.ops.mmmod.fused_sgd_.default  # noqa: B018
    except (AttributeError, RuntimeError):
        return False
    return True


def _sgd_ref(params, grads, momentum_buffers, buffer_ready, offsets, k, sigma, update_scale, lr,
             weight_decay, momentum, dampening, nesterov, maximize, seed, step, modality):
    from .optim import fused
    fused.reference_sgd_(params, grads, momentum_buffers, buffer_ready, offsets, k, sigma,
                         update_scale, lr=lr, weight_decay=weight_decay, momentum=momentum,
                         dampening=dampening, nesterov=nesterov, maximize=maximize, seed=seed,
                         step=step, modality=modality)


def _adam_ref(params, grads, exp_avgs, exp_avg_sqs, steps, offsets, k, sigma, update_scale, lr,
              beta1, beta2, eps, weight_decay, decoupled, maximize, seed, step, modality):
    from .optim import fused
    fused.reference_adam_(params, grads, exp_avgs, exp_avg_sqs, steps, offsets, k, sigma,
                          update_scale, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                          weight_decay=weight_decay, decoupled=decoupled, maximize=maximize,
                          seed=seed, step=step, modality=modality)


def _fake(*args):
    return None


_lib = torch.library.Library(NAMESPACE, "FRAGMENT")
if not _defined():
    for _name, _schema in SCHEMAS.items():
        _lib.define(_schema)
    for _name, _ref in (("fused_sgd_", _sgd_ref), ("fused_adam_", _adam_ref)):
        _lib.impl(_name, _ref, "CompositeExplicitAutograd")
        torch.library.register_fake(f"{NAMESPACE}::{_name}", _fake, lib=_lib)


def has_kernel(name: str, dispatch_key: str) -> bool:
    """Whether a compiled kernel for ``dispatch_key`` is registered for op ``name`` (a binary
    built before the fused sources existed has none)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::{name}", dispatch_key)
