"""Modulation methods: one module per method, all read through one registry.

>>> import mmmod
>>> mmmod.methods.names()
('ogm', 'ogm_ge', 'mlb', 'none', 'agm', 'mslr', 'inforeg', 'mmpareto')

A new score-to-coefficient rule is one subclass of :class:`Method` and one :func:`register`
call, from inside or outside the package; it then works by name in ``ModulatedOptimizer``
and ``functional.coefficients`` on every backend (see README, "Adding a method").
"""
from .base import Method, get, names, real_number, register, table, unregister
from .traits import MethodTraits

# the built-in methods register themselves on import, in this order
from . import ogm, ogm_ge, mlb, none  # noqa: E402,F401  isort: skip
# balancing methods beyond OGM/MLB, on the same kernels (docs/semantics.md)
from . import agm, mslr, inforeg  # noqa: E402,F401  isort: skip
# per-objective gradient combination (docs/multi_objective.md)
from . import mmpareto  # noqa: E402,F401  isort: skip

__all__ = ["Method", "MethodTraits", "register", "unregister", "get", "names", "table", "real_number"]
