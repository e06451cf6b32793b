"""docs/architecture.md, "Add a backend", followed literally from outside the package: a
backend made of the reference kernels, registered with ``mmmod.backends.register_backend``,
runs every registered method (and ``fused=True``) through ``ModulatedOptimizer(backend=...)``
and gives the bits of ``backend="torch"``; every call reaches its kernels through the
resolver (``mmmod.backends.kernel``)."""
import warnings
from collections import Counter

import pytest
import torch

import mmmod
from mmmod import backends
from mmmod.reference.ops import REFERENCES

import _models
from infos import method_info, method_infos

class ReferenceBackend(backends.Backend):
    """Every op's reference as this backend's kernel, each call counted."""
    name = "outside_reference"
    devices = ("cpu",)
    priority = 0  # used only when named
    native_rules = frozenset({"ogm", "mlb"})  # the coefficients op runs for OGM(-GE) and MLB

    def __init__(self):
        self.calls = Counter()
        self.kernels = {op: self._counted(op, fn) for op, fn in REFERENCES.items()}

    def _counted(self, op, fn):
        def kernel(*args):
            self.calls[op] += 1
            return fn(*args)
        return kernel


@pytest.fixture
def outside():
    be = backends.register_backend(ReferenceBackend())
    try:
        yield be
    finally:
        backends.unregister_backend(be.name)


def _run(method, backend, fused=False, inner="sgd", steps=2):
    g = torch.Generator().manual_seed(7)
    torch.manual_seed(3)
    model = _models.TwoEncoder()
    if inner == "sgd":
        opt_inner = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    else:
        opt_inner = torch.optim.AdamW(model.parameters(), lr=0.01)
    opt, names = _models.make(model, opt_inner, method=method, backend=backend, fused=fused,
                              seed=11)
    info = method_info(method)
    for epoch in range(2):
        opt.set_epoch(epoch, **info.epoch_inputs(epoch))
        for _ in range(steps):
            xs, y = _models.batch(g=g)
            _models.train_step(model, opt, names, xs, y)
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("method", [i.name for i in method_infos()])
def test_every_method_runs_through_an_outside_backend(outside, method, fused):
    if fused and not method_info(method).fused:
        pytest.skip(f"{method} is not run fused")
    assert "outside_reference" in backends.BACKENDS
    for inner in (("sgd", "adam") if fused else ("sgd",)):
        want = _run(method, "torch", fused, inner)
        outside.calls.clear()
        got = _run(method, "outside_reference", fused, inner)
        for a, b in zip(got, want):
            assert torch.equal(a, b), (method, fused, inner)
        m = method_info(method).method
        if m.score == "prob":
            assert outside.calls["scores"] > 0
        if m.native is not None:
            assert outside.calls["coefficients"] > 0
        if m.corrects_grads:
            assert outside.calls["proximal_"] > 0
        if fused:
            assert outside.calls["fused_sgd_" if inner == "sgd" else "fused_adam_"] > 0
        elif m.modulates and (m.scales or m.noise):
            assert outside.calls["modulate_"] > 0


@pytest.mark.unit
def test_a_missing_kernel_falls_back_to_the_reference_with_one_warning(outside):
    del outside.kernels["_bucket_std"]
    ts = [torch.randn(5), torch.randn(3, 2)]
    with pytest.warns(RuntimeWarning, match="no kernel for '_bucket_std'"):
        fn = backends.kernel("_bucket_std", "outside_reference", "cpu")
    assert torch.equal(fn(ts), REFERENCES["_bucket_std"](ts))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        backends.kernel("_bucket_std", "outside_reference", "cpu")  # warned once


@pytest.mark.unit
def test_register_refuses_a_taken_name_and_a_kernel_for_no_op(outside):
    with pytest.raises(ValueError, match="registered already"):
        backends.register_backend(ReferenceBackend())

    class Bad(ReferenceBackend):
        name = "outside_bad"

    bad = Bad()
    bad.kernels["nonsense_"] = lambda: None
    with pytest.raises(ValueError, match="no mmmod op"):
        backends.register_backend(bad)
    assert "outside_bad" not in backends.BACKENDS
    with pytest.raises(ValueError, match="unknown backend"):
        mmmod.ModulatedOptimizer(torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1),
                                 {"a": torch.nn.Linear(2, 2), "b": torch.nn.Linear(2, 2)},
                                 backend="outside_bad")


@pytest.mark.unit
def test_torch_means_the_reference_of_every_op():
    for op, ref in REFERENCES.items():
        assert backends.kernel(op, "torch", "cpu") is ref
