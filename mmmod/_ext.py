"""Loader of the compiled extension: ``mmmod._C`` (CPU ops) and ``mmmod._C_cuda`` (CUDA ops).

Importing this module never fails. :func:`load` returns the loaded module or ``None`` with a
reason that says how to build, and refuses a *stale* build: one compiled against another torch
version, or (in a source checkout) from ``csrc/`` sources that changed since. The build record
is compiled into each binary (``build_info()``) and mirrored in ``mmmod/_build_info.json``.

This file is also loaded by ``setup.py`` as a plain file (for :func:`source_hash`), so it
imports nothing from mmmod and torch only inside functions.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import threading

BUILD_HINT = ("build it with `MAX_JOBS=2 pip install -e . --no-build-isolation` (or "
              "`python setup.py build_ext --inplace`) in the mmmod source tree")
_PKG = os.path.dirname(os.path.abspath(__file__))
_CSRC = os.path.join(os.path.dirname(_PKG), "csrc")
_lock = threading.Lock()
_cache: dict[str, tuple[object, str]] = {}

def source_hash(csrc: str) -> str:
    """sha256 (16 hex digits) over the names and bytes of every file under ``csrc``."""
    h = hashlib.sha256()
    for dirpath, dirnames, files in os.walk(csrc):
        dirnames.sort()
        for name in sorted(files):
            if name.endswith((".pyc", ".o", ".so")):
                continue
            path = os.path.join(dirpath, name)
            h.update(os.path.relpath(path, csrc).replace(os.sep, "/").encode() + b"\0")
            with open(path, "rb") as f:
                h.update(f.read())
            h.update(b"\0")
    return h.hexdigest()[:16]


def build_record() -> dict | None:
    """The JSON build record beside the binaries, or None."""
    path = os.path.join(_PKG, "_build_info.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _stale_reason(info: dict) -> str:
    import torch
    if info.get("torch") != torch.__version__:
        return (f"stale build: compiled against torch {info.get('torch')}, running torch "
                f"{torch.__version__}; rebuild: {BUILD_HINT}")
    if info.get("backend") == "cuda" and (info.get("cuda") or None) != torch.version.cuda:
        return (f"stale build: compiled for CUDA {info.get('cuda')}, torch has CUDA "
                f"{torch.version.cuda}; rebuild: {BUILD_HINT}")
    if os.path.isdir(_CSRC) and os.environ.get("MMMOD_IGNORE_STALE", "0") in ("", "0"):
        now = source_hash(_CSRC)
        if info.get("source_hash") != now:
            return (f"stale build: csrc/ changed since the extension was compiled (built from "
                    f"{info.get('source_hash')}, sources now {now}); rebuild: {BUILD_HINT} "
                    f"(MMMOD_IGNORE_STALE=1 skips this check)")
    return ""


def _import(name: str) -> tuple[object, str]:
    if os.environ.get("MMMOD_DISABLE_EXTENSION", "0") not in ("", "0"):
        return None, "disabled by MMMOD_DISABLE_EXTENSION=1"
    # the record beside the binaries is checked before loading one: a binary built from other
    # sources may register kernels for ops that no longer exist or have other schemas, and a
    # registration error while a library loads cannot be caught
    record = build_record()
    if record is not None:
        why = _stale_reason(record)
        if why:
            return None, why
    define_ops()
    try:
        mod = importlib.import_module(name)
    except ImportError as e:
        if isinstance(e, ModuleNotFoundError) and e.name == name:
            return None, f"the extension {name} is not built; {BUILD_HINT}"
        return None, f"the extension {name} failed to load ({e}); it may be stale: {BUILD_HINT}"
    except OSError as e:
        return None, f"the extension {name} failed to load ({e}); {BUILD_HINT}"
    try:
        info = mod.build_info()
    except Exception as e:  # pragma: no cover - a foreign binary
        return None, f"{name} has no build record ({e}); {BUILD_HINT}"
    why = _stale_reason(info)
    if why:
        return None, why
    return mod, ""


def load(backend: str = "cpu") -> tuple[object, str]:
    """(module, "") when the ops of ``backend`` ("cpu" or "cuda") are registered, else (None, why)."""
    # lock-free once resolved: torch.compile traces through this on every backend lookup and
    # cannot enter a threading.Lock (a graph break inside mmmod.functional otherwise)
    res = _cache.get(backend)
    if res is not None:
        return res
    with _lock:
        if backend in _cache:
            return _cache[backend]
        if backend == "cpu":
            res = _import("mmmod._C")
        elif backend == "cuda":
            res = _load_cuda()
        else:
            res = (None, f"unknown extension backend {backend!r}")
        _cache[backend] = res
        return res


def cuda_build_info() -> tuple[dict | None, str]:
    """The build record of ``mmmod._C_cuda`` when it is built and loads (even with no GPU here),
    else (None, why). Says whether it was *built*; :func:`load` says whether it is usable."""
    import torch
    if torch.version.cuda is None:
        return None, f"torch {torch.__version__} is a CPU-only build"
    cpu, why = _import("mmmod._C")  # the op schemas the CUDA kernels register against
    if cpu is None:
        return None, why
    mod, why = _import("mmmod._C_cuda")
    return (mod.build_info(), "") if mod is not None else (None, why)


def _load_cuda() -> tuple[object, str]:
    import torch
    if torch.version.cuda is None:
        return None, (f"torch {torch.__version__} is a CPU-only build, so the CUDA extension "
                      "cannot be built or run (install a CUDA torch, then rebuild)")
    cpu, why = _import("mmmod._C")  # holds the op schemas
    if cpu is None:
        return None, why
    _cache.setdefault("cpu", (cpu, ""))
    mod, why = _import("mmmod._C_cuda")
    if mod is None:
        if "not built" in why:
            why += " (it is built only when torch has CUDA and nvcc is found at build time)"
        return None, why
    if not torch.cuda.is_available():
        return None, ("the CUDA extension is built but not usable here: no CUDA device is "
                      "available (torch.cuda.is_available() is False)")
    return mod, ""


#: the package that defines every mmmod op (the binaries register kernels for all of them)
OP_MODULES = ("mmmod._ops",)


def define_ops() -> None:
    """Define the mmmod ops (schemas, fakes, reference implementations: :mod:`mmmod._ops`).

    Runs before any binary is loaded: the binaries only register kernels for ops defined
    there. ``import mmmod`` already did it; this covers a bare ``import mmmod._ext``."""
    for name in OP_MODULES:
        importlib.import_module(name)


#: the name the CUDA lane's tests (tests/backends/test_cuda_build.py) call
_register_fakes = define_ops
