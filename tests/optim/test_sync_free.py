"""observe()/step() never read a device value on the host on the default path.

On CPU there is no real sync to catch, so every way of pulling a tensor value into Python is
instrumented instead; any call during observe/step fails the test. (The label range check of
CPU labels is such a read by design, free on CPU: it is patched out here, as on accelerators.)
"""

import pytest
import torch

from mmmod import backends, methods
from mmmod.fusion import GradScales
from _models import TwoEncoder, batch, make
from _sync_spy import check_no_reads as _check_no_reads, spy_reads as _spy_reads

HOST_BACKENDS = [b for b in ("torch", "cpu") if backends.status(b)[0]]


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("method", [n for n in methods.names() if n != "none"])
@pytest.mark.parametrize("apply_to", ["grad", "update"])
def test_no_host_reads_in_observe_and_step(monkeypatch, backend, method, apply_to):
    _check_no_reads(monkeypatch, method=method, backend=backend, apply_to=apply_to)


@pytest.mark.parametrize("apply_to", ["grad", "update"])
def test_capturable_step_reads_nothing_on_the_host(monkeypatch, apply_to):
    """The device step counter is read by the noise kernels, never by Python (the reference
    backend here; the cpu extension reads a CPU step tensor by design, Triton on GPU)."""
    _check_no_reads(monkeypatch, method="ogm_ge", backend="torch", apply_to=apply_to,
                    capturable=True)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_grad_scales_written_without_host_reads(monkeypatch, backend):
    """attach_grad_scales: observe() computes the coefficients and writes them into the scales,
    the backward's hooks read them, step() reuses them: no host read anywhere in between."""
    model = TwoEncoder()
    opt, names = make(model, torch.optim.SGD(model.parameters(), lr=1e-2), method="agm",
                      backend=backend)
    gs = GradScales(2)
    opt.attach_grad_scales(gs)

    def step(xs, y):
        opt.zero_grad()
        feats = [enc(x) for enc, x in zip(model.encoders, xs)]
        parts = concat_parts(model.head, feats)
        opt.observe(dict(zip(names, [p.detach() for p in parts])), y)
        torch.nn.functional.cross_entropy(gs.fuse(parts), y).backward()
        opt.step()
    step(*batch())  # warm-up outside the instrumented region
    calls = _spy_reads(monkeypatch)
    step(*batch())
    monkeypatch.undo()
    assert calls == [], f"host reads during observe/backward/step: {calls}"
    assert not torch.equal(gs.scales, torch.ones(2))  # the optimizer did write them


def concat_parts(head, feats):
    """Each modality's share of a concat head's logits, with autograd (they sum to the head's)."""
    out, start = [], 0
    for f in feats:
        w = f.shape[1]
        out.append(torch.nn.functional.linear(f, head.weight[:, start:start + w], head.bias / len(feats)))
        start += w
    return out
