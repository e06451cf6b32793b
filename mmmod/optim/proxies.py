"""``unwrap``: the ``ModulatedOptimizer`` inside the wrappers training frameworks put around it.

Lightning's ``LightningOptimizer`` keeps the optimizer as ``_optimizer`` (and is itself an
instance of a subclass of the optimizer's class), accelerate's ``AcceleratedOptimizer`` (which
the Hugging Face ``Trainer`` exposes as ``trainer.optimizer``) as ``optimizer``; wrappers may
nest. A ``ModulatedOptimizer`` itself keeps its inner torch optimizer as ``optimizer`` too, so
the real one is recognised by owning its run state (``_run``) without a ``_optimizer`` link.
"""
from __future__ import annotations

from typing import Any

# attributes under which known wrappers keep what they wrap, tried in this order
_LINKS = ("_optimizer", "optimizer")


def is_real(obj: Any) -> bool:
    """Whether ``obj`` is a ``ModulatedOptimizer`` itself, not a proxy of one."""
    d = getattr(obj, "__dict__", None)
    return d is not None and "_run" in d and "_optimizer" not in d and hasattr(obj, "observe")


def unwrap(obj: Any):
    """The ``ModulatedOptimizer`` inside ``obj`` (``obj`` itself when it is one), following
    framework wrappers (``LightningOptimizer``, ``AcceleratedOptimizer``, ...). Raises
    ``TypeError`` naming the chain of wrappers when there is none."""
    chain, seen = [], set()
    while True:
        chain.append(type(obj).__name__)
        if is_real(obj):
            return obj
        d = getattr(obj, "__dict__", None) or {}
        nxt = next((d[k] for k in _LINKS if k in d), None)
        if nxt is None or id(nxt) in seen:
            raise TypeError(f"no ModulatedOptimizer inside {' -> '.join(chain)}: pass the "
                            f"optimizer built with mmmod.ModulatedOptimizer(...) or a framework "
                            f"wrapper of it")
        seen.add(id(obj))
        obj = nxt
