"""Shared test setup.

Triton kernels run under the interpreter when there is no GPU; the variable must be set before
the first ``@triton.jit`` is evaluated, i.e. before anything imports ``mmmod.kernels``.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture
def seed():
    """A fresh seed per test run (printed on failure) so parity is checked on new inputs."""
    s = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(s)
    print(f"seed={s}")
    return s
