"""Import transformers where the repository root is on ``sys.path`` (``python -m pytest`` run
from it): the repository's top-level ``kernels/`` folder (installed as ``mmmod.kernels``) would
shadow the PyPI package ``kernels`` that transformers imports. Import that package first with
the root left out; later imports find it in ``sys.modules``."""
import importlib
import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _is_root(entry):
    return pathlib.Path(os.path.realpath(entry or os.getcwd())) == ROOT


def import_transformers():
    mod = sys.modules.get("kernels")
    if mod is not None and ROOT in pathlib.Path(getattr(mod, "__file__", "") or "/").resolve().parents:
        del sys.modules["kernels"]  # the repository's folder, imported by its top-level name
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if not _is_root(p)]
    try:
        try:
            importlib.import_module("kernels")
        except ImportError:
            pass  # transformers without the kernels package
        return importlib.import_module("transformers")
    finally:
        sys.path[:] = saved
