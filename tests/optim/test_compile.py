"""torch.compile: a compiled model trains with ModulatedOptimizer; mmmod's functional calls trace
into one graph (no graph breaks) for the plain-torch backend and for the registered ops of the
compiled ``cpu`` extension (skipped while it is not built).

The default suite uses the ``aot_eager`` compiler (dynamo + AOTAutograd, seconds); inductor's
C++ code generation takes about half a minute on a small CPU and runs under ``-m slow``.
"""
import copy

import pytest
import torch
from torch import nn

import mmmod
from mmmod import backends, functional
from _models import TwoEncoder, batch, make
from _dist_utils import one_thread

pytestmark = [pytest.mark.filterwarnings("ignore:mmmod. no fused backend"),
              pytest.mark.filterwarnings("ignore::UserWarning")]

# on a GPU: the CUDA extension, and triton where its kernels are the CUDA implementation of the
# ops (no CUDA extension loaded); the triton path on the CPU interpreter is traced in test_ops.py
TRACEABLE = (["torch"] + [b for b in ("cpu",) if backends.status(b)[0]]
             + [b for b in ("cuda",) if torch.cuda.is_available() and backends.status(b)[0]]
             + [b for b in ("triton",) if torch.cuda.is_available() and backends.status(b)[0]
                and "cuda" in backends._load(b).op_device_types])


def _dev(backend):
    return torch.device("cuda" if backend in ("cuda", "triton") else "cpu")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    with one_thread():
        yield
    torch._dynamo.reset()


def _train(model, fwd, opt, names, data, step=None):
    for xs, y in data:
        opt.zero_grad()
        out, feats = fwd(xs)
        opt.observe(dict(zip(names, mmmod.fusion.concat_logits(model.head, feats))), y)
        nn.functional.cross_entropy(out, y).backward()
        (step or opt.step)()
    return opt


def _run_compiled_model(seed, compiler, method="ogm_ge"):
    torch.manual_seed(seed)
    a = TwoEncoder()
    b = copy.deepcopy(a)
    kw = dict(method=method, alpha=0.8, seed=seed, backend="torch")
    opt_a, names = make(a, torch.optim.AdamW(a.parameters(), lr=1e-2), **kw)
    opt_b, _ = make(b, torch.optim.AdamW(b.parameters(), lr=1e-2), **kw)
    g = torch.Generator().manual_seed(seed)
    data = [batch(g=g) for _ in range(3)]
    _train(a, torch.compile(a, backend=compiler), opt_a, names, data)
    _train(b, b, opt_b, names, data)
    assert opt_a.step_count == 3 and opt_a.skipped_steps == 0
    torch.testing.assert_close(opt_a._coeffs, opt_b._coeffs, rtol=1e-4, atol=1e-5)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["ogm_ge", "mlb"])
def test_compiled_model_trains(seed, method):
    _run_compiled_model(seed, "aot_eager", method)


@pytest.mark.slow
def test_compiled_model_trains_inductor(seed):
    _run_compiled_model(seed, "inductor")


def _compiled_step_equals_eager(seed, inner, **kw):
    torch.manual_seed(seed)
    a = TwoEncoder()
    b = copy.deepcopy(a)
    kw = dict(alpha=0.8, seed=seed, backend="torch", history=8, **kw)
    opt_a, names = make(a, inner(a.parameters()), **kw)
    opt_b, _ = make(b, inner(b.parameters()), **kw)
    data = [batch() for _ in range(3)]
    _train(a, a, opt_a, names, data, step=torch.compile(opt_a.step, backend="eager"))
    _train(b, b, opt_b, names, data)
    assert opt_a.step_count == opt_b.step_count == 3
    if opt_b.device_step is not None:
        assert torch.equal(opt_a.device_step, opt_b.device_step)
    assert opt_a._score_sum is None and opt_a._observed == 0  # scores cleared
    for key in ("coefficients", "scores"):
        got, want = getattr(opt_a, key), getattr(opt_b, key)
        assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)
    ha, hb = opt_a.history(), opt_b.history()
    assert ha.keys() == hb.keys() and all(torch.equal(ha[k], hb[k]) for k in hb)
    assert ha["step"].tolist() == [0, 1, 2]
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("capturable", [False, True])
def test_compiled_optimizer_step_equals_eager(seed, capturable):
    """``torch.compile(opt.step)``: the step runs eagerly (it is excluded from dynamo), so
    parameters, counters, scores, coefficients and history equal the eager step's bit for bit."""
    _compiled_step_equals_eager(seed, lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
                                capturable=capturable)


@pytest.mark.slow
def test_compiled_optimizer_step(seed):
    """The same with Adam and the default (inductor-free) eager compiler, longer: kept under
    ``-m slow`` as the documented check of docs/distributed.md."""
    _compiled_step_equals_eager(seed, lambda ps: torch.optim.Adam(ps, lr=1e-2), method="agm")


def _explain_no_breaks(fn, *args):
    ex = torch._dynamo.explain(fn)(*args)
    reasons = [str(r.reason) for r in ex.break_reasons]
    assert ex.graph_break_count == 0 and ex.graph_count == 1, reasons


@pytest.mark.parametrize("backend", TRACEABLE)
def test_functional_calls_have_no_graph_breaks(seed, backend):
    d = _dev(backend)
    zs = [torch.randn(6, 5, device=d), torch.randn(6, 7, device=d), torch.randn(6, 3, device=d)]
    y = torch.randint(0, 3, (6,), device=d)
    _explain_no_breaks(lambda zs, y: functional.scores(zs, y, backend=backend), zs, y)
    s = torch.rand(3, device=d) * 6
    for method in ("ogm_ge", "mlb"):
        _explain_no_breaks(lambda s: functional.coefficients(s, method, backend=backend), s)
    grads = [torch.randn(4, 3, 3, 3, device=d), torch.randn(5, 4, device=d), torch.randn(7, device=d)]
    k = torch.tensor([0.4, 1.0], device=d)
    _explain_no_breaks(lambda g0, g1, g2, k: functional.modulate_(
        [[g0, g1], [g2]], k, noise=True, seed=seed, step=3, backend=backend), *grads, k)


@pytest.mark.parametrize("backend", TRACEABLE)
def test_fullgraph_functional_step_matches_eager(seed, backend):
    """scores -> coefficients -> modulate_ as one fullgraph-compiled function, same bits."""
    def fused(z0, z1, y, g0, g1, g2):
        s = functional.scores([z0, z1], y, backend=backend)
        k = functional.coefficients(s, "ogm_ge", alpha=0.8, backend=backend)
        functional.modulate_([[g0, g1], [g2]], k, noise=True, seed=seed, step=5, backend=backend)
        return s, k

    args = [t.to(_dev(backend)) for t in (
        torch.randn(6, 5), torch.randn(6, 5), torch.randint(0, 5, (6,)),
        torch.randn(4, 3, 3, 3), torch.randn(5, 4), torch.randn(7))]
    eager_args = [a.clone() for a in args]
    s, k = torch.compile(fused, backend="eager", fullgraph=True)(*args)
    s_e, k_e = fused(*eager_args)
    assert torch.equal(s, s_e) and torch.equal(k, k_e)
    for g, h in zip(args[3:], eager_args[3:]):
        assert torch.equal(g, h)


def test_cpu_extension_ops_are_registered():
    live, why = backends.status("cpu")
    if not live:
        pytest.skip(f"cpu extension not built: {why}")
    ops = [n for n in dir(torch.ops.mmmod) if not n.startswith("_")]
    assert ops, "the cpu backend is live but registers no torch.ops.mmmod operators"
