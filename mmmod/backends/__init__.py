"""Backend registry and the ``"auto"`` choice.

``auto`` picks, for the device the data lives on: the compiled ``cuda`` extension, else
``triton``, else ``torch`` on GPUs; the compiled ``cpu`` extension, else ``torch`` on CPU. A
fused backend that cannot be loaded is reported once with a warning naming why.

A name is resolved once per (name, device, device_step) and the result cached: the functional
API and the optimizer look a backend up for every bucket of every step. The key also holds
what else an answer depends on (the ``status`` function in use; TRITON_INTERPRET for triton;
the extensions' availability is fixed once ``mmmod._ext`` has loaded them), and the cache is
dropped when a backend instance is replaced.
"""
from __future__ import annotations

import importlib
import os
import warnings

import torch

from .. import ops as _ops  # noqa: F401  (defines torch.ops.mmmod before any binary loads)
from .base import Backend
from .torch_backend import TorchBackend

BACKENDS = ("auto", "torch", "triton", "cpu", "cuda")
# module and class for each backend that lives outside this file (imported lazily)
_LAZY = {
    "triton": ("mmmod.backends.triton_backend", "TritonBackend"),
    "cpu": ("mmmod.backends.extension_backend", "CpuBackend"),
    "cuda": ("mmmod.backends.extension_backend", "CudaBackend"),
}
_resolved: dict[tuple, Backend] = {}


class _Instances(dict):
    """The loaded backends by name; replacing one (tests do) drops every cached resolution."""

    def __setitem__(self, key, value):
        _resolved.clear()
        super().__setitem__(key, value)

    def __delitem__(self, key):
        _resolved.clear()
        super().__delitem__(key)


_instances: dict[str, Backend] = _Instances(torch=TorchBackend())
_warned: set[str] = set()


def _load(name: str) -> Backend | None:
    if name in _instances:
        return _instances[name]
    module, cls = _LAZY[name]
    try:
        inst = getattr(importlib.import_module(module), cls)()
    except ImportError:  # the module itself is not there yet
        return None
    _instances[name] = inst
    return inst


def status(name: str) -> tuple[bool, str]:
    """(live, reason) for a named backend, without raising."""
    if name not in BACKENDS or name == "auto":
        return False, f"unknown backend {name!r}"
    inst = _load(name)
    if inst is None:
        return False, f"backend {name!r} is not part of this build"
    return inst.available()


def get(name: str, device: torch.device | str | None = None, *,
        device_step: bool = False) -> Backend:
    """Resolve a backend name (``"auto"`` included) for data on ``device``.

    ``device_step``: the caller passes the Philox step as a device tensor (a CUDA-graph
    capturable step); ``auto`` then skips backends that would need its value on the host."""
    key = (name, device, device_step, status)
    if name == "triton":  # whether it runs on CPU tensors is decided by TRITON_INTERPRET
        key += (os.environ.get("TRITON_INTERPRET"),)
    try:
        hit = _resolved.get(key)
    except TypeError:  # an unhashable argument: refused below
        hit = key = None
    if hit is not None:
        return hit
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")
    dev = device if isinstance(device, torch.device) else torch.device(device or "cpu")
    impl = _resolve(name, dev, device_step)
    if key is not None:
        _resolved[key] = impl
    return impl


def _resolve(name: str, device: torch.device, device_step: bool) -> Backend:
    if name == "auto":
        return _auto(device, device_step)
    live, why = status(name)
    if not live:
        raise RuntimeError(f"mmmod backend {name!r} is not available: {why}")
    inst = _instances[name]
    if not inst.supports(device):
        raise RuntimeError(f"mmmod backend {name!r} cannot run on device {device}")
    return inst


def _auto(device: torch.device, device_step: bool = False) -> Backend:
    order = ("cuda", "triton") if device.type == "cuda" else ("cpu",)
    reasons = []
    for name in order:
        live, why = status(name)
        if live and _instances[name].supports(device):
            if device_step and not _instances[name].device_step:
                continue  # chosen quietly by the next in order (triton); not a missing backend
            return _instances[name]
        reasons.append(f"{name}: {why or 'does not support ' + str(device)}")
    key = device.type
    if key not in _warned:
        _warned.add(key)
        warnings.warn("mmmod: no fused backend for " + key + " (" + "; ".join(reasons)
                      + "); using the plain-torch reference backend", RuntimeWarning, stacklevel=4)
    return _instances["torch"]
