"""The CPU extension's environment variables are refused by name when malformed -- by the
compiled ops themselves (before they write) and, identically, by the optimizer's step checks
(``config.cpu_environment``, before the step's first write): MMMOD_CPU_WINDOW must be a plain
decimal integer (``atoll`` read "1e6" as a 1-element window and "abc" as the whole bucket)."""
import pytest
import torch

from mmmod import backends
from mmmod.optim import config

LIVE = backends.status("cpu")[0]
VALUES = [("", True), ("0", True), ("4096", True), ("2097152", True), ("1e6", False),
          ("abc", False), ("-5", False), (" 12", False), ("12x", False), ("0x10", False),
          ("1" * 19, False)]


@pytest.mark.parametrize("value,ok", VALUES)
def test_python_check_of_the_window(value, ok):
    env = {"MMMOD_CPU_WINDOW": value}
    if ok:
        config.cpu_environment(env)
    else:
        with pytest.raises(ValueError, match=f"MMMOD_CPU_WINDOW={value}"):
            config.cpu_environment(env)


@pytest.mark.parametrize("value", ["", "auto", "scalar", "avx2", "avx512", "AVX2", "avx9"])
def test_python_check_of_the_table(value):
    env = {"MMMOD_CPU_KERNELS": value}
    if value in ("", "auto", "scalar", "avx2", "avx512"):
        config.cpu_environment(env)
    else:
        with pytest.raises(ValueError, match=f"MMMOD_CPU_KERNELS={value}"):
            config.cpu_environment(env)


@pytest.mark.skipif(not LIVE, reason="cpu extension not built")
@pytest.mark.parametrize("value,ok", VALUES)
def test_compiled_ops_refuse_the_same_windows_before_writing(monkeypatch, value, ok):
    torch.manual_seed(0)
    gs = [torch.randn(300), torch.randn(7, 5)]
    monkeypatch.delenv("MMMOD_CPU_WINDOW", raising=False)
    want = [g.clone() for g in gs]
    torch.ops.mmmod.modulate_(want, [0, 300], torch.tensor(0.5), torch.tensor(1.0), True, False,
                              3, 1, 0)
    monkeypatch.setenv("MMMOD_CPU_WINDOW", value)
    got = [g.clone() for g in gs]
    if ok:  # any window gives the same bits (docs/benchmarks.md)
        torch.ops.mmmod.modulate_(got, [0, 300], torch.tensor(0.5), torch.tensor(1.0), True,
                                  False, 3, 1, 0)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    else:
        with pytest.raises(ValueError, match="MMMOD_CPU_WINDOW=.*plain non-negative integer of at most 18"):
            torch.ops.mmmod.modulate_(got, [0, 300], torch.tensor(0.5), torch.tensor(1.0), True,
                                      False, 3, 1, 0)
        assert all(torch.equal(a, b) for a, b in zip(got, gs))
