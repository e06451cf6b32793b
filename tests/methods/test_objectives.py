"""``ModulatedOptimizer.backward(losses)``: two backward passes give each encoder's fused and
summed gradients, every other parameter the summed loss's; bad input is refused by name before
anything is written (gradients, kept gradients), a step without it is refused for a method
that combines objectives, and a method that does not combine gets one backward of the sum."""
import copy

import pytest
import torch
from torch import nn

import mmmod
from _mmpareto_models import NAMES2, AVNet, data, losses_of, make_opt, max_diff, sgd


def _snapshot(model, opt):
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    kept = opt._objectives.fused
    kept = None if kept is None else [[None if g is None else g.clone() for g in row]
                                      for row in kept]
    return grads, kept


def _same(a, b):
    if a is None or b is None:
        return a is b
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))


def test_passes_give_the_fused_and_summed_gradients(seed):
    torch.manual_seed(seed)
    model = AVNet()
    opt = make_opt(model, NAMES2)
    xs, y = data(NAMES2, 1, seed)[0]
    opt.backward(losses_of(model, xs, y, NAMES2))
    ref = copy.deepcopy(model)
    ls = losses_of(ref, xs, y, NAMES2)
    g_mm = torch.autograd.grad(ls["multimodal"], list(ref.parameters()), retain_graph=True,
                               allow_unused=True)
    sum(ls.values()).backward()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7)  # every .grad: g_sum
    kept = [g for row in opt._objectives.fused for g in row]
    enc = [id(p) for n in NAMES2 for p in getattr(ref, f"{n}_net").parameters()]
    want = [g for p, g in zip(ref.parameters(), g_mm) if id(p) in enc]
    assert len(kept) == len(want)
    for a, b in zip(kept, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_backward_passes_are_two(seed, monkeypatch):
    model = AVNet()
    opt = make_opt(model, NAMES2)
    xs, y = data(NAMES2, 1, seed)[0]
    calls = []
    run = torch.autograd._engine_run_backward  # what backward() and autograd.grad() call

    def counting(*a, **k):
        calls.append(1)
        return run(*a, **k)
    monkeypatch.setattr(torch.autograd, "_engine_run_backward", counting)
    opt.backward(losses_of(model, xs, y, NAMES2))
    monkeypatch.undo()
    assert len(calls) == 2


BAD = {
    "missing": (lambda ls, m, xs, y: {k: v for k, v in ls.items() if k != "visual"},
                KeyError, "modality 'visual'"),
    "no fused": (lambda ls, m, xs, y: {k: v for k, v in ls.items() if k != "multimodal"},
                 KeyError, "exactly one objective besides"),
    "two fused": (lambda ls, m, xs, y: dict(ls, extra=ls["multimodal"] * 2), KeyError,
                  r"\['multimodal', 'extra'\]"),
    "non-scalar": (lambda ls, m, xs, y: dict(ls, audio=ls["audio"].repeat(3)), ValueError,
                   "objective 'audio' must be a scalar"),
    "other device": (lambda ls, m, xs, y: dict(ls, visual=torch.zeros((), device="meta",
                                                                        requires_grad=True)),
                     ValueError, "objective 'visual' is on meta"),
    "not a tensor": (lambda ls, m, xs, y: dict(ls, audio=1.0), TypeError,
                     "objective 'audio' must be a tensor"),
    "no graph": (lambda ls, m, xs, y: dict(ls, audio=ls["audio"].detach()), ValueError,
                 "objective 'audio' does not depend"),
    "fused reaches no encoder": (
        lambda ls, m, xs, y: dict(ls, multimodal=nn.functional.cross_entropy(
            m.head(torch.cat([m.audio_net(xs[0]), m.visual_net(xs[1])], 1).detach()), y)),
        ValueError, "fused objective 'multimodal' reaches no selected tensor of modality 'audio'"),
    "unimodal reaches its own encoder not": (
        lambda ls, m, xs, y: dict(ls, audio=m.head_audio.weight.sum()),
        ValueError, "objective 'audio' reaches no selected tensor of its own"),
    "unimodal reaches another encoder": (
        lambda ls, m, xs, y: dict(ls, audio=ls["audio"] + ls["visual"]),
        ValueError, "objective 'audio' reaches selected tensors of modality 'visual'"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_refused_before_anything_is_written(seed, case):
    make_bad, exc, match = BAD[case]
    torch.manual_seed(seed)
    model = AVNet()
    opt = make_opt(model, NAMES2)
    (xs, y), (xs2, y2) = data(NAMES2, 2, seed)
    opt.backward(losses_of(model, xs, y, NAMES2))  # a first micro-batch: accumulation state
    before = _snapshot(model, opt)
    bad = make_bad(losses_of(model, xs2, y2, NAMES2), model, xs2, y2)
    with pytest.raises(exc, match=match):
        opt.backward(bad)
    after = _snapshot(model, opt)
    assert _same(before[0], after[0]) and _same(before[1], after[1])
    # the step still runs on what the good call left
    ref = copy.deepcopy(model)
    opt.step()
    assert max_diff(ref, model) > 0


def test_step_without_backward_losses_is_refused(seed):
    model = AVNet()
    opt = make_opt(model, NAMES2)
    xs, y = data(NAMES2, 1, seed)[0]
    sum(losses_of(model, xs, y, NAMES2).values()).backward()
    params = [p.detach().clone() for p in model.parameters()]
    grads = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"opt.backward\("):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))


def test_zero_grad_drops_the_kept_gradients(seed):
    model = AVNet()
    opt = make_opt(model, NAMES2)
    xs, y = data(NAMES2, 1, seed)[0]
    opt.backward(losses_of(model, xs, y, NAMES2))
    assert opt._objectives.pending
    opt.zero_grad()
    assert not opt._objectives.pending


def test_param_slices_are_refused_for_a_combining_method():
    model = AVNet()
    with pytest.raises(ValueError, match="ParamSlice"):
        mmmod.ModulatedOptimizer(sgd(model), {
            "audio": [mmmod.ParamSlice(model.head.weight, 1, 0, 6)],
            "visual": [mmmod.ParamSlice(model.head.weight, 1, 6, 12)]}, method="mmpareto")


def test_other_methods_get_one_backward_of_the_sum(seed):
    torch.manual_seed(seed)
    a = AVNet()
    b = copy.deepcopy(a)
    opt = mmmod.ModulatedOptimizer(sgd(a), {"audio": a.audio_net, "visual": a.visual_net},
                                   method="none")
    xs, y = data(NAMES2, 1, seed)[0]
    opt.backward(losses_of(a, xs, y, NAMES2))
    sum(losses_of(b, xs, y, NAMES2).values()).backward()
    assert not opt._objectives.pending
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p.grad, q.grad)


def test_calls_of_one_step_must_agree_on_the_scaler(seed):
    model = AVNet()
    opt = make_opt(model, NAMES2)
    (xs, y), (xs2, y2) = data(NAMES2, 2, seed)
    opt.backward(losses_of(model, xs, y, NAMES2))
    before = _snapshot(model, opt)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 4)
    with pytest.raises(ValueError, match="same scaler"):
        opt.backward(losses_of(model, xs2, y2, NAMES2), scaler=scaler)
    after = _snapshot(model, opt)
    assert _same(before[0], after[0]) and _same(before[1], after[1])
    # a disabled scaler is no scaler
    opt.backward(losses_of(model, xs2, y2, NAMES2),
                 scaler=torch.amp.GradScaler("cpu", enabled=False))
    assert opt._objectives.fused_scale is None
