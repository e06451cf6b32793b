"""The one place every Triton launch of mmmod goes through.

:func:`launch` sets the launch options (``enable_fp_fusion=False``: each multiply and add
rounds as in the reference, which rounds ``k * g`` and ``sigma * n`` before adding them; so
does the CUDA extension) and calls :data:`hook` first when one is set: ``tools/aot.py``'s
``record_launches`` records the exact launches it then compiles ahead of time.
"""
from __future__ import annotations

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
