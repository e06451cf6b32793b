"""``mmmod.ModulatedOptimizer`` (its implementation lives in :mod:`mmmod.optim`)."""
from .optim.modulated import ModulatedOptimizer

__all__ = ["ModulatedOptimizer"]
