"""mmmod: fast, exact, drop-in multimodal gradient modulation (OGM-GE, MLB) for PyTorch."""
from . import backends, filters, functional, fusion, losses, reference
from ._version import __version__
from .optimizer import ModulatedOptimizer

__all__ = ["ModulatedOptimizer", "functional", "fusion", "losses", "reference", "backends",
           "filters", "__version__"]
