"""Triton backend checks that need a CUDA device (skipped elsewhere).

- A CUDA graph captured over OGM-GE modulation with a device step keeps working while the
  metadata cache churns (tables evicted, cleared, rebuilt): the tables the graph uses are
  pinned, so replays read live memory and match eager runs bit for bit.
- A CPU step tensor for a GPU bucket is read on the host: no host-to-device copy, so it works
  under capture too (with the value captured).
"""
import pytest
import torch

from mmmod import backends, reference
from mmmod.functional import stream_offsets

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture
def be():
    live, why = backends.status("triton")
    if not live:
        pytest.skip(why)
    from mmmod.backends.triton import TritonBackend
    return TritonBackend()


def _bucket(seed, dev):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(dev) for s in ((3, 5), (4099,), (1,), (70, 3))]


def _churn(be, dev, n):
    """Build n tables for fresh storages (eviction pressure on a small cache)."""
    keep = []
    for i in range(n):
        ts = [torch.randn(17 + i, device=dev)]
        be.modulate_bucket_(ts, [0], torch.ones(1, device=dev), None, noise=True,
                            noise_std="raw", seed=i, step=i, modality=0)
        keep.append(ts)
    return keep


def test_graph_replay_survives_meta_cache_churn(be, seed):
    dev = torch.device("cuda")
    cache = be.meta_cache
    cache.size, cache.max_bytes = 2, 4096
    static = _bucket(seed, dev)
    init = [t.clone() for t in static]
    k = torch.tensor(0.7, device=dev)
    step = torch.zeros((), dtype=torch.int64, device=dev)
    offs = stream_offsets(static, 5)

    def modulate():
        be.modulate_bucket_(static, offs, k, None, noise=True, noise_std="scaled", seed=seed,
                            step=step, modality=1)
        step.add_(1)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up: compiles, builds the table on a side stream
        modulate()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        modulate()
    assert cache.pinned_entries >= 1
    outs = []
    for r in range(3):
        for t, v in zip(static, init):
            t.copy_(v)
        step.fill_(10 + r)
        _churn(be, dev, 6)          # evicts every unpinned table, allocates over freed memory
        cache.clear()               # pinned entries survive
        graph.replay()
        outs.append([t.clone() for t in static])
    torch.cuda.synchronize()
    for r, out in enumerate(outs):
        eager = [v.clone() for v in init]
        be.modulate_bucket_(eager, offs, k, None, noise=True, noise_std="scaled", seed=seed,
                            step=10 + r, modality=1)
        for x, y in zip(out, eager):
            assert torch.equal(x, y), r
    del graph
    cache.clear(force=True)
    assert len(cache) == 0


def test_cpu_step_tensor_is_not_copied(be, seed, monkeypatch):
    dev = torch.device("cuda")
    a = _bucket(seed, dev)
    b = [t.clone() for t in a]
    offs = stream_offsets(a, 0)
    k = torch.tensor(0.5, device=dev)
    copies = []
    orig_to = torch.Tensor.to

    def spy(self, *args, **kw):
        if self.device.type == "cpu" and self.dim() == 0:
            copies.append(args)
        return orig_to(self, *args, **kw)
    monkeypatch.setattr(torch.Tensor, "to", spy)
    be.modulate_bucket_(a, offs, k, None, noise=True, noise_std="raw", seed=seed,
                        step=torch.tensor(2 ** 32 + 9), modality=0)
    monkeypatch.undo()
    assert copies == []
    be.modulate_bucket_(b, offs, k, None, noise=True, noise_std="raw", seed=seed, step=9,
                        modality=0)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_noise_matches_reference_on_gpu(be, seed):
    """The compiled kernel (no FMA, sqrt_rn, libdevice log/sin/cos) against the reference."""
    dev = torch.device("cuda")
    a = _bucket(seed, dev)
    ref = [t.clone() for t in a]
    offs = stream_offsets(a, 3)
    k = torch.tensor(0.9, device=dev)
    be.modulate_bucket_(a, offs, k, None, noise=True, noise_std="raw", seed=seed, step=4,
                        modality=2)
    reference.modulate_bucket_(ref, offs, k, None, noise=True, noise_std="raw", seed=seed,
                               step=4, modality=2)
    for x, y in zip(a, ref):
        sg = float(reference.tensor_sigma(y, k, "raw"))
        err = (x.double() - y.double()).abs()
        assert bool((err <= 1e-6 * y.double().abs() + 1e-6 * sg).all())
