"""``mmmod._C.modulate_all_cpu``: the one-call CPU path of ``functional.modulate_``
(csrc/cpu/modulate_all_cpu.cpp). It must give exactly what the general path gives (the ops per
bucket, bit for bit: same kernels, same k, gate, offsets, seed and step), decline whatever it
does not handle with nothing written (the general path then runs and raises its own errors),
move the gradients' versions on like the in-place op, and raise a bad ``MMMOD_CPU_KERNELS``
before anything is written."""
import pytest
import torch

from mmmod import backends, functional

LIVE, WHY = backends.status("cpu")
pytestmark = pytest.mark.skipif(not LIVE, reason=f"C++ extension (backend 'cpu') not available: {WHY}")

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _grads(dtype, seed, M=2, extra=True):
    """Per modality: odd sizes around the kernels' 16 K chunks, a None entry and an empty tensor."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for m in range(M):
        sizes = (16384 + 3, 7, 1, 40000 + m) if m % 2 == 0 else (5, 33000, 2)
        ts = [(torch.randn(n, generator=g) * (0.3 + m)).to(dtype) for n in sizes]
        if extra:
            ts.insert(1, None)
            ts.append(torch.empty(0, dtype=dtype))
        out.append(ts)
    return out


def _clone(grads):
    return [[None if t is None else t.clone() for t in ts] for ts in grads]


def _general(grads, coeffs, monkeypatch, **kw):
    """functional.modulate_ with the fast path switched off: the ops, bucket by bucket."""
    with monkeypatch.context() as mp:
        mp.setattr(functional, "_fast_modulate", False)
        functional.modulate_(grads, coeffs, backend="cpu", **kw)


def _same(a, b):
    for ta, tb in zip(a, b):
        for x, y in zip(ta, tb):
            assert (x is None) == (y is None)
            if x is not None:
                assert x.dtype == y.dtype and torch.equal(x, y)


def _calls_to_the_ops(monkeypatch):
    """Count the per-bucket op calls (the general path) made from now on."""
    impl = backends.get("cpu", "cpu")
    calls = []
    orig = type(impl).modulate_bucket_

    def counted(self, *a, **kw):
        calls.append(1)
        return orig(self, *a, **kw)

    monkeypatch.setattr(type(impl), "modulate_bucket_", counted)
    return calls


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("noise", [False, True])
@pytest.mark.parametrize("noise_std", ["raw", "scaled"])
def test_bit_identical_to_the_general_path(dtype, noise, noise_std, seed, monkeypatch):
    grads = _grads(dtype, seed, M=3)
    ref = _clone(grads)
    coeffs = torch.tensor([0.61, 1.0, 1.7], dtype=torch.float64)  # float64: rounded to float32
    kw = dict(noise=noise, noise_std=noise_std, seed=(1 << 64) - 5 + seed, step=(1 << 32) + 9)
    _general(ref, coeffs, monkeypatch, **kw)
    calls = _calls_to_the_ops(monkeypatch)
    functional.modulate_(grads, coeffs, backend="cpu", **kw)
    assert not calls, "the usual CPU call should not go through the per-bucket ops"
    _same(grads, ref)
    assert not torch.equal(grads[0][0], _grads(dtype, seed, M=3)[0][0])  # it did modulate


@pytest.mark.parametrize("coeffs", [[float("nan"), 0.5], [0.5, float("inf")]])
def test_a_non_finite_coefficient_leaves_every_gradient_untouched(coeffs, seed, monkeypatch):
    grads = _grads(torch.float32, seed)
    before = _clone(grads)
    calls = _calls_to_the_ops(monkeypatch)
    functional.modulate_(grads, torch.tensor(coeffs), noise=True, backend="auto", seed=3, step=1)
    assert not calls
    _same(grads, before)


def test_given_offsets_and_auto_backend(seed, monkeypatch):
    grads = _grads(torch.float32, seed, extra=False)
    grads[0][0] = torch.nn.Parameter(grads[0][0], requires_grad=False)  # a plain tensor to C++
    offsets = [[5 + 1000 * i for i in range(len(ts))] for ts in grads]
    ref = _clone(grads)
    coeffs = torch.tensor([0.8, 1.2])
    _general(ref, coeffs, monkeypatch, noise=True, seed=11, step=4, offsets=offsets)
    functional.modulate_(grads, coeffs, noise=True, backend="auto", seed=11, step=4, offsets=offsets)
    _same(grads, ref)


def test_versions_move_on_like_the_in_place_op(seed):
    grads = _grads(torch.float32, seed, extra=False)
    before = [[t._version for t in ts] for ts in grads]
    functional.modulate_(grads, torch.tensor([0.5, 0.9]), noise=False, backend="cpu")
    assert [[t._version for t in ts] for ts in grads] == [[v + 1 for v in vs] for vs in before]


class _Sub(torch.Tensor):
    pass


@pytest.mark.parametrize("case", ["non_contiguous", "two_dtypes", "tensor_subclass",
                                  "tensor_step"])
def test_what_it_declines_runs_the_general_path(case, seed, monkeypatch):
    grads = _grads(torch.float32, seed, extra=False)
    step = 3
    if case == "non_contiguous":
        grads[1][1] = torch.randn(300, 110).t()
    elif case == "two_dtypes":
        grads[0][2] = grads[0][2].double()
    elif case == "tensor_subclass":  # may define its own metadata: Python decides
        grads[1][0] = grads[1][0].as_subclass(_Sub)
    else:
        step = torch.tensor(3)
    ref = _clone(grads)
    coeffs = torch.tensor([0.7, 1.3])
    _general(ref, coeffs, monkeypatch, noise=True, seed=2, step=step)
    calls = _calls_to_the_ops(monkeypatch)
    functional.modulate_(grads, coeffs, noise=True, backend="cpu", seed=2, step=step)
    assert calls, "declined: the general path must have run"
    _same(grads, ref)


def test_a_declined_call_writes_nothing(seed):
    """Called directly: a negative offset in the last modality is declined before modality 0 is
    touched (the general path then raises it by name)."""
    from mmmod import _ext
    fast = _ext.load("cpu")[0].modulate_all_cpu
    grads = _grads(torch.float32, seed, extra=False)
    before = _clone(grads)
    offsets = [[0] * len(ts) for ts in grads]
    offsets[-1][-1] = -1
    assert fast(grads, offsets, torch.tensor([0.5, 0.5]), True, False, 0, 0) is False
    _same(grads, before)
    with pytest.raises(ValueError, match=r"offsets\[1\]\[2\] must be a non-negative int"):
        functional.modulate_(grads, torch.tensor([0.5, 0.5]), noise=True, backend="cpu",
                             offsets=offsets)
    _same(grads, before)


def test_a_bad_kernel_table_is_raised_before_anything_is_written(seed, monkeypatch):
    grads = _grads(torch.float32, seed)
    before = _clone(grads)
    monkeypatch.setenv("MMMOD_CPU_KERNELS", "avx1024")
    with pytest.raises(ValueError, match="MMMOD_CPU_KERNELS=avx1024"):
        functional.modulate_(grads, torch.tensor([0.5, 0.9]), noise=True, backend="cpu")
    _same(grads, before)
