"""Shared test setup.

The test modules sit in folders mirroring the package (tests/optim, tests/methods, ...);
the helpers they share (``_models.py``, ``_sync_spy.py``, ``infos.py``, ...) sit here, in the
conftest's directory, which pytest puts on ``sys.path``.

Triton kernels run under the interpreter when there is no GPU; the variable must be set before
the first ``@triton.jit`` is evaluated, i.e. before anything imports ``mmmod.kernels``.
"""
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import mmmod  # noqa: E402

# tools/ (the AOT compile tool) is imported by tests from the source tree; only where the mmmod
# under test is this checkout's (an editable install): a lane testing an installed build (the
# CUDA lane) must not find the checkout's mmmod first
ROOT = Path(__file__).resolve().parents[1]
if Path(mmmod.__file__).resolve().parents[1] == ROOT and str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))


@pytest.fixture
def seed():
    """A fresh seed per test run (printed on failure) so parity is checked on new inputs."""
    s = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(s)
    print(f"seed={s}")
    return s
