"""The backend registry, the ``"auto"`` choice, and the one resolver of kernels.

:func:`register_backend` adds a backend (the built-in ones are registered by name and imported
on first use, so importing mmmod never imports Triton). ``auto`` picks, for the device the data
lives on, the live backend of highest :attr:`Backend.priority` (above 0) that runs there; when
none does, the plain-torch reference, with one warning naming why each candidate is not live.

:func:`kernel` is the only way a caller reaches a kernel: the named (or ``auto``-chosen)
backend's kernel of the op for that device, or the op's reference (mmmod/reference/ops.py)
with one warning per backend and op where the backend has none.

A name is resolved once per (name, device, device_step) and the result cached: the functional
API and the optimizer look a backend up for every bucket of every step. The key also holds
what else an answer depends on (the ``status`` function in use; TRITON_INTERPRET, on which
some backends' device support depends; the extensions' availability is fixed once
``mmmod._ext`` has loaded them), and the cache is dropped when the registry changes.
"""
from __future__ import annotations

import importlib
import os
import warnings
from collections.abc import Sequence
from typing import Callable

import torch

from ..reference.ops import REFERENCES

_resolved: dict[tuple, object] = {}  # -> Backend (mmmod/backends/base.py)
_kernels: dict[tuple, Callable] = {}
_warned: set = set()
#: name -> (module, class) of the built-in backends not imported yet
_lazy: dict[str, tuple[str, str]] = {}


class _Instances(dict):
    """The loaded backends by name; replacing one (tests do) drops every cached resolution."""

    def __setitem__(self, key, value):
        _resolved.clear()
        _kernels.clear()
        super().__setitem__(key, value)

    def __delitem__(self, key):
        _resolved.clear()
        _kernels.clear()
        super().__delitem__(key)


_instances: dict[str, object] = _Instances()
#: every registered name, in registration order (the built-in ones first)
_order: list[str] = []


class _Names(Sequence):
    """``"auto"`` followed by every registered backend name, live: a backend registered later
    is part of it (what ``ModulatedOptimizer(backend=)`` accepts)."""

    def __getitem__(self, i):
        return ("auto", *_order)[i]

    def __len__(self):
        return 1 + len(_order)

    def __repr__(self):
        return repr(tuple(self))


BACKENDS = _Names()


def register_backend(backend, *, replace: bool = False):
    """Register a backend instance under ``backend.name``; ``ModulatedOptimizer(backend=name)``
    and the functional API then accept the name. A name taken already is refused unless
    ``replace``. Returns the backend."""
    if not all(callable(getattr(backend, a, None)) for a in ("op_kernel", "available", "supports")):
        raise TypeError(f"register_backend takes a mmmod.backends.Backend instance, got "
                        f"{type(backend).__name__}")
    name = backend.name
    if not isinstance(name, str) or not name or name == "auto":
        raise ValueError(f"a backend needs a name other than 'auto', got {name!r}")
    if (name in _instances or name in _lazy) and not replace:
        raise ValueError(f"a backend named {name!r} is registered already (replace=True to "
                         f"replace it)")
    for op in getattr(backend, "kernels", {}):
        if op not in REFERENCES and op != "bucket_table":
            raise ValueError(f"backend {name!r} has a kernel for {op!r}, which is no mmmod op")
    _lazy.pop(name, None)
    if name not in _order:
        _order.append(name)
    _instances[name] = backend
    return backend


def unregister_backend(name: str) -> None:
    """Remove a backend registered with :func:`register_backend`."""
    if name not in _order:
        raise ValueError(f"no backend named {name!r} is registered")
    _order.remove(name)
    _lazy.pop(name, None)
    if name in _instances:
        del _instances[name]
    _warned.difference_update({w for w in _warned if w[0] == name})


def _register_builtin(name: str, module: str, cls: str) -> None:
    _lazy[name] = (module, cls)
    _order.append(name)


def _load(name: str):
    inst = _instances.get(name)
    if inst is not None:
        return inst
    if name not in _lazy:
        return None
    module, cls = _lazy[name]
    try:
        inst = getattr(importlib.import_module(module), cls)()
    except ImportError:  # the module itself is not there
        return None
    _instances[name] = inst
    return inst


def status(name: str) -> tuple[bool, str]:
    """(live, reason) for a named backend, without raising."""
    if name not in _order:
        return False, f"unknown backend {name!r}"
    inst = _load(name)
    if inst is None:
        return False, f"backend {name!r} is not part of this build"
    return inst.available()


def names() -> tuple[str, ...]:
    """Every registered backend name (``"auto"`` not included)."""
    return tuple(_order)


def get(name, device: torch.device | str | None = None, *, device_step: bool = False):
    """Resolve a backend name (``"auto"`` included) for data on ``device``.

    ``device_step``: the caller passes the Philox step as a device tensor (a CUDA-graph
    capturable step); ``auto`` then skips backends that would need its value on the host."""
    if not isinstance(name, str) and callable(getattr(name, "op_kernel", None)):
        return name  # resolved already
    key = (name, device, device_step, status, os.environ.get("TRITON_INTERPRET"))
    try:
        hit = _resolved.get(key)
    except TypeError:  # an unhashable argument: refused below
        hit = key = None
    if hit is not None:
        return hit
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {tuple(BACKENDS)}")
    dev = device if isinstance(device, torch.device) else torch.device(device or "cpu")
    impl = _resolve(name, dev, device_step)
    if key is not None:
        _resolved[key] = impl
    return impl


def _resolve(name: str, device: torch.device, device_step: bool):
    if name == "auto":
        return _auto(device, device_step)
    live, why = status(name)
    if not live:
        raise RuntimeError(f"mmmod backend {name!r} is not available: {why}")
    inst = _instances[name]
    if not inst.supports(device):
        raise RuntimeError(f"mmmod backend {name!r} cannot run on device {device}")
    return inst


def _candidates(device: torch.device) -> list[str]:
    """Registered names ``auto`` considers for ``device``, highest priority first (ties in
    registration order)."""
    out = []
    for name in _order:
        if name in _lazy and name not in _instances:
            prio, devices = _LAZY_DECLARED[name]
        else:
            inst = _instances[name]
            prio, devices = inst.priority, inst.devices
        if prio > 0 and device.type in devices:
            out.append((-prio, len(out), name))
    return [n for _, _, n in sorted(out)]


def _auto(device: torch.device, device_step: bool = False):
    reasons = []
    for name in _candidates(device):
        live, why = status(name)
        if live and _instances[name].supports(device):
            if device_step and not _instances[name].device_step:
                continue  # chosen quietly by the next in order; not a missing backend
            return _instances[name]
        reasons.append(f"{name}: {why or 'does not support ' + str(device)}")
    key = device.type
    if key not in _warned:
        _warned.add(key)
        warnings.warn("mmmod: no fused backend for " + key + " (" + "; ".join(reasons)
                      + "); using the plain-torch reference backend", RuntimeWarning, stacklevel=4)
    return _instances["torch"]


def kernel(op: str, backend="auto", device: torch.device | str | None = None,
           *, device_step: bool = False) -> Callable:
    """The kernel of ``op`` (a function with the op's schema signature) that ``backend`` (a
    name, ``"auto"``, or a resolved :class:`Backend`) runs for data on ``device``; the op's
    reference, with one warning, where that backend has no kernel for it."""
    # the step path asks for the same few kernels every step: one dict lookup answers a repeated
    # question (its key holds what resolution depends on; cleared with every cached resolution)
    quick = (op, backend, device, device_step, status, os.environ.get("TRITON_INTERPRET")) \
        if isinstance(backend, str) and isinstance(device, torch.device) else None
    if quick is not None:
        fn = _kernels.get(quick)
        if fn is not None:
            return fn
    impl = get(backend, device, device_step=device_step)
    dev = device if isinstance(device, torch.device) else torch.device(device or "cpu")
    key = (op, id(impl), dev)
    fn = _kernels.get(key)
    if fn is not None:
        if quick is not None:
            _kernels[quick] = fn
        return fn
    if op not in REFERENCES and op != "bucket_table":
        raise ValueError(f"mmmod defines no op {op!r}")
    fn = impl.op_kernel(op, dev)
    if fn is None:
        fn = REFERENCES.get(op)
        if fn is None:
            raise RuntimeError(f"mmmod backend {impl.name!r} has no kernel for {op!r} on "
                               f"{dev.type}, and the op has no reference")
        if (impl.name, op) not in _warned:
            _warned.add((impl.name, op))
            warnings.warn(f"mmmod backend {impl.name!r} has no kernel for {op!r} on {dev.type}; "
                          f"running the op's plain-torch reference", RuntimeWarning, stacklevel=3)
    _kernels[key] = fn
    if quick is not None:
        _kernels[quick] = fn
    return fn


#: the priority and device types of the built-in backends, declared before their modules are
#: imported (``auto`` orders candidates without importing them)
_LAZY_DECLARED: dict[str, tuple[int, tuple]] = {}


def _declare_builtin(name: str, module: str, cls: str, priority: int, devices: tuple) -> None:
    _register_builtin(name, module, cls)
    _LAZY_DECLARED[name] = (priority, devices)


def forget_kernels() -> None:
    """Drop the resolved kernels (a backend whose kernels changed route calls this)."""
    _kernels.clear()
