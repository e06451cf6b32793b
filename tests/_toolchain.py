"""Where the CUDA tools the compile-level tests use are (tests/backends/test_byte_model.py,
tests/backends/test_cuda_build.py, tests/kernels/test_fused_update_cuda.py); ``None`` when absent."""
import os
import shutil


def nvcc():
    """$NVCC, the toolkit's nvcc, else the one on PATH."""
    for c in (os.environ.get("NVCC"), "/usr/local/cuda/bin/nvcc", shutil.which("nvcc")):
        if c and os.path.isfile(c):
            return c
    return None


def cuobjdump():
    """cuobjdump: the toolkit's, else the one Triton ships (this machine's toolkit has none)."""
    cands = [shutil.which("cuobjdump"), "/usr/local/cuda/bin/cuobjdump"]
    try:
        import triton
        cands.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                                  "cuobjdump"))
    except ImportError:
        pass
    return next((c for c in cands if c and os.path.isfile(c)), None)
