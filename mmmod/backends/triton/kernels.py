"""The @triton.jit kernel modules (``mmmod.kernels``, the repository's top-level kernels/),
imported on first use so that importing the backend never needs Triton.

An install (wheel or ``pip install -e .``) maps ``mmmod.kernels`` to kernels/ (setup.py
``package_dir``). A source checkout used without installing it (``PYTHONPATH=<checkout>``, the
way the test suite runs in a worktree next to another checkout's editable install) has no such
mapping: :func:`load` then imports the checkout's kernels/ under that name, once.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path


def load():
    """``mmmod.kernels`` (installed, or mapped from the checkout's kernels/ when not installed)."""
    try:
        return importlib.import_module("mmmod.kernels")
    except ImportError:
        root = Path(__file__).resolve().parents[3] / "kernels"
        init = root / "__init__.py"
        if not init.is_file():
            raise
        spec = importlib.util.spec_from_file_location("mmmod.kernels", init,
                                                      submodule_search_locations=[str(root)])
        mod = importlib.util.module_from_spec(spec)
        sys.modules["mmmod.kernels"] = mod  # the name the kernels' own relative imports need
        try:
            spec.loader.exec_module(mod)
        except BaseException:
            sys.modules.pop("mmmod.kernels", None)
            raise
        return mod


class Kernels:
    """The kernel modules by role (``mmmod.kernels.<name>_kernel``)."""

    def __init__(self):
        load()
        imp = importlib.import_module
        self.score = imp("mmmod.kernels.score_kernel")
        self.stats = imp("mmmod.kernels.stats_kernel")
        self.modulate = imp("mmmod.kernels.modulate_kernel")
        self.proximal = imp("mmmod.kernels.proximal_kernel")
        self.fused_update = imp("mmmod.kernels.fused_update_kernel")
        self.combine = imp("mmmod.kernels.combine_kernel")
        self.utils = imp("mmmod.kernels.utils")
