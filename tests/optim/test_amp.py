"""Mixed precision and non-finite values.

- ``torch.amp.GradScaler`` loop with an injected inf gradient: the scaler skips the step, the
  modulation never runs on it, its scores do not leak into the next step, ``step_count`` (the
  noise counter) does not advance, and training continues exactly like a run without that step.
- autocast fp16/bf16 logits: scores are float32 statistics of the low-precision logits.
- bf16 parameters and gradients: modulated with float32 arithmetic and float64-accumulated std,
  rounded once to bf16, on every live backend.
- NaN/inf in gradients is never spread by the modulation (no noise on a non-finite tensor); NaN
  logits skip the step's modulation and are counted in ``skipped_steps``.
"""
import copy
import math

import pytest
import torch
from torch import nn

import mmmod
from mmmod import backends, functional, reference
from mmmod.reference.modulate import SIGMA_EPS
from _models import TwoEncoder, batch, make, train_step
from _dist_utils import one_thread

pytestmark = pytest.mark.filterwarnings("ignore:mmmod. no fused backend")

LIVE = [b for b in ("torch", "cpu", "triton") if backends.status(b)[0]]
HOST = [b for b in ("torch", "cpu") if backends.status(b)[0]]  # training loops: no interpreter


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def _logits(model, feats):
    return mmmod.fusion.concat_logits(model.head, feats)


@pytest.mark.parametrize("backend", HOST)
def test_grad_scaler_skips_inf_step_cleanly(seed, backend):
    torch.manual_seed(seed)
    a = TwoEncoder()
    b = copy.deepcopy(a)
    kw = dict(backend=backend, alpha=0.8, seed=seed, method="ogm_ge")
    opt_a, names = make(a, torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9), **kw)
    opt_b, _ = make(b, torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9), **kw)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    g = torch.Generator().manual_seed(seed)
    bad = 2
    for i in range(5):
        xs, y = batch(g=g)
        if i == bad:
            opt_a.zero_grad()
            out, feats = a(xs)
            opt_a.observe(_logits(a, feats), y)
            scaler.scale(nn.functional.cross_entropy(out, y)).backward()
            a.encoders[0][0].weight.grad[0, 0, 0, 0] = float("inf")  # one overflowing element
            stale = opt_a._score_sum.clone()
            scale = scaler.get_scale()
            scaler.step(opt_a)
            scaler.update()
            assert scaler.get_scale() == scale / 2  # the scaler did see the inf: skipped
            assert opt_a.step_count == bad  # no step, so the noise counter did not advance
            assert opt_a._observed == 1  # scores stay until zero_grad, which drops them
            opt_a.zero_grad()
            assert opt_a._score_sum is None and opt_a._observed == 0
            continue
        train_step(a, opt_a, names, xs, y, scaler=scaler)
        train_step(b, opt_b, names, xs, y)
        assert torch.equal(opt_a._scores, opt_b._scores)  # nothing of the skipped batch
        assert torch.equal(opt_a._coeffs, opt_b._coeffs)
        if i > bad:
            assert not torch.equal(opt_a._scores, stale + opt_b._scores)
    assert opt_a.step_count == opt_b.step_count == 4
    assert opt_a.skipped_steps == 0  # a scaler skip is not a modulation skip
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.isfinite(p).all()
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", HOST)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_logits_scored_in_fp32(seed, backend, dtype):
    torch.manual_seed(seed)
    model = TwoEncoder()
    opt, names = make(model, torch.optim.SGD(model.parameters(), lr=0.05), backend=backend,
                      alpha=0.8, seed=seed)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    for _ in range(3):
        xs, y = batch()
        opt.zero_grad()
        with torch.autocast("cpu", dtype=dtype):
            out, feats = model(xs)
            zs = _logits(model, feats)
            loss = nn.functional.cross_entropy(out, y)
        assert all(z.dtype == dtype for z in zs)
        opt.observe(dict(zip(names, zs)), y)
        s = opt._score_sum
        assert s.dtype == torch.float32
        # float32 statistics of the low-precision logits (the reference upcasts first)
        torch.testing.assert_close(s, reference.scores([z.float() for z in zs], y),
                                   rtol=1e-6, atol=1e-6)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        assert opt._coeffs.dtype == torch.float32 and torch.isfinite(opt._coeffs).all()
    assert opt.step_count == 3 and opt.skipped_steps == 0
    assert all(torch.isfinite(p).all() for p in model.parameters())


def _expected_lowp(g, k, seed, step, modality, offset, noise):
    """The definition, literally: float32 math, float64 std, one rounding to g's dtype."""
    x = g.float().reshape(-1)
    if not noise:
        return (x * k).to(g.dtype).reshape(g.shape)
    sigma = (g.double().std() + SIGMA_EPS).float() if g.numel() > 1 else torch.tensor(SIGMA_EPS)
    z = reference.philox_normal(seed, step, modality, offset, g.numel())
    return (x * k + sigma * z).to(g.dtype).reshape(g.shape)


@pytest.mark.parametrize("backend", LIVE)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("noise", [True, False])
def test_lowp_gradients_use_fp32_statistics(seed, backend, dtype, noise):
    shapes = [(4, 3, 3, 3), (5, 7), (1,), (33,)]
    grads = [[(torch.randn(s) * 3e-3).to(dtype) for s in shapes],
             [(torch.randn(s) * 2.0).to(dtype) for s in shapes[:2]]]
    k = torch.tensor([0.33, 1.0])
    step = 7
    raw = [[g.clone() for g in t] for t in grads]
    functional.modulate_(grads, k, noise=noise, seed=seed, step=step, backend=backend)
    for m, (ts, rs) in enumerate(zip(grads, raw)):
        off = 0
        for g, r in zip(ts, rs):
            exp = _expected_lowp(r, k[m], seed, step, m, off, noise)
            off += r.numel()
            assert g.dtype == dtype
            if backend == "torch":
                assert torch.equal(g, exp)
            else:  # float32 rounding of log/cos/sin may move the result by one ulp of dtype
                eps = torch.finfo(dtype).eps
                torch.testing.assert_close(g.float(), exp.float(), rtol=eps, atol=1e-6)
    # the std of bf16/fp16 values taken in the low precision itself would differ: make sure the
    # check above could tell (the noise scale of the tiny-gradient modality is ~3e-3)
    g0 = raw[0][0]
    assert g0.std().dtype == dtype


@pytest.mark.parametrize("backend", HOST)
def test_bf16_model_trains_with_fp32_statistics(seed, backend):
    torch.manual_seed(seed)
    model = TwoEncoder().to(torch.bfloat16)
    opt, names = make(model, torch.optim.SGD(model.parameters(), lr=0.0), backend=backend,
                      alpha=0.8, seed=seed, param_filter="matrix")
    raw = {}
    opt.register_step_pre_hook(lambda o, a, kw: raw.update(
        {id(p): p.grad.clone() for p in model.parameters() if p.grad is not None}))
    xs, y = batch()
    xs = [x.to(torch.bfloat16) for x in xs]
    for step in range(2):
        train_step(model, opt, names, xs, y)
        k = opt._coeffs
        assert opt._score_sum is None and k.dtype == torch.float32
        for m, enc in enumerate(model.encoders):
            off = 0
            for p in enc.parameters():
                if p.dim() < 2:
                    assert torch.equal(p.grad, raw[id(p)])  # not selected: untouched
                    continue
                exp = _expected_lowp(raw[id(p)], k[m], seed, step, m, off, True)
                off += p.numel()
                if backend == "torch":
                    assert torch.equal(p.grad, exp)
                else:
                    torch.testing.assert_close(p.grad.float(), exp.float(), rtol=2 ** -7, atol=1e-6)


# ---- non-finite values -------------------------------------------------------------------
@pytest.mark.parametrize("backend", LIVE)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("skip", [False, True])
def test_nonfinite_gradient_is_not_spread(seed, backend, bad, skip):
    """A NaN/inf element stays where it is (k * inf may be inf or, for k = 0, NaN); the rest of
    the tensor gets k * g with no noise; other tensors are modulated normally. With non-finite
    coefficients (a skipped step) everything is left exactly as it was."""
    grads = [[torch.randn(3, 2, 3, 3), torch.randn(40)], [torch.randn(6, 5)]]
    grads[0][0].view(-1)[5] = bad
    raw = [[g.clone() for g in t] for t in grads]
    k = torch.tensor([float("nan")] * 2) if skip else torch.tensor([0.5, 1.0])
    functional.modulate_(grads, k, noise=True, seed=seed, step=3, backend=backend)
    g = grads[0][0].view(-1)
    assert (~torch.isfinite(g)).sum() == 1 and not torch.isfinite(g[5])
    if skip:
        for t, r in zip(grads, raw):
            for x, y in zip(t, r):
                torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True)
        return
    rest = torch.cat([g[:5], g[6:]])
    raw_rest = torch.cat([raw[0][0].view(-1)[:5], raw[0][0].view(-1)[6:]])
    torch.testing.assert_close(rest, raw_rest * 0.5, rtol=1e-6, atol=0)  # no noise here
    assert torch.isfinite(grads[0][1]).all() and not torch.equal(grads[0][1], raw[0][1] * 0.5)


@pytest.mark.parametrize("backend", HOST)
def test_nonfinite_gradient_in_training_does_not_spread(seed, backend):
    """Without a scaler a NaN gradient element reaches the inner step as it is, and only there."""
    torch.manual_seed(seed)
    model = TwoEncoder()
    opt, names = make(model, torch.optim.SGD(model.parameters(), lr=0.1), backend=backend,
                      alpha=0.8, seed=seed)
    xs, y = batch()
    opt.zero_grad()
    out, feats = model(xs)
    opt.observe(_logits(model, feats), y)
    nn.functional.cross_entropy(out, y).backward()
    w = model.encoders[1][2].weight
    w.grad.view(-1)[3] = float("nan")
    opt.step()
    assert torch.isnan(w).sum() == 1
    assert sum(int(torch.isnan(p).sum()) for p in model.parameters()) == 1
    assert opt.skipped_steps == 0


@pytest.mark.parametrize("backend", HOST)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_logits_skip_modulation_and_count(seed, backend, bad):
    torch.manual_seed(seed)
    a = TwoEncoder()
    b = copy.deepcopy(a)
    opt, names = make(a, torch.optim.SGD(a.parameters(), lr=0.1), backend=backend, alpha=0.8)
    plain = torch.optim.SGD(b.parameters(), lr=0.1)
    xs, y = batch()
    opt.zero_grad()
    out, feats = a(xs)
    zs = _logits(a, feats)
    # a user-supplied unimodal logit went bad (the fused loss did not): NaN anywhere, or +inf at
    # the true class (inf - logsumexp = inf - inf), makes the modality's score NaN
    zs[1][0, 0 if math.isnan(bad) else int(y[0])] = bad
    opt.observe(zs, y)
    nn.functional.cross_entropy(out, y).backward()
    opt.step()
    plain.zero_grad()
    nn.functional.cross_entropy(b(xs)[0], y).backward()
    plain.step()
    assert torch.isnan(opt._coeffs).all() and opt.skipped_steps == 1 and opt.step_count == 1
    for p, q in zip(a.parameters(), b.parameters()):  # unmodulated inner step, no noise
        assert torch.equal(p, q)
    train_step(a, opt, names, *batch())  # the next step is normal again
    assert torch.isfinite(opt._coeffs).all() and opt.skipped_steps == 1


def test_infinite_logit_off_the_label_is_the_softmax_limit():
    """+inf at a wrong class: that sample's true-class probability is its limit 0 (finite score,
    no skip); -inf anywhere is a probability-0 class. Only NaN results skip the step."""
    z = torch.randn(4, 5)
    y = torch.tensor([1, 2, 3, 4])
    z[0, 0] = float("inf")
    z[1, 0] = -float("inf")
    z[2, 3] = -float("inf")
    s = reference.scores([z, torch.randn(4, 5)], y)
    assert torch.isfinite(s).all()
    exp = torch.softmax(z[1:].clamp_min(-1e30), 1)[torch.arange(3), y[1:]].sum()
    torch.testing.assert_close(s[0], exp, rtol=1e-6, atol=1e-6)
    for b in LIVE:
        torch.testing.assert_close(functional.scores([z, z], y, backend=b), torch.stack([s[0], s[0]]),
                                   rtol=1e-5, atol=1e-6)
