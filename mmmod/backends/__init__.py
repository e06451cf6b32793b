"""Compute backends: the registry, the ``"auto"`` choice and the resolver of kernels.

Built in: ``torch`` (the reference of every op, any device), ``cpu`` and ``cuda`` (the compiled
extensions), ``triton``. ``auto`` picks, for the device the data lives on, the compiled
``cuda`` extension, else ``triton``, else ``torch`` on GPUs; the compiled ``cpu`` extension,
else ``torch`` on CPU (their priorities). More backends: :func:`register_backend`
(docs/architecture.md, "Add a backend").
"""
from __future__ import annotations

from .. import _ops  # noqa: F401  (defines torch.ops.mmmod before any binary loads)
from .base import Backend
from .registry import (BACKENDS, _declare_builtin, get, kernel, names, register_backend, status,
                       unregister_backend)
from .registry import _instances, _load, _resolved  # noqa: F401  (the test suite's handles)
from .torch_backend import TorchBackend

register_backend(TorchBackend())
# imported on first use (Triton, the extensions); priority and devices declared here for "auto"
_declare_builtin("triton", "mmmod.backends.triton", "TritonBackend", 20, ("cuda",))
_declare_builtin("cpu", "mmmod.backends.extension_backend", "CpuBackend", 30, ("cpu",))
_declare_builtin("cuda", "mmmod.backends.extension_backend", "CudaBackend", 30, ("cuda",))

__all__ = ["BACKENDS", "Backend", "TorchBackend", "get", "kernel", "names", "register_backend",
           "status", "unregister_backend"]
