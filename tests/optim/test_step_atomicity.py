"""No refusal in ``step()`` after its first write: a failure at any check stage (injected, or a
real bad input: a fused param-group option, a bad CPU-kernel environment variable) leaves every
gradient, parameter, inner optimizer state and method state bit for bit as it was and the step
uncounted; the retry then gives what a step that never failed gives."""
import copy

import pytest
import torch
from torch import nn

import mmmod
from mmmod import backends, functional
from mmmod.optim import step_checks
from _models import TwoEncoder, batch, make

pytestmark = pytest.mark.filterwarnings("ignore:mmmod. no fused backend")

LIVE = [b for b in ("torch", "cpu") if backends.status(b)[0]]
CPU_FUSED = backends.status("cpu")[0] and mmmod._ops.has_kernel("fused_adam_", "CPU")
METHODS = ["agm", "inforeg", "ogm_ge"]


class Injected(RuntimeError):
    pass


def _setup(method, backend, fused):
    torch.manual_seed(0)
    model = TwoEncoder()
    opt, names = make(model, torch.optim.Adam(model.parameters(), lr=1e-2), method=method,
                      backend=backend, fused=fused, seed=3, history=8)
    opt.set_epoch(0)
    g = torch.Generator().manual_seed(1)
    data = [batch(g=g) for _ in range(2)]
    _forward_backward(model, opt, names, *data[0])
    opt.step()  # inner state, method state and history all non-trivial
    _forward_backward(model, opt, names, *data[1])
    return model, opt


def _forward_backward(model, opt, names, xs, y):
    opt.zero_grad()
    out, feats = model(xs)
    opt.observe(dict(zip(names, mmmod.fusion.concat_logits(model.head, feats))), y)
    nn.functional.cross_entropy(out, y).backward()


def _everything(model, opt):
    """Bit copies of every gradient, parameter, inner state and method state, and counters."""
    params = [p.detach().clone() for p in model.parameters()]
    grads = [p.grad.clone() for p in model.parameters()]
    inner = {id(p): {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
             for p, s in opt.optimizer.state.items()}
    method = {k: v.clone() for k, v in opt._method_state.items()}
    return (params, grads, inner, method, opt.step_count, opt._observed, opt._score_sum.clone(),
            len(opt.history(format="rows")), opt.skipped_steps)


def _assert_unchanged(model, opt, saved):
    params, grads, inner, method, step_count, observed, score_sum, rows, skipped = saved
    for p, q, g in zip(model.parameters(), params, grads):
        assert torch.equal(p.detach(), q) and torch.equal(p.grad, g)
    now = {id(p): s for p, s in opt.optimizer.state.items()}
    assert now.keys() == inner.keys()
    for key, st in inner.items():
        for k, v in st.items():
            w = now[key][k]
            assert torch.equal(w, v) if isinstance(v, torch.Tensor) else w == v, k
    assert opt._method_state.keys() == method.keys()
    for k, v in method.items():
        assert torch.equal(opt._method_state[k], v), k
    assert opt.step_count == step_count and opt._observed == observed
    assert torch.equal(opt._score_sum, score_sum)
    assert len(opt.history(format="rows")) == rows and opt.skipped_steps == skipped


def _retry_matches_a_clean_step(model, opt, twin_model, twin_opt):
    opt.step()
    twin_opt.step()
    assert opt.step_count == twin_opt.step_count
    for p, q in zip(model.parameters(), twin_model.parameters()):
        assert torch.equal(p.detach(), q.detach())
    for k, v in twin_opt._method_state.items():
        assert torch.equal(opt._method_state[k], v), k


def _fused_options(backend):
    return [False] + ([True] if backend == "torch" or CPU_FUSED else [])


def _fail_then_retry(method, backend, fused, inject, monkeypatch, match):
    model, opt = _setup(method, backend, fused)
    twin_model, twin_opt = copy.deepcopy((model, opt))
    for p, q in zip(model.parameters(), twin_model.parameters()):
        q.grad = p.grad.clone()  # (deepcopy leaves gradients behind)
    saved = _everything(model, opt)
    with monkeypatch.context() as mp:
        inject(mp, opt)
        with pytest.raises(Exception, match=match):
            opt.step()
    _assert_unchanged(model, opt, saved)
    _retry_matches_a_clean_step(model, opt, twin_model, twin_opt)


@pytest.mark.parametrize("backend", LIVE)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("stage", step_checks.STAGES)
def test_a_failing_check_stage_changes_nothing(monkeypatch, backend, method, stage):
    def inject(mp, opt):
        def boom(*a, **k):
            raise Injected(f"injected failure in {stage}")
        mp.setattr(step_checks, stage, boom)
    for fused in _fused_options(backend):
        _fail_then_retry(method, backend, fused, inject, monkeypatch, "injected")


@pytest.mark.parametrize("backend", LIVE)
@pytest.mark.parametrize("method", METHODS)
def test_a_failure_at_the_first_write_changes_nothing(monkeypatch, backend, method):
    """The coefficients (AGM's running mean, InfoReg's beta) are the first write: everything
    before it is a check, so failing there leaves the step unapplied too."""
    def inject(mp, opt):
        def boom(*a, **k):
            raise Injected("injected failure in the coefficients")
        mp.setattr(functional, "coefficients", boom)
    for fused in _fused_options(backend):
        _fail_then_retry(method, backend, fused, inject, monkeypatch, "injected")


@pytest.mark.parametrize("backend", LIVE)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("option", ["amsgrad", "lr_tensor"])
def test_bad_fused_group_option_is_refused_before_any_write(monkeypatch, backend, method, option):
    def inject(mp, opt):
        group = opt.optimizer.param_groups[0]
        if option == "amsgrad":
            mp.setitem(group, "amsgrad", True)
        else:
            mp.setitem(group, "lr", torch.tensor(0.01))
    for fused in _fused_options(backend)[1:]:
        _fail_then_retry(method, backend, fused, inject, monkeypatch, "fused=True")


@pytest.mark.skipif(not backends.status("cpu")[0], reason="cpu extension not built")
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("var,value", [("MMMOD_CPU_KERNELS", "avx9"), ("MMMOD_CPU_WINDOW", "1e6"),
                                       ("MMMOD_CPU_WINDOW", "abc"), ("MMMOD_CPU_WINDOW", "-5")])
def test_bad_cpu_environment_is_refused_before_any_write(monkeypatch, method, var, value):
    def inject(mp, opt):
        mp.setenv(var, value)
    for fused in _fused_options("cpu"):
        _fail_then_retry(method, "cpu", fused, inject, monkeypatch, var)


@pytest.mark.skipif(not backends.status("triton")[0], reason="triton backend not available")
@pytest.mark.parametrize("how", ["stage", "amsgrad"])
def test_triton_interpreter_refusals_change_nothing(monkeypatch, how):
    """One cheap case on the Triton interpreter: an injected check failure and a bad fused
    option, both with the fused update."""
    def inject(mp, opt):
        if how == "amsgrad":
            mp.setitem(opt.optimizer.param_groups[0], "amsgrad", True)
        else:
            def boom(*a, **k):
                raise Injected("injected failure in fused_plan")
            mp.setattr(step_checks, "fused_plan", boom)
    _fail_then_retry("agm", "triton", True, inject, monkeypatch,
                     "injected" if how == "stage" else "fused=True")
