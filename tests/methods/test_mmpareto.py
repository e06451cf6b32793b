"""MMPareto (docs/semantics.md section 11): the combine's reference against the authors' solver
and per-tensor loop, whole training runs against a transcription of the authors' loop
(benchmarks/mmpareto_eager.py: retained backward passes, clones, their solver) over several
epochs on every live backend, accumulation, GradScaler, fused=True, torch.compile of the model,
resume, and the weights it logs."""
import copy
import os
import sys

import pytest
import torch
from torch import nn

import mmmod
from mmmod.reference import combine
from _backends import LIVE_BACKENDS
from _mmpareto_models import NAMES2, NAMES3, AVNet, data, losses_of, make_opt, max_diff, mmmod_step, sgd

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
from benchmarks import mmpareto_eager as eager  # noqa: E402

#: parameters after EPOCHS x STEPS steps: the code's float32 solver and its third backward pass
#: round differently from mmmod's float64 sums and g_sum - g_mm (docs/semantics.md section 11)
PARAM_ATOL = 2e-5
EPOCHS, STEPS = 3, 4


# ---- the reference against the authors' solver and loop ----------------------------------------
def _pair(seed, conflict, shapes=((3, 4), (5,), (2, 2, 3))):
    g = torch.Generator().manual_seed(seed)
    a = [torch.randn(s, generator=g) for s in shapes]
    b = [torch.randn(s, generator=g) * 0.7 + (-0.8 if conflict else 0.8) * x for s, x in
         zip(shapes, a)]
    return a, b


@pytest.mark.parametrize("conflict", [True, False])
def test_reference_weights_and_combined_gradient_match_the_authors(seed, conflict):
    a, b = _pair(seed, conflict)
    s = [x + y for x, y in zip(a, b)]
    want_w, _ = eager.find_min_norm_element([a + [torch.cat([x.flatten() for x in a])],
                                             b + [torch.cat([x.flatten() for x in b])]])
    cos = nn.functional.cosine_similarity(torch.cat([x.flatten() for x in a]),
                                          torch.cat([x.flatten() for x in b]), dim=0)
    if cos > 0:
        want_w = [0.5, 0.5]
    assert (cos > 0) == (not conflict)
    summed = [x.clone() for x in s]
    w = combine.mmpareto_combine_(a, summed, 1.5)
    torch.testing.assert_close(w, torch.tensor(list(want_w), dtype=torch.float64), rtol=1e-6,
                               atol=1e-7)
    for x, y, sm, got in zip(a, b, s, summed):
        new = 2 * float(want_w[0]) * x + 2 * float(want_w[1]) * y
        d = sm.norm() / new.norm()
        want = d * new * 1.5 if d > 1 else new * 1.5
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        if not conflict:  # equal weights: the summed gradient times gamma
            torch.testing.assert_close(got, 1.5 * sm, rtol=1e-6, atol=1e-7)


def test_min_norm_weights_cover_the_solvers_clamps():
    t = lambda *v: [torch.tensor(x, dtype=torch.float64) for x in v]  # noqa: E731
    # ab >= aa (e.g. g_mm = 0) -> 0.999; ab >= bb (g_m = 0) -> 0.001; else the closed form
    assert combine.min_norm_weights(*t(0.0, 1.0, 0.0)).tolist() == [0.999, 1 - 0.999]
    assert combine.min_norm_weights(*t(1.0, 0.0, 0.0)).tolist() == [0.001, 1 - 0.001]
    w = combine.min_norm_weights(*t(4.0, 1.0, -1.0)).tolist()
    assert w == pytest.approx([2 / 7, 5 / 7])
    for v in ((0.0, 1.0, 0.0), (1.0, 0.0, 0.0), (4.0, 1.0, -1.0)):
        c, _ = eager.min_norm_element_from2(v[0], v[2], v[1])  # (aa, ab, bb) there
        assert combine.min_norm_weights(*t(*v))[0].item() == pytest.approx(c)


def test_a_zero_combined_tensor_stays_zero_not_nan():
    """(mmmod) g_m = -2 g_mm: min-norm weights (2/3, 1/3) make the combined gradient 0 while the
    summed one is not; the code then divides by a zero norm (inf * 0 = NaN), mmmod gives 0."""
    a, b = torch.tensor([1.0, 0.5]), torch.tensor([-2.0, -1.0])
    summed = [a + b]
    w = combine.mmpareto_combine_([a], summed, 1.5)
    assert w.tolist() == pytest.approx([2 / 3, 1 / 3])
    assert torch.isfinite(summed[0]).all() and summed[0].abs().max() < 1e-6
    new = 2 * (2 / 3) * a + 2 * (1 / 3) * b
    assert not torch.isfinite((a + b).norm() / new.norm() * new).all()  # the code's NaN


# ---- whole runs against the authors' loop -----------------------------------------------------
@pytest.mark.parametrize("backend", LIVE_BACKENDS)
@pytest.mark.parametrize("names", [NAMES2, NAMES3], ids=["2mod", "3mod"])
def test_training_matches_the_authors_loop(seed, backend, names):
    torch.manual_seed(seed)
    theirs = AVNet(names)
    ours = copy.deepcopy(theirs)
    o_theirs = sgd(theirs)
    opt = make_opt(ours, names, backend=backend)
    branches = set()
    for epoch in range(EPOCHS):
        opt.set_epoch(epoch)
        for xs, y in data(names, STEPS, seed + epoch):
            w = eager.authors_step(theirs, o_theirs,
                                   lambda: list(losses_of(theirs, xs, y, names).values()), names)
            mmmod_step(ours, opt, xs, y, names)
            got = opt._method_state["weights"]
            torch.testing.assert_close(got, torch.tensor(w, dtype=torch.float64), rtol=1e-4,
                                       atol=1e-5)
            branches |= {x[0] == 0.5 for x in w}
    assert False in branches  # the min-norm branch ran
    assert max_diff(theirs, ours) < PARAM_ATOL
    # the heads took the summed loss's gradient, the encoders the combined one: a run that
    # trained on the summed loss alone ends elsewhere
    torch.manual_seed(seed)
    plain = AVNet(names)
    o_plain = sgd(plain)
    for epoch in range(EPOCHS):
        for xs, y in data(names, STEPS, seed + epoch):
            o_plain.zero_grad()
            sum(losses_of(plain, xs, y, names).values()).backward()
            o_plain.step()
    assert max_diff(plain, ours) > 100 * PARAM_ATOL


def test_outside_the_window_the_summed_gradient_is_kept(seed):
    torch.manual_seed(seed)
    a = AVNet()
    b = copy.deepcopy(a)
    opt = make_opt(a, NAMES2, modulation_starts=1)
    ob = sgd(b)
    opt.set_epoch(0)
    for xs, y in data(NAMES2, 3, seed):
        mmmod_step(a, opt, xs, y, NAMES2)
        ob.zero_grad()
        sum(losses_of(b, xs, y, NAMES2).values()).backward()
        ob.step()
    assert max_diff(a, b) < 1e-6


# ---- accumulation, GradScaler, fused=True, compile --------------------------------------------
def test_accumulation_equals_the_whole_batch(seed):
    torch.manual_seed(seed)
    a = AVNet()
    b = copy.deepcopy(a)
    oa, ob = make_opt(a, NAMES2), make_opt(b, NAMES2)
    for xs, y in data(NAMES2, 4, seed, b=8):
        mmmod_step(a, oa, xs, y, NAMES2)
        ob.zero_grad()
        for half in (slice(0, 4), slice(4, 8)):  # two micro-batches, mean losses halved
            ob.backward(losses_of(b, [x[half] for x in xs], y[half], NAMES2, scale=0.5))
        ob.step()
        torch.testing.assert_close(oa._method_state["weights"], ob._method_state["weights"],
                                   rtol=1e-5, atol=1e-6)
    assert max_diff(a, b) < 1e-5


def test_grad_scaler_gives_the_unscaled_run(seed):
    torch.manual_seed(seed)
    a = AVNet()
    b = copy.deepcopy(a)
    oa, ob = make_opt(a, NAMES2), make_opt(b, NAMES2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    for xs, y in data(NAMES2, 4, seed):
        mmmod_step(a, oa, xs, y, NAMES2)
        ob.zero_grad()
        ob.backward(losses_of(b, xs, y, NAMES2), scaler=scaler)
        scaler.step(ob)
        scaler.update()
        torch.testing.assert_close(oa._method_state["weights"], ob._method_state["weights"],
                                   rtol=1e-6, atol=1e-7)
    assert max_diff(a, b) < 1e-6


def test_grad_scaler_without_unscaling_is_refused(seed):
    a = AVNet()
    opt = make_opt(a, NAMES2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    xs, y = data(NAMES2, 1, seed)[0]
    opt.backward(losses_of(a, xs, y, NAMES2), scaler=scaler)
    before = [p.grad.clone() for p in a.parameters()]
    with pytest.raises(RuntimeError, match="scaler.step"):
        opt.step()
    assert all(torch.equal(p.grad, g) for p, g in zip(a.parameters(), before))


@pytest.mark.parametrize("inner", ["sgd", "adamw"])
def test_fused_update_equals_the_unfused_one(seed, inner):
    torch.manual_seed(seed)
    a = AVNet()
    b = copy.deepcopy(a)
    mk = (lambda m: sgd(m)) if inner == "sgd" else (lambda m: torch.optim.AdamW(m.parameters(),
                                                                                 lr=1e-2))
    oa = make_opt(a, NAMES2, backend="cpu" if "cpu" in LIVE_BACKENDS else "torch", inner=mk(a))
    ob = make_opt(b, NAMES2, backend=oa.backend, inner=mk(b), fused=True)
    for xs, y in data(NAMES2, 4, seed):
        mmmod_step(a, oa, xs, y, NAMES2)
        mmmod_step(b, ob, xs, y, NAMES2)
    assert max_diff(a, b) < 1e-6


def test_compiled_model(seed):
    """torch.compile of the model (AOTAutograd's compiled backward, retained once)."""
    torch.manual_seed(seed)
    a = AVNet()
    b = copy.deepcopy(a)
    oa, ob = make_opt(a, NAMES2), make_opt(b, NAMES2)
    cb = torch.compile(b, backend="aot_eager")
    for xs, y in data(NAMES2, 3, seed):
        mmmod_step(a, oa, xs, y, NAMES2)
        mmmod_step(cb, ob, xs, y, NAMES2)
    assert max_diff(a, b) < 1e-5


# ---- resume and logging -------------------------------------------------------------------------
def test_resume_is_bitwise(seed, tmp_path):
    torch.manual_seed(seed)
    a = AVNet()
    oa = make_opt(a, NAMES2, inner=torch.optim.Adam(a.parameters(), lr=1e-2), history=16)
    steps = data(NAMES2, 6, seed)
    for xs, y in steps[:3]:
        mmmod_step(a, oa, xs, y, NAMES2)
    torch.save({"model": a.state_dict(), "opt": oa.state_dict()}, tmp_path / "ck.pt")
    for xs, y in steps[3:]:
        mmmod_step(a, oa, xs, y, NAMES2)
    b = AVNet()
    ob = make_opt(b, NAMES2, inner=torch.optim.Adam(b.parameters(), lr=1e-2))
    ck = torch.load(tmp_path / "ck.pt")
    b.load_state_dict(ck["model"])
    ob.load_state_dict(ck["opt"])
    for xs, y in steps[3:]:
        mmmod_step(b, ob, xs, y, NAMES2)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    assert torch.equal(oa._method_state["weights"], ob._method_state["weights"])
    h = oa.history()
    assert h["w_mm"].shape == (6, 2) and (h["w_mm"] != 0.5).any()


def test_registered_with_its_defaults():
    m = mmmod.methods.get("mmpareto")
    assert "mmpareto" in mmmod.methods.names()
    assert m.combines_objectives and not m.scales and not m.needs_scores
    assert m.default_alpha == 1.5 and m.default_filter == "all"
    row = {r["name"]: r for r in mmmod.methods.table()}["mmpareto"]
    assert row["combines_objectives"]


def test_demo_runs_mmpareto(tmp_path):
    """``python -m mmmod demo --methods mmpareto``: the demo trains its unimodal heads jointly
    and backpropagates the three objectives through opt.backward."""
    import json

    from mmmod.demo import cli
    out = tmp_path / "out"
    rc = cli.main(["--epochs", "1", "--n-train", "64", "--n-test", "32", "--width", "4",
                   "--method", "mmpareto", "--out", str(out), "--quiet", "--no-plots",
                   "--backend", "torch", "--image-size", "16"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    run = res["runs"][0]
    assert run["method"] == "mmpareto"
    assert any(w != 0.5 for w in run["steps"]["w_mm/audio"] + run["steps"]["w_mm/visual"])
