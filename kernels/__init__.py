"""Triton kernels of mmmod, shipped inside the package as ``mmmod.kernels``."""
