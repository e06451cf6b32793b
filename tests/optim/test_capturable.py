"""The step counter on the device (``capturable=True``; ``step`` as a 0-d tensor).

A CUDA graph replays kernels with the arguments they were captured with, so a Python-int
Philox step would draw the same noise at every replay. With ``capturable=True`` the optimizer
keeps the step in a 0-d int64 tensor that the noise kernels read and ``step()`` advances on the
device. On CPU we check that this path gives the integer path's bits on every backend that
supports it; the graph capture itself runs where a GPU is present.
"""
import copy

import pytest
import torch

import mmmod
from mmmod import backends, functional
from mmmod.backends.base import Backend
from _models import TwoEncoder, batch, make, train_step

pytestmark = pytest.mark.filterwarnings("ignore:mmmod. no fused backend")

DEVICE_STEP = ["torch", "triton"] + [b for b in ("cpu",) if backends.status(b)[0]]


def _grads(g):
    # odd sizes, a tensor start that is not a multiple of 4, two modalities
    return [[torch.randn(3, 2, 3, 3, generator=g), torch.randn(7, 5, generator=g)],
            [torch.randn(13, generator=g), torch.randn(2, 1, 5, 3, generator=g)]]


@pytest.mark.parametrize("backend", DEVICE_STEP)
@pytest.mark.parametrize("step", [0, 5, 2**32 + 3])
def test_tensor_step_gives_the_int_steps_bits(seed, backend, step):
    if not backends.status(backend)[0]:
        pytest.skip(backends.status(backend)[1])
    g = torch.Generator().manual_seed(seed)
    a = _grads(g)
    b = [[t.clone() for t in ts] for ts in a]
    k = torch.tensor([0.3, 1.0])
    functional.modulate_(a, k, noise=True, seed=seed, step=step, backend=backend)
    functional.modulate_(b, k, noise=True, seed=seed, step=torch.tensor(step), backend=backend)
    for x, y in zip(sum(a, []), sum(b, [])):
        assert torch.equal(x, y)
    # a different counter value draws different noise (the tensor is really read)
    c = [[t.clone() for t in ts] for ts in _grads(torch.Generator().manual_seed(seed))]
    functional.modulate_(c, k, noise=True, seed=seed, step=torch.tensor(step + 1),
                         backend=backend)
    assert not torch.equal(c[0][0], a[0][0])


@pytest.mark.parametrize("backend", DEVICE_STEP)
@pytest.mark.parametrize("dtype", [torch.int32, torch.int16])
def test_narrow_integer_tensor_step(seed, backend, dtype):
    """Any 0-d integer dtype works, negative values included (step mod 2**32, as an int)."""
    if not backends.status(backend)[0]:
        pytest.skip(backends.status(backend)[1])
    for step in (7, -3):
        a = _grads(torch.Generator().manual_seed(seed))
        b = [[t.clone() for t in ts] for ts in a]
        k = torch.tensor([0.5, 2.0])
        functional.modulate_(a, k, noise=True, seed=seed, step=step, backend=backend)
        functional.modulate_(b, k, noise=True, seed=seed, step=torch.tensor(step, dtype=dtype),
                             backend=backend)
        for x, y in zip(sum(a, []), sum(b, [])):
            assert torch.equal(x, y)


@pytest.mark.parametrize("bad", [torch.tensor([1, 2]), torch.tensor(1.0), torch.tensor(True)])
def test_bad_tensor_step_is_rejected(bad):
    g = [[torch.randn(4)], [torch.randn(4)]]
    before = [t.clone() for t in sum(g, [])]
    with pytest.raises(ValueError, match="0-d integer tensor"):
        functional.modulate_(g, torch.tensor([0.5, 1.0]), noise=True, step=bad, backend="torch")
    assert all(torch.equal(x, y) for x, y in zip(sum(g, []), before))


@pytest.mark.parametrize("backend", DEVICE_STEP)
@pytest.mark.parametrize("apply_to", ["grad", "update"])
def test_capturable_optimizer_matches_integer_counter(seed, backend, apply_to):
    if not backends.status(backend)[0]:
        pytest.skip(backends.status(backend)[1])
    torch.manual_seed(seed)
    a = TwoEncoder()
    b = copy.deepcopy(a)
    kw = dict(method="ogm_ge", alpha=0.8, seed=seed, backend=backend, apply_to=apply_to,
              param_filter="all")
    opt_a, names = make(a, torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9), **kw)
    opt_b, _ = make(b, torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9), capturable=True,
                    **kw)
    assert opt_a.device_step is None
    assert opt_b.device_step.dtype == torch.int64 and opt_b.device_step.dim() == 0
    g = torch.Generator().manual_seed(seed)
    for _ in range(3):
        xs, y = batch(g=g)
        train_step(a, opt_a, names, xs, y)
        train_step(b, opt_b, names, xs, y)
    assert int(opt_b.device_step) == 3 == opt_b.step_count
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_capturable_state_dict_restores_the_device_counter(seed):
    torch.manual_seed(seed)
    model = TwoEncoder()
    opt, names = make(model, torch.optim.SGD(model.parameters(), lr=0.1), backend="torch",
                      capturable=True, seed=seed)
    for _ in range(2):
        train_step(model, opt, names, *batch())
    sd = opt.state_dict()
    assert sd["mmmod"]["step_count"] == 2
    other = TwoEncoder()
    fresh, _ = make(other, torch.optim.SGD(other.parameters(), lr=0.1), backend="torch",
                    capturable=True, seed=seed)
    fresh.load_state_dict(sd)
    assert int(fresh.device_step) == 2 and fresh.step_count == 2


def test_capturable_rejects_torch_noise_stream():
    model = TwoEncoder()
    with pytest.raises(ValueError, match="capturable=True needs noise_rng='philox'"):
        make(model, torch.optim.SGD(model.parameters(), lr=0.1), noise_rng="torch",
             capturable=True)


def test_cpu_extension_reads_a_cpu_step_and_refuses_a_device_one():
    live, why = backends.status("cpu")
    if not live:
        pytest.skip(why)
    impl = backends.get("cpu")
    g = torch.randn(10)
    with pytest.raises(RuntimeError, match="needs backend 'triton' or 'torch'"):
        impl.modulate_bucket_([g], [0], torch.tensor(1.0), torch.tensor(1.0), noise=True,
                              noise_std="raw", seed=0, step=torch.tensor(1, device="meta"),
                              modality=0)


def test_auto_skips_a_backend_that_needs_the_step_on_the_host(monkeypatch):
    """On a GPU ``auto`` picks the CUDA extension, unless the step is a device tensor."""

    class Fake(Backend):
        devices = ("cuda",)

        def __init__(self, name, device_step, priority):
            self.name, self.device_step, self.priority = name, device_step, priority

        def available(self):
            return True, ""

        def supports(self, device):
            return True

    monkeypatch.setitem(backends._instances, "cuda", Fake("cuda", False, 30))
    monkeypatch.setitem(backends._instances, "triton", Fake("triton", True, 20))
    dev = torch.device("cuda")
    assert backends.get("auto", dev).name == "cuda"
    assert backends.get("auto", dev, device_step=True).name == "triton"
    assert backends.get("auto", "cpu", device_step=True).name in ("cpu", "torch")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["auto", "triton", "torch", "cuda"])
def test_cuda_graph_replays_draw_fresh_noise(seed, backend):
    """observe + backward + step captured once and replayed: every replay advances the device
    counter, and the parameters follow the eager run with the same data."""
    if backend != "auto" and not backends.status(backend)[0]:
        pytest.skip(f"backend {backend!r} not available: {backends.status(backend)[1]}")
    dev = torch.device("cuda")
    torch.manual_seed(seed)
    a = TwoEncoder().to(dev)
    b = copy.deepcopy(a)
    kw = dict(method="ogm_ge", alpha=0.8, seed=seed, backend=backend, capturable=True)
    opt_a, names = make(a, torch.optim.SGD(a.parameters(), lr=0.05, momentum=0.9), **kw)
    opt_b, _ = make(b, torch.optim.SGD(b.parameters(), lr=0.05, momentum=0.9), **kw)
    data = [tuple(x.to(dev) if torch.is_tensor(x) else [t.to(dev) for t in x]
                  for x in batch(b=8)) for _ in range(6)]
    static_xs = [t.clone() for t in data[0][0]]
    static_y = data[0][1].clone()

    def fwd_bwd_step(model, opt, xs, y):
        opt.zero_grad(set_to_none=False)
        out, feats = model(xs)
        opt.observe(dict(zip(names, mmmod.fusion.concat_logits(model.head, feats))), y)
        torch.nn.functional.cross_entropy(out, y).backward()
        opt.step()

    # warm-up on a side stream (allocates grads, momentum buffers, metadata tables)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for xs, y in data[:2]:
            for t, v in zip(static_xs, xs):
                t.copy_(v)
            static_y.copy_(y)
            fwd_bwd_step(a, opt_a, static_xs, static_y)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fwd_bwd_step(a, opt_a, static_xs, static_y)
    # capturing records the kernels without running them: the device counter is still 2
    for xs, y in data[2:]:
        for t, v in zip(static_xs, xs):
            t.copy_(v)
        static_y.copy_(y)
        graph.replay()
    torch.cuda.synchronize()
    for xs, y in data:
        fwd_bwd_step(b, opt_b, xs, y)
    assert int(opt_a.device_step) == int(opt_b.device_step) == len(data)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
