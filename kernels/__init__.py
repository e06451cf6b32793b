"""Triton kernels of mmmod, shipped inside the package as ``mmmod.kernels``: pure
``@triton.jit`` code that imports only ``triton`` (tests/project/test_layering.py checks). The host
side (launchers, tables, the launch point) is mmmod/backends/triton/."""
