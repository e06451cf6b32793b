"""The one place every Triton launch of mmmod goes through, and the launchers' small helpers.

:func:`launch` sets the launch options (``enable_fp_fusion=False``: each multiply and add
rounds as in the reference, which rounds ``k * g`` and ``sigma * n`` before adding them; so
does the CUDA extension) and calls :data:`hook` first when one is set: ``tools/aot.py``'s
``record_launches`` records the exact launches it then compiles ahead of time.
"""
from __future__ import annotations

import contextlib
import functools

import torch

#: called as ``hook(kernel, grid, args, kwargs)`` before every launch; when it returns False
#: the launch is skipped (recording only)
hook = None


def launch(kernel, grid, *args, **kwargs):
    """``kernel[grid](*args, **kwargs)`` with FMA contraction off, through :data:`hook`."""
    kwargs["enable_fp_fusion"] = False
    h = hook
    if h is not None and h(kernel, grid, args, kwargs) is False:
        return
    kernel[grid](*args, **kwargs)


def on(device: torch.device):
    """Launch on the tensors' GPU (Triton launches on the current device)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def warps(elements: int) -> int:
    return 8 if elements >= 4096 else 4


def aligned(tensors) -> bool:
    """Whether every data pointer is 16-byte aligned: the kernels' ``ALIGNED`` variant then
    reads and writes full chunks with 16-byte vector accesses (a pointer read from the int64
    table carries no alignment the compiler could see). The noise kernel additionally needs
    every stream offset to be a multiple of 4 (its chunks follow Philox counters)."""
    return all(g.data_ptr() % 16 == 0 for g in tensors)


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


@functools.cache
def _tl_dtypes() -> dict:
    import triton.language as tl  # imported on first use: this module imports without Triton
    return {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
            torch.float64: tl.float64}


def tl_dtype(dtype: torch.dtype):
    """The ``triton.language`` dtype the kernels take for a torch dtype (``DT``)."""
    try:
        return _tl_dtypes()[dtype]
    except KeyError:
        raise TypeError(f"mmmod triton kernels do not support dtype {dtype}") from None
