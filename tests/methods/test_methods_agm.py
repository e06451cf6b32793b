"""AGM against a literal transcription of the authors' training loop (docs/semantics.md, AGM)."""
import math

import pytest
import torch

from mmmod import functional, methods
from mmmod.methods.agm import agm_batch_scores

from _backends import LIVE_BACKENDS, device_for


# ---- the authors' code, transcribed (per-sample loop, Python floats, .item()) ---------------
def authors_score(out, label):
    """AGM_main.py lines 86-99: mean over the batch of -log p, p < 1e-8 scored as -log(1e-8)."""
    softmax = torch.nn.Softmax(dim=1)
    score = 0.
    for k in range(out.size(0)):
        if torch.isinf(torch.log(softmax(out)[k][label[k]])) or softmax(out)[k][label[k]] < 1e-8:
            score += - torch.log(torch.tensor(1e-8, dtype=out.dtype, device=out.device))
        else:
            score += - torch.log(softmax(out)[k][label[k]])
    return score / out.size(0)


class AuthorsAGM2:
    """Two modalities, AGM_main.py lines 55 and 101-111 (running means carried across epochs)."""

    def __init__(self, alpha, cap=10):
        self.alpha, self.cap = alpha, cap
        self.train_score_a = self.train_score_v = 0.
        self.iteration = 0

    def step(self, out_a, out_v, label):
        self.iteration += 1
        iteration = self.iteration
        score_audio, score_visual = authors_score(out_a, label), authors_score(out_v, label)
        ratio_a = math.exp(score_visual.item() - score_audio.item())
        ratio_v = math.exp(score_audio.item() - score_visual.item())
        optimal_ratio_a = math.exp(self.train_score_v - self.train_score_a)
        optimal_ratio_v = math.exp(self.train_score_a - self.train_score_v)
        coeff_a = math.exp(self.alpha * (min(optimal_ratio_a - ratio_a, self.cap)))
        coeff_v = math.exp(self.alpha * (min(optimal_ratio_v - ratio_v, self.cap)))
        self.train_score_a = self.train_score_a * (iteration - 1) / iteration + score_audio.item() / iteration
        self.train_score_v = self.train_score_v * (iteration - 1) / iteration + score_visual.item() / iteration
        return [coeff_a, coeff_v]


class AuthorsAGMMany:
    """M modalities as the official three-modality loop writes the ratios (lihong2303/AGM
    run/URFunny_main.py: exp((mean - s_m) 3/2), cap 7; kkontras/MLB's Bias_Infusion_AGM_3mod
    the same), with coefficients from the running means before this step's update."""

    def __init__(self, m, alpha, cap=7):
        self.m, self.alpha, self.cap = m, alpha, cap
        self.train = [0.] * m
        self.iteration = 0

    def step(self, outs, label):
        self.iteration += 1
        it, m = self.iteration, self.m
        s = [authors_score(o, label).item() for o in outs]
        mean = sum(s) / m
        r = [math.exp((mean - x) * m / (m - 1)) for x in s]
        tmean = sum(self.train) / m
        eta = [math.exp((tmean - x) * m / (m - 1)) for x in self.train]
        k = [math.exp(self.alpha * min(e - x, self.cap)) for e, x in zip(eta, r)]
        self.train = [t * (it - 1) / it + x / it for t, x in zip(self.train, s)]
        return k


def balancebenchmark_coeffs(scores, train_scores, alpha, cap=7):
    """BalanceBenchmark AGM_trainer.py, AGMTrainer.training_step: note the sign of the ratios."""
    num = len(scores)
    scores_mean = sum(scores) / num
    train_score_mean = sum(train_scores) / num
    out = []
    for s, t in zip(scores, train_scores):
        ratio = math.exp(num / (num - 1) * (s - scores_mean))
        optimal_ratio = math.exp(num / (num - 1) * (t - train_score_mean))
        out.append(math.exp(alpha * min(optimal_ratio - ratio, cap)))
    return out


def mmmod_step(outs, label, state, alpha, name="agm_official"):
    """What the optimizer does per step for AGM: per-sample NLL sums / sample count."""
    m = methods.get(name)
    assert m.score == "nll" and m.score_reduction == "mean"
    mean_scores = m.batch_scores(outs, label) / label.numel()
    return functional.coefficients(mean_scores, name, alpha=alpha, state=state)


def _batch(g, m, b, c, spread):
    outs = [torch.randn(b, c, generator=g) * spread[i] for i in range(m)]
    return outs, torch.randint(0, c, (b,), generator=g)


# ---- tests -----------------------------------------------------------------------------------
def test_agm_scores_match_the_per_sample_loop(seed):
    g = torch.Generator().manual_seed(seed)
    b, c = 1 + seed % 13, 2 + seed % 7
    outs, y = _batch(g, 3, b, c, [1.0, 6.0, 40.0])  # 40: some p < 1e-8 hit the floor
    got = agm_batch_scores(outs, y) / b
    want = torch.tensor([authors_score(o, y).item() for o in outs])
    torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-6)


def test_agm_floor_and_bad_labels():
    z = torch.tensor([[0.0, 200.0], [0.0, 0.0]])
    s = agm_batch_scores([z], torch.tensor([0, 1]))
    assert math.isclose(float(s[0]), -math.log(float(torch.tensor(1e-8))) + math.log(2), rel_tol=1e-6)
    bad = agm_batch_scores([z, z], torch.tensor([0, 2]))
    assert torch.isnan(bad).all()


@pytest.mark.parametrize("alpha", [0.1, 1.5, 4.0])
def test_agm_matches_the_authors_two_modality_loop_over_steps(seed, alpha):
    g = torch.Generator().manual_seed(seed)
    ref, state = AuthorsAGM2(alpha), methods.get("agm_official").init_state(2)
    for t in range(12):
        # the leader changes over time, and some steps drive min(eta - r, 10) into the cap
        outs, y = _batch(g, 2, 5 + t % 4, 6, [1 + t % 3, 3.0 - t % 3] if t != 7 else [9, 0.01])
        want = ref.step(outs[0], outs[1], y)
        got = mmmod_step(outs, y, state, alpha)
        torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64),
                                   rtol=2e-5, atol=1e-6)
        torch.testing.assert_close(state["score_mean"],
                                   torch.tensor([ref.train_score_a, ref.train_score_v],
                                                dtype=torch.float64), rtol=2e-6, atol=1e-7)
    assert float(state["steps"]) == 12


@pytest.mark.parametrize("m", [3, 4])
def test_agm_many_modalities_match_the_mean_form(seed, m):
    g = torch.Generator().manual_seed(seed)
    ref, state = AuthorsAGMMany(m, 1.0), methods.get("agm_official").init_state(m)
    for t in range(8):
        outs, y = _batch(g, m, 7, 5, [1.0 + ((t + i) % m) for i in range(m)])
        want = ref.step(outs, y)
        got = mmmod_step(outs, y, state, 1.0)
        torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64),
                                   rtol=2e-5, atol=1e-6)


def test_balancebenchmark_generic_rule_swaps_the_two_coefficients(seed):
    """BalanceBenchmark's M-modality rule has the opposite sign: for M = 2 its k_audio is the
    authors' (and mmmod's) k_visual. Documented; not the default."""
    g = torch.Generator().manual_seed(seed)
    ref, state = AuthorsAGM2(0.7, cap=7), methods.get("agm").init_state(2)
    train = [0.0, 0.0]
    agm7 = methods.register(type(methods.get("agm_official"))(cap=7.0, name="agm_cap7_test"))
    try:
        for t in range(6):
            outs, y = _batch(g, 2, 8, 4, [1.0 + t, 2.0])
            s = [authors_score(o, y).item() for o in outs]
            bb = balancebenchmark_coeffs(s, train, 0.7)
            want = ref.step(outs[0], outs[1], y)
            train = [ref.train_score_a, ref.train_score_v]
            got = mmmod_step(outs, y, state, 0.7, name=agm7.name)
            assert bb[0] == pytest.approx(want[1], rel=1e-12) and bb[1] == pytest.approx(want[0], rel=1e-12)
            torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64),
                                       rtol=2e-5, atol=1e-6)
    finally:
        methods.unregister(agm7.name)


def test_agm_nan_scores_skip_the_step_and_keep_the_running_mean():
    state = methods.get("agm").init_state(2)
    functional.coefficients(torch.tensor([0.5, 1.5]), "agm", state=state)
    before = {k: v.clone() for k, v in state.items()}
    k = functional.coefficients(torch.tensor([float("nan"), 1.0]), "agm", state=state)
    assert torch.isnan(k).all()
    assert all(torch.equal(before[n], state[n]) for n in state)


def test_agm_state_resumes_bitwise(seed):
    g = torch.Generator().manual_seed(seed)
    seq = [torch.rand(3, generator=g) * 3 for _ in range(10)]
    a = methods.get("agm").init_state(3)
    for s in seq[:4]:
        functional.coefficients(s, "agm", state=a)
    b = {k: v.clone() for k, v in a.items()}  # a checkpoint of the method state
    ka = [functional.coefficients(s, "agm", state=a) for s in seq[4:]]
    kb = [functional.coefficients(s, "agm", state=b) for s in seq[4:]]
    assert all(torch.equal(x, y) for x, y in zip(ka, kb))
    assert all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.parametrize("backend", LIVE_BACKENDS)
def test_agm_by_name_on_every_backend(backend):
    dev = device_for(backend)
    s = torch.tensor([0.4, 1.1, 0.9], device=dev)
    st_ref, st = methods.get("agm").init_state(3, dev), methods.get("agm").init_state(3, dev)
    for _ in range(3):
        ref = methods.get("agm").coefficients(s, alpha=1.5, beta_max=2.0, state=st_ref)
        got = functional.coefficients(s, "agm", backend=backend, state=st)
        assert torch.equal(got, ref) and got.device.type == dev.type


def test_agm_registry_entry():
    m = methods.get("agm")
    assert m.default_alpha == 1.5 and m.default_filter == "matrix" and m.cap is None
    # the official loops: min(., 10) with two modalities (CREMAD_main.py), 7 with three
    assert m.cap_for(2) == 10.0 and m.cap_for(3) == 7.0 and m.cap_for(4) == 7.0
    assert type(m)(cap=5.0).cap_for(3) == 5.0
    assert not m.noise and m.shard_safe and m.native is None
    with pytest.raises(ValueError, match="cap must be finite"):
        type(m)(cap=float("inf"))
    # the safe default bounds k above by 2; the authors' rule by name, unbounded, alpha 1.0
    assert m.k_max == 2.0
    off = methods.get("agm_official")
    assert off.k_max is None and off.default_alpha == 1.0 and off.cap_for(2) == 10.0
    with pytest.raises(ValueError, match="k_max must be >= 1"):
        type(m)(k_max=0.5)


@pytest.mark.parametrize("m", [2, 3])
def test_agm_default_is_the_official_rule_bounded_above(seed, m):
    """k of the default ``agm`` is min(k_official, 2) at every step, the running means equal,
    on steps where the official k exceeds 2 (a leader's ratio falling below its running mean)
    and where it does not."""
    g = torch.Generator().manual_seed(seed)
    st, st_off = methods.get("agm").init_state(m), methods.get("agm_official").init_state(m)
    above = below = 0
    for t in range(16):
        spread = [1.0 + ((t + i) % 3) * 3 for i in range(m)] if t % 5 else [0.3] * m
        outs, y = _batch(g, m, 9, 5, spread)
        k = mmmod_step(outs, y, st, 1.5, name="agm")
        k_off = mmmod_step(outs, y, st_off, 1.5, name="agm_official")
        assert torch.equal(k, torch.clamp_max(k_off, 2.0))
        assert torch.equal(st["score_mean"], st_off["score_mean"])
        above += int((k_off > 2).sum())
        below += int((k_off < 2).sum())
    assert above > 0 and below > 0
