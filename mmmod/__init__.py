"""mmmod: fast, exact, drop-in multimodal gradient modulation (OGM-GE, MLB) for PyTorch."""
from . import backends, filters, functional, fusion, losses, methods, reference
from ._version import __version__
from .optim.proxies import unwrap
from .optim import ModulatedOptimizer
from .slices import ParamSlice

__all__ = ["ModulatedOptimizer", "ParamSlice", "unwrap", "functional", "fusion", "losses", "reference", "backends",
           "filters", "methods", "__version__"]
