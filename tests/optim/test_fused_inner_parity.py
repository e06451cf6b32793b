"""fused=True behaves as the unfused step where torch's own step would differ from a plain
update: step pre-hooks registered on the inner optimizer (e.g. gradient clipping) see the
modulated gradients, post-hooks run once, and Adam's ``state['step']`` takes torch's scalar
dtype (float64 under ``torch.set_default_dtype(torch.float64)``)."""
import pytest
import torch

import mmmod
from mmmod import backends
from torch.optim.optimizer import register_optimizer_step_pre_hook as register_global_pre_hook

pytestmark = pytest.mark.filterwarnings("ignore:mmmod. no fused backend")

CPU_FUSED = backends.status("cpu")[0] and mmmod._ops.has_kernel("fused_adam_", "CPU")
BACKENDS = ["torch"] + (["cpu"] if CPU_FUSED else [])


def _run(fused, backend, kind, hook, steps=4, dtype=torch.float32):
    torch.manual_seed(0)
    m = torch.nn.ModuleDict({"a": torch.nn.Conv2d(3, 4, 3), "v": torch.nn.Conv2d(3, 5, 3),
                             "h": torch.nn.Linear(4, 3)}).to(dtype)
    inner = (torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) if kind == "sgd"
             else torch.optim.Adam(m.parameters(), lr=0.05))
    calls = {"pre": 0, "post": 0}
    if hook:
        def clip(opt, args, kwargs):  # the usual pattern: clip in a pre-hook
            calls["pre"] += 1
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1e-3)
        inner.register_step_pre_hook(clip)
        inner.register_step_post_hook(lambda *a: calls.__setitem__("post", calls["post"] + 1))
    opt = mmmod.ModulatedOptimizer(inner, {"a": m["a"], "v": m["v"]}, method="ogm_ge",
                                   alpha=0.8, backend=backend, fused=fused)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in m.parameters():
            p.grad = (10 * torch.randn(p.shape, generator=g)).to(dtype)
        opt.observe([torch.randn(8, 3, generator=g), torch.randn(8, 3, generator=g)],
                    torch.randint(0, 3, (8,), generator=g))
        opt.step()
    return [p.detach().clone() for p in m.parameters()], inner, calls


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_inner_step_pre_hooks_apply_to_fused_parameters(backend, kind):
    a, _, calls_a = _run(False, backend, kind, hook=True)
    b, _, calls_b = _run(True, backend, kind, hook=True)
    assert calls_a == calls_b == {"pre": 4, "post": 4}
    for p, q in zip(a, b):
        assert torch.equal(p, q)
    c, _, _ = _run(True, backend, kind, hook=False)
    assert not all(torch.equal(p, q) for p, q in zip(b, c))  # the clipping did act


@pytest.mark.parametrize("backend", BACKENDS)
def test_global_pre_hooks_also_apply(backend):
    seen = []
    handle = register_global_pre_hook(
        lambda opt, *a: seen.append(type(opt).__name__))
    try:
        a, _, _ = _run(False, backend, "sgd", hook=False, steps=2)
        b, _, _ = _run(True, backend, "sgd", hook=False, steps=2)
    finally:
        handle.remove()
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert seen.count("SGD") == 4  # the inner step ran once per step on both paths


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("default", [torch.float32, torch.float64])
def test_fused_adam_step_dtype_is_torchs(backend, default):
    old = torch.get_default_dtype()
    torch.set_default_dtype(default)
    try:
        _, fused_inner, _ = _run(True, backend, "adam", hook=False, steps=2, dtype=default)
        _, plain_inner, _ = _run(False, backend, "adam", hook=False, steps=2, dtype=default)
    finally:
        torch.set_default_dtype(old)
    for p, st in plain_inner.state.items():
        assert st["step"].dtype == default
    for st in fused_inner.state.values():
        assert st["step"].dtype == default and float(st["step"]) == 2
