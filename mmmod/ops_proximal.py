"""InfoReg's proximal correction as an operator (``torch.ops.mmmod.proximal_``).

Defined here, once, from Python, as :mod:`mmmod.ops` defines the modulation ops: a schema, a
fake (meta) implementation, and the plain-torch reference (``proximal_`` of
:mod:`mmmod.methods.inforeg`) as the default (``CompositeExplicitAutograd``) implementation.
The compiled extensions add device kernels with ``TORCH_LIBRARY_IMPL``: csrc/proximal_cpu.cpp
(CPU) and csrc/proximal.cu + csrc/proximal_cuda.cpp (CUDA). On a GPU without the CUDA
extension the default implementation runs the Triton kernels of kernels/proximal_kernel.py.

One call corrects one modality's selected gradients in one pass per element::

    g <- g + beta (theta - theta_snapshot)      (float32 arithmetic, rounded to g's dtype)

and returns the Fisher increment ``sum over tensors of >= 2 dims of mean(g_new^2)`` as a 0-d
float64 tensor on beta's device. ``beta`` is a one-element float tensor on the tensors' device,
read by the kernels (no host sync); the fused kernels leave every gradient bit-identical when
it is 0 (they do not store). Tensors with no gradient are left out by the caller (the schema
holds no ``None``); empty tensors contribute nothing.
"""
from __future__ import annotations

import torch

from . import ops as _ops  # noqa: F401  (the namespace and its library object)

NAMESPACE = "mmmod"

SCHEMAS = {
    # in place on grads; returns the Fisher increment (float64, 0-d, on beta's device)
    "proximal_": ("proximal_(Tensor(a!)[] grads, Tensor[] params, Tensor[] snapshots, "
                  "Tensor beta) -> Tensor"),
}

#: dtypes the fused kernels take (g, theta and the snapshot share one per tensor)
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_inputs(grads, params, snapshots, beta) -> None:
    """The checks every implementation makes before anything is written (a ValueError or
    TypeError naming the bad argument)."""
    if not (len(grads) == len(params) == len(snapshots)):
        raise ValueError(f"mmmod.proximal_: {len(grads)} grads, {len(params)} params and "
                         f"{len(snapshots)} snapshots; expected one of each per tensor")
    if not isinstance(beta, torch.Tensor) or beta.numel() != 1 \
            or not beta.dtype.is_floating_point:
        raise ValueError("mmmod.proximal_: beta must be a one-element floating-point tensor")
    for i, (g, p, p0) in enumerate(zip(grads, params, snapshots)):
        if g.shape != p.shape or p0.shape != p.shape:
            raise ValueError(f"mmmod.proximal_: tensor {i}: grad {tuple(g.shape)}, param "
                             f"{tuple(p.shape)} and snapshot {tuple(p0.shape)} differ in shape")
        if not (g.dtype == p.dtype == p0.dtype) or g.dtype not in DTYPES:
            raise TypeError(f"mmmod.proximal_: tensor {i}: grad {g.dtype}, param {p.dtype}, "
                            f"snapshot {p0.dtype}; expected one dtype among float32, float16, "
                            f"bfloat16, float64")
        if not (g.device == p.device == p0.device == beta.device):
            raise ValueError(f"mmmod.proximal_: tensor {i}: grad on {g.device}, param on "
                             f"{p.device}, snapshot on {p0.device}, beta on {beta.device}; "
                             f"expected one device")


def _defined() -> bool:
    try:
        torch.ops.mmmod.proximal_.default  # noqa: B018
    except (AttributeError, RuntimeError):
        return False
    return True


def _triton_usable(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        import triton  # noqa: F401
    except Exception:  # ImportError or a broken install: the reference stands in
        return False
    return True


def _proximal_default(grads, params, snapshots, beta):
    check_inputs(grads, params, snapshots, beta)
    # reached on CUDA only when no compiled CUDA kernel is registered: Triton's, when it is there
    if grads and _triton_usable(grads[0].device):
        from .backends.triton_backend import _load_kernels
        _load_kernels()
        from mmmod.kernels import proximal_kernel
        return proximal_kernel.proximal_(grads, params, snapshots, beta)
    from .methods.inforeg import proximal_ as reference
    return reference(grads, params, snapshots, beta)


def _proximal_fake(grads, params, snapshots, beta):
    return beta.new_empty((), dtype=torch.float64)


_lib = torch.library.Library(NAMESPACE, "FRAGMENT")
if not _defined():
    for _name, _schema in SCHEMAS.items():
        _lib.define(_schema)
    _lib.impl("proximal_", _proximal_default, "CompositeExplicitAutograd")
    torch.library.register_fake(f"{NAMESPACE}::proximal_", _proximal_fake, lib=_lib)


def has_kernel(dispatch_key: str) -> bool:
    """Whether a compiled kernel for ``dispatch_key`` is registered (a binary built before
    csrc/proximal_* existed has none: the default implementation runs instead)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::proximal_",
                                                          dispatch_key)
