"""The one ``torch.library.Library`` of the ``mmmod`` namespace and the helper that defines an
op on it: schema, fake (meta) implementation for torch.compile and ``opcheck``, and the
plain-torch reference (mmmod/reference) as the default ``CompositeExplicitAutograd`` kernel.

The compiled extensions only add device kernels over these definitions
(``TORCH_LIBRARY_IMPL(mmmod, CPU|CUDA, m)`` in csrc/), so loading them never re-defines an op;
Python backends add theirs with :func:`register_kernel`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

NAMESPACE = "mmmod"


@dataclass(frozen=True)
class OpDef:
    """One op: ``name`` as the schema spells it (``"modulate_.capturable"`` is an overload)."""
    name: str
    schema: str
    reference: Callable | None
    fake: Callable


#: op name -> its definition, in definition order
OPS: dict[str, OpDef] = {}

# FRAGMENT: the namespace is shared with the extensions' TORCH_LIBRARY_IMPL blocks; this object
# lives as long as the module (dropping it would remove what it registered)
LIB = torch.library.Library(NAMESPACE, "FRAGMENT")


def _split(name: str) -> tuple[str, str]:
    base, _, overload = name.partition(".")
    return base, overload or "default"


def overload(name: str):
    """The ``torch.ops.mmmod`` overload packet entry of op ``name`` (the op as the dispatcher
    calls it: the kernel registered for the tensors' dispatch key runs)."""
    base, ov = _split(name)
    return getattr(getattr(torch.ops.mmmod, base), ov)


def _registered(name: str) -> bool:
    try:
        overload(name)
    except (AttributeError, RuntimeError):
        return False
    return True


def define(name: str, schema: str, reference: Callable | None, fake: Callable) -> None:
    """Define op ``name`` once: its schema, its ``reference`` (None: no default kernel, e.g. a
    CUDA-only op) and its ``fake``. A second definition of the same name is refused; an op the
    dispatcher already holds (this module reloaded) is recorded without re-registering."""
    if name in OPS:
        raise ValueError(f"mmmod op {name!r} is defined already")
    if not schema.startswith(name + "("):
        raise ValueError(f"the schema of mmmod op {name!r} must start with {name + '('!r}")
    OPS[name] = OpDef(name, schema, reference, fake)
    if _registered(name):
        return
    LIB.define(schema)
    if reference is not None:
        LIB.impl(name, reference, "CompositeExplicitAutograd")
    torch.library.register_fake(f"{NAMESPACE}::{name}", fake, lib=LIB)


def register_kernel(name: str, fn: Callable, dispatch_key: str) -> None:
    """Register a Python kernel (a function with the op's signature) of op ``name`` for
    ``dispatch_key`` (e.g. the Triton kernels as ``CUDA`` when the CUDA extension is absent)."""
    if name not in OPS:
        raise ValueError(f"mmmod defines no op {name!r}")
    LIB.impl(name, fn, dispatch_key)


def register_kernels(dispatch_key: str, kernels: dict) -> None:
    """:func:`register_kernel` for every (op name -> function) of ``kernels``, every name
    checked first."""
    for name in kernels:
        if name not in OPS:
            raise ValueError(f"mmmod defines no op {name!r}")
    for name, fn in kernels.items():
        LIB.impl(name, fn, dispatch_key)


# a constant while a graph is traced: torch.compile calls it once at trace time instead of
# breaking the graph on a torch._C query that returns a bool (the first kernel resolution of a
# backend can happen inside a compiled region)
@torch.compiler.assume_constant_result
def has_kernel(name: str, dispatch_key: str) -> bool:
    """Whether a kernel for ``dispatch_key`` is registered for op ``name`` (not counting the
    reference default): a binary built before an op existed has none."""
    base, ov = _split(name)
    qual = f"{NAMESPACE}::{base}" + ("" if ov == "default" else f".{ov}")
    return torch._C._dispatch_has_kernel_for_dispatch_key(qual, dispatch_key)
