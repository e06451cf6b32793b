"""Build mmmod: the Python package, the Triton kernels (shipped as ``mmmod.kernels``) and,
when present, the C++/CUDA extension built with torch's BuildExtension (ninja).

MMMOD_NO_EXTENSION=1 skips compiling entirely; the package then runs on the torch and triton
backends only.
"""
import os

from setuptools import setup

ext_modules = []
cmdclass = {}
# The C++/CUDA extension (csrc/) is added here by its own issue.

setup(
    name="mmmod",
    version="0.1.0",
    description="Fast, exact, drop-in multimodal gradient modulation (OGM-GE, MLB) for PyTorch",
    packages=["mmmod", "mmmod.reference", "mmmod.backends", "mmmod.kernels"],
    package_dir={"mmmod.kernels": "kernels"},
    python_requires=">=3.9",
    install_requires=["torch>=2.1", "numpy"],
    extras_require={"triton": ["triton"], "demo": ["torchaudio", "matplotlib", "tqdm", "soundfile"]},
    entry_points={"console_scripts": ["mmmod=mmmod.__main__:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
