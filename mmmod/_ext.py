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
_fakes_registered = False

#: elements per chunk of the CUDA kernels (MMMOD_CUDA_CHUNK in csrc/cuda_api.h)
CUDA_CHUNK = 1 << 16


def table_words(ntensors, nchunks):
    """int64 words of a bucket table (csrc/cuda_api.h: 2-word header, 5 per tensor, 2 per chunk)."""
    return 2 + 5 * ntensors + 2 * nchunks


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
        if res[0] is not None:
            _register_fakes()
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


def _register_fakes() -> None:
    """Abstract (fake) implementations so torch.compile and opcheck can trace the ops."""
    global _fakes_registered
    if _fakes_registered:
        return
    import torch

    @torch.library.register_fake("mmmod::scores")
    def _scores(logits, labels):
        return labels.new_empty((len(logits),), dtype=torch.float32)

    @torch.library.register_fake("mmmod::coefficients")
    def _coefficients(scores, method, alpha, beta_max):
        torch._check(scores.dim() == 1, lambda: "scores must be 1-D")
        return scores.new_empty(scores.shape, dtype=torch.float32)

    @torch.library.register_fake("mmmod::modulate_")
    def _modulate(tensors, offsets, k, gate, noise, scaled, seed, step, modality):
        return None

    @torch.library.register_fake("mmmod::modulate_.capturable")
    def _modulate_capturable(tensors, offsets, k, gate, noise, scaled, seed, step, modality,
                             table=None, step_tensor=None):
        return None

    @torch.library.register_fake("mmmod::bucket_table")
    def _bucket_table(tensors, offsets):
        torch._check(len(tensors) == len(offsets), lambda: "one offset per tensor")
        torch._check(len(tensors) > 0, lambda: "no tensors")
        nchunks = sum((t.numel() + CUDA_CHUNK - 1) // CUDA_CHUNK for t in tensors)
        return tensors[0].new_empty((table_words(len(tensors), nchunks),), dtype=torch.int64)

    @torch.library.register_fake("mmmod::bucket_std")
    def _bucket_std(tensors):
        return tensors[0].new_empty((len(tensors),), dtype=torch.float64)

    @torch.library.register_fake("mmmod::philox_normal_")
    def _philox(out, seed, step, modality, offset):
        return None

    _fakes_registered = True
