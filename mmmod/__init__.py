"""mmmod: fast, exact, drop-in multimodal gradient modulation (OGM-GE, MLB) for PyTorch."""
from . import backends, filters, functional, fusion, losses, methods, reference
from ._version import __version__
from .optimizer import ModulatedOptimizer
from .slices import ParamSlice

__all__ = ["ModulatedOptimizer", "ParamSlice", "functional", "fusion", "losses", "reference", "backends",
           "filters", "methods", "__version__"]
