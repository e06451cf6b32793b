"""ModulatedOptimizer: equivalence with functional + inner step, torch.optim integration."""
import copy
import warnings

import pytest
import torch
from torch import nn

import mmmod
from mmmod import functional
from _models import TwoEncoder, batch, make, train_step

pytestmark = pytest.mark.filterwarnings("ignore:mmmod. no fused backend")


def manual_step(model, inner, names, xs, y, method, alpha, seed, step, param_filter):
    """What one step must do, written with the functional API."""
    inner.zero_grad()
    out, feats = model(xs)
    s = functional.scores(functional_logits(model, feats), y, backend="torch")
    k = functional.coefficients(s, method, alpha=alpha)
    nn.functional.cross_entropy(out, y).backward()
    keep = mmmod.filters.resolve(param_filter)
    grads = [[p.grad for n, p in enc.named_parameters() if keep(n, p)] for enc in model.encoders]
    functional.modulate_(grads, k, noise=method == "ogm_ge", seed=seed, step=step, backend="torch")
    inner.step()
    return s, k


def functional_logits(model, feats):
    return mmmod.fusion.concat_logits(model.head, feats)


@pytest.mark.parametrize("inner_cls", [torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW])
@pytest.mark.parametrize("method,param_filter", [("ogm_ge", "conv"), ("ogm", "matrix"), ("mlb", "all")])
def test_matches_functional_then_inner_step(seed, inner_cls, method, param_filter):
    torch.manual_seed(seed)
    a = TwoEncoder()
    b = copy.deepcopy(a)
    kw = {"lr": 0.05, "momentum": 0.9} if inner_cls is torch.optim.SGD else {"lr": 1e-2}
    opt, names = make(a, inner_cls(a.parameters(), **kw), method=method, alpha=0.8,
                      param_filter=param_filter, backend="torch", seed=seed)
    inner_b = inner_cls(b.parameters(), **kw)
    g = torch.Generator().manual_seed(seed)
    for step in range(3):
        xs, y = batch(g=g)
        train_step(a, opt, names, xs, y)
        s, k = manual_step(b, inner_b, names, xs, y, method, 0.8, seed, step, param_filter)
        assert torch.equal(torch.stack(list(opt.scores.values())), s)
        assert torch.equal(torch.stack(list(opt.coefficients.values())), k)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_is_an_optimizer_with_live_state():
    model = TwoEncoder()
    inner = torch.optim.Adam(model.parameters(), lr=1e-3)
    opt, _ = make(model, inner)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is inner.param_groups and opt.state is inner.state
    opt.param_groups[0]["lr"] = 0.5
    assert inner.param_groups[0]["lr"] == 0.5


def test_lr_scheduler_loop(seed):
    model = TwoEncoder()
    opt, names = make(model, torch.optim.SGD(model.parameters(), lr=1.0), backend="torch")
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # e.g. "lr_scheduler.step() before optimizer.step()"
        for _ in range(3):
            train_step(model, opt, names, *batch())
            sched.step()
    assert opt.param_groups[0]["lr"] == 0.125


def test_accumulation_scores_sum_exactly(seed):
    model = TwoEncoder()
    opt, names = make(model, torch.optim.SGD(model.parameters(), lr=0.1), backend="torch")
    xs, y = batch(b=12)
    with torch.no_grad():
        _, feats = model(xs)
        whole = functional.scores(functional_logits(model, feats), y, backend="torch")
    opt.zero_grad()
    parts = []
    for part in (slice(0, 5), slice(5, 12)):
        out, feats = model([x[part] for x in xs])
        zs = functional_logits(model, feats)
        parts.append(functional.scores(zs, y[part], backend="torch"))
        opt.observe(zs, y[part])
        nn.functional.cross_entropy(out, y[part]).backward()
    opt.step()
    assert torch.equal(opt._scores, parts[0] + parts[1])
    torch.testing.assert_close(opt._scores, whole, rtol=1e-6, atol=1e-6)


def test_grad_scaler_loop_sees_unscaled_grads_and_skips_inf(seed):
    torch.manual_seed(seed)
    a = TwoEncoder()
    b = copy.deepcopy(a)
    opt_a, names = make(a, torch.optim.SGD(a.parameters(), lr=0.1), backend="torch", alpha=0.8)
    opt_b, _ = make(b, torch.optim.SGD(b.parameters(), lr=0.1), backend="torch", alpha=0.8)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    g = torch.Generator().manual_seed(seed)
    for i in range(4):
        xs, y = batch(g=g)
        if i == 2:  # an overflowing step: the scaler skips it, nothing may leak into step 3
            opt_a.zero_grad()
            out, feats = a(xs)
            opt_a.observe(functional_logits(a, feats), y)
            scaler.scale(nn.functional.cross_entropy(out, y) * float("inf")).backward()
            scaler.step(opt_a)
            scaler.update()
            continue
        train_step(a, opt_a, names, xs, y, scaler=scaler)
        train_step(b, opt_b, names, xs, y)
        assert torch.equal(opt_a._scores, opt_b._scores)
    assert opt_a.step_count == opt_b.step_count == 3
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_state_dict_round_trip_continues_bitwise(seed):
    torch.manual_seed(seed)
    model = TwoEncoder()
    opt, names = make(model, torch.optim.AdamW(model.parameters(), lr=1e-2), backend="torch",
                      alpha=0.8, seed=seed)
    data = [batch(g=torch.Generator().manual_seed(seed + i)) for i in range(6)]
    for xs, y in data[:3]:
        train_step(model, opt, names, xs, y)
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    for xs, y in data[3:]:
        train_step(model, opt, names, xs, y)
    model2 = TwoEncoder()
    model2.load_state_dict(saved_model)
    opt2, _ = make(model2, torch.optim.AdamW(model2.parameters(), lr=1e-2), backend="torch",
                   alpha=0.1, seed=999)
    opt2.load_state_dict(saved_opt)
    assert opt2.alpha == 0.8 and opt2.seed == seed and opt2.step_count == 3
    for xs, y in data[3:]:
        train_step(model2, opt2, names, xs, y)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    assert torch.equal(opt._coeffs, opt2._coeffs)


def test_update_mode_scales_adam_step_by_k(seed):
    torch.manual_seed(seed)
    a = TwoEncoder()
    b = copy.deepcopy(a)
    opt_u, names = make(a, torch.optim.Adam(a.parameters(), lr=1e-2), method="ogm", alpha=0.8,
                        apply_to="update", param_filter="all", backend="torch")
    plain = torch.optim.Adam(b.parameters(), lr=1e-2)
    xs, y = batch()
    before = [p.detach().clone() for p in a.parameters()]
    train_step(a, opt_u, names, xs, y)
    plain.zero_grad()
    nn.functional.cross_entropy(b(xs)[0], y).backward()
    plain.step()
    k = opt_u._coeffs
    assert (k < 1).any()
    params_a, params_b = list(a.parameters()), list(b.parameters())
    enc_ids = {id(p): m for m, enc in enumerate(a.encoders) for p in enc.parameters()}
    for p, q, p0 in zip(params_a, params_b, before):
        m = enc_ids.get(id(p))
        scale = 1.0 if m is None else float(k[m])
        torch.testing.assert_close(p - p0, scale * (q - p0), rtol=1e-4, atol=1e-7)


def test_window_computes_but_does_not_modulate(seed):
    torch.manual_seed(seed)
    a = TwoEncoder()
    b = copy.deepcopy(a)
    opt, names = make(a, torch.optim.SGD(a.parameters(), lr=0.1), backend="torch",
                      modulation_starts=2, modulation_ends=3, alpha=0.8)
    plain = torch.optim.SGD(b.parameters(), lr=0.1)
    xs, y = batch()
    opt.set_epoch(1)
    train_step(a, opt, names, xs, y)
    plain.zero_grad()
    nn.functional.cross_entropy(b(xs)[0], y).backward()
    plain.step()
    assert len(opt.coefficients) == 2 and (opt._coeffs < 1).any()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    opt.set_epoch(3)
    assert opt.in_window()
    opt.set_epoch(4)
    assert not opt.in_window()


def test_method_none_is_the_inner_optimizer(seed):
    torch.manual_seed(seed)
    a = TwoEncoder()
    b = copy.deepcopy(a)
    opt, names = make(a, torch.optim.SGD(a.parameters(), lr=0.1), method="none")
    plain = torch.optim.SGD(b.parameters(), lr=0.1)
    xs, y = batch()
    opt.zero_grad()
    nn.functional.cross_entropy(a(xs)[0], y).backward()
    opt.step()  # no observe needed
    plain.zero_grad()
    nn.functional.cross_entropy(b(xs)[0], y).backward()
    plain.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_closure_is_evaluated_before_modulation(seed):
    model = TwoEncoder()
    opt, names = make(model, torch.optim.SGD(model.parameters(), lr=0.1), backend="torch")
    xs, y = batch()

    def closure():
        opt.zero_grad()
        out, feats = model(xs)
        opt.observe(functional_logits(model, feats), y)
        loss = nn.functional.cross_entropy(out, y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss is not None and opt.step_count == 1


def test_torch_rng_mode_through_optimizer_matches_official_loop(seed):
    torch.manual_seed(seed)
    a = TwoEncoder()
    b = copy.deepcopy(a)
    opt, names = make(a, torch.optim.SGD(a.parameters(), lr=0.1), alpha=0.8, noise_rng="torch",
                      backend="torch")
    plain = torch.optim.SGD(b.parameters(), lr=0.1)
    xs, y = batch()
    torch.manual_seed(7)
    train_step(a, opt, names, xs, y)
    k = opt._coeffs
    plain.zero_grad()
    nn.functional.cross_entropy(b(xs)[0], y).backward()
    torch.manual_seed(7)
    for m, enc in enumerate(b.encoders):  # the official loop: conv weights of each encoder
        for p in enc.parameters():
            if p.grad.dim() == 4:
                p.grad = p.grad * float(k[m]) + torch.zeros_like(p.grad).normal_(
                    0, p.grad.std().item() + 1e-8)
    plain.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_mlb_scales_each_modality_slice_of_the_fusion_head(seed):
    torch.manual_seed(seed)
    model = TwoEncoder(width=4)
    cols = mmmod.fusion.concat_slices(model.head, [4, 4])
    inner = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: read the modulated grads
    opt = mmmod.ModulatedOptimizer(
        inner, {"audio": [model.encoders[0], cols[0]], "visual": [model.encoders[1], cols[1]]},
        method="mlb", alpha=2.0, backend="torch")
    xs, y = batch()
    opt.zero_grad()
    out, feats = model(xs)
    opt.observe(mmmod.fusion.concat_logits(model.head, feats), y)
    nn.functional.cross_entropy(out, y).backward()
    raw_w, raw_b = model.head.weight.grad.clone(), model.head.bias.grad.clone()
    raw_enc = [p.grad.clone() for p in model.encoders[1].parameters()]
    opt.step()
    k = opt._coeffs
    assert not torch.equal(k, torch.ones(2))
    w = model.head.weight.grad
    assert torch.equal(w[:, :4], (raw_w[:, :4] * k[0]))
    assert torch.equal(w[:, 4:], (raw_w[:, 4:] * k[1]))
    assert torch.equal(model.head.bias.grad, raw_b)  # the shared bias is nobody's
    for p, g in zip(model.encoders[1].parameters(), raw_enc):
        assert torch.equal(p.grad, g * k[1])


def test_overlapping_slices_rejected():
    model = TwoEncoder(width=4)
    with pytest.raises(ValueError, match="also belongs to modality 'audio'"):
        mmmod.ModulatedOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1),
            {"audio": [mmmod.ParamSlice(model.head.weight, 1, 0, 5)],
             "visual": [mmmod.ParamSlice(model.head.weight, 1, 4, 8)]}, method="mlb")
    with pytest.raises(ValueError, match="out of range"):
        mmmod.ParamSlice(model.head.weight, 1, 4, 9)


@pytest.mark.parametrize("name", mmmod.methods.names())
def test_every_registered_method_matches_its_hooks_written_by_hand(seed, name):
    """The optimizer drives a method's hooks exactly as the Method interface describes:
    scores (fused probabilities or the method's own batch_scores), sums or per-sample means
    (over all micro-batches), coefficients with the method's state, on_epoch (with the selected
    parameters when asked), correct_grads_ before the modulation, noise, then the inner step."""
    m = mmmod.methods.get(name)
    if m.combines_objectives:
        pytest.skip("trained with opt.backward(losses): tests/methods/test_mmpareto.py drives its hooks")
    torch.manual_seed(seed)
    a = TwoEncoder()
    b = copy.deepcopy(a)
    opt, names = make(a, torch.optim.SGD(a.parameters(), lr=0.05), method=name, backend="torch",
                      seed=seed)
    inner_b = torch.optim.SGD(b.parameters(), lr=0.05)
    keep = mmmod.filters.resolve(m.default_filter)
    params = [[p for n, p in enc.named_parameters() if keep(n, p)] for enc in b.encoders]
    state = m.init_state(2, "cpu")
    g = torch.Generator().manual_seed(seed)
    step = 0
    for epoch in range(2):
        # per-epoch inputs a method takes (MSLR: validation accuracies), forwarded by set_epoch
        inputs = {"val_acc": {"audio": 0.7 - 0.1 * epoch, "visual": 0.4}} if name == "mslr" else {}
        opt.set_epoch(epoch, **inputs)
        m.on_epoch(state, epoch, names=names, **inputs,
                   **({"params": params} if m.needs_params else {}))
        for _ in range(2):
            micro = [batch(b=3, g=g) for _ in range(2)]  # accumulation over two micro-batches
            opt.zero_grad()
            inner_b.zero_grad()
            sums = 0
            for xs, y in micro:
                out, feats = a(xs)
                opt.observe(dict(zip(names, mmmod.fusion.concat_logits(a.head, feats))), y)
                nn.functional.cross_entropy(out, y).backward()
                out, feats = b(xs)
                zs = mmmod.fusion.concat_logits(b.head, feats)
                sums = sums + (functional.scores(zs, y, backend="torch") if m.score == "prob"
                               else m.batch_scores(zs, y))
                nn.functional.cross_entropy(out, y).backward()
            opt.step()
            if m.modulates:
                per = sums / 6 if m.score_reduction == "mean" else sums
                k = functional.coefficients(per, name, backend="torch", state=state)
                grads = [[p.grad for p in ps] for ps in params]
                if m.corrects_grads:
                    m.correct_grads_(params, grads, state, backend="torch")
                functional.modulate_(grads, k, noise=m.noise, seed=seed, step=step,
                                     backend="torch")
                assert torch.equal(opt._coeffs, k) or torch.isnan(k).all()
            inner_b.step()
            step += 1
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    for key, v in state.items():
        assert torch.equal(opt._method_state[key], v)
