"""The optimizer wrapper and its parts: argument validation (``config``), parameter selection,
data-parallel agreement, update scaling and checkpoints, one module each."""
from .modulated import ModulatedOptimizer

__all__ = ["ModulatedOptimizer"]
