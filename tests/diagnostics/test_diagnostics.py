"""mmmod.diagnostics: exact Shapley contributions (values by hand, efficiency, symmetry, per
sample, mean masking, data parallel), linear probes, the report, and bad input."""
import math
import os

import pytest
import torch

from mmmod import diagnostics as dg



def _true_logit_loss(z, y):
    """A loss linear in the logits: the game is additive, so Shapley = own contribution."""
    return -z.gather(1, y[:, None]).squeeze(1)


class Additive:
    """Fused logits = bias + sum over modalities of mask(name, z_m): each modality's 'features'
    are its own logit vector."""

    def __init__(self, names, bias):
        self.names, self.bias = names, bias

    def __call__(self, inputs, mask):
        return self.bias + sum(mask(n, z) for n, z in zip(self.names, inputs))


def _loader(zs, y, bs):
    return [(tuple(z[i:i + bs] for z in zs), y[i:i + bs]) for i in range(0, len(y), bs)]


def test_accuracy_values_by_hand_two_modalities():
    # labels 0,0,1,1; all masked: the bias predicts class 0 (accuracy 1/2); audio alone is
    # right everywhere; visual alone right on samples 0 and 2 (1/2); both: audio wins (1)
    y = torch.tensor([0, 0, 1, 1])
    za = torch.tensor([[2., -2.], [2., -2.], [-2., 2.], [-2., 2.]])
    zv = torch.tensor([[1., -1.], [-1., 1.], [-1., 1.], [1., -1.]])
    f = Additive(["audio", "visual"], torch.tensor([0.1, 0.0]))
    r = dg.shapley(f, _loader([za, zv], y, 3), ["audio", "visual"])
    assert r.coalitions[()]["accuracy"] == 0.5
    assert r.coalitions[("audio",)]["accuracy"] == 1.0
    assert r.coalitions[("visual",)]["accuracy"] == 0.5
    assert r.coalitions[("audio", "visual")]["accuracy"] == 1.0
    # phi_a = ((1 - .5) + (1 - .5)) / 2, phi_v = ((.5 - .5) + (1 - 1)) / 2
    assert r.accuracy == pytest.approx({"audio": 0.5, "visual": 0.0})
    assert r.shares() == pytest.approx({"audio": 1.0, "visual": 0.0})
    assert r.samples == 4 and r.full_accuracy == 1.0 and r.empty_accuracy == 0.5
    # a model no better with every modality than with none has nothing to share
    worse = dg.shapley(f, _loader([-za, zv], y, 3), ["audio", "visual"])
    assert worse.full_accuracy < worse.empty_accuracy
    assert all(math.isnan(v) for v in worse.shares().values())
    assert "-" in dg.report(shapley=worse).table().splitlines()[2].split()[2]


@pytest.mark.parametrize("m", [2, 3, 5])
def test_additive_game_gives_each_modality_its_own_term(m):
    g = torch.Generator().manual_seed(m)
    names = [f"m{i}" for i in range(m)]
    y = torch.randint(0, 4, (23,), generator=g)
    zs = [torch.randn(23, 4, generator=g) * (i + 1) for i in range(m)]
    f = Additive(names, torch.zeros(4))
    r = dg.shapley(f, _loader(zs, y, 5), names, loss_fn=_true_logit_loss)
    for n, z in zip(names, zs):  # v(S) = mean_i sum_{m in S} z_m[i, y_i]
        assert r.loss[n] == pytest.approx(z.double().gather(1, y[:, None]).mean().item(), abs=1e-6)
    # efficiency for both games
    assert sum(r.loss.values()) == pytest.approx(r.empty_loss - r.full_loss, abs=1e-9)
    assert sum(r.accuracy.values()) == pytest.approx(r.full_accuracy - r.empty_accuracy,
                                                     abs=1e-12)


def test_symmetry_and_dummy():
    """Two modalities with identical features get identical values; one whose features are
    always zero (masking it changes nothing) gets 0; values add up (efficiency)."""
    g = torch.Generator().manual_seed(7)
    y = torch.randint(0, 3, (40,), generator=g)
    a = torch.randn(40, 3, generator=g)
    c = torch.randn(40, 3, generator=g)
    names = ["a", "b", "c", "dummy"]
    f = Additive(names, torch.tensor([0.3, 0.0, -0.2]))
    r = dg.shapley(f, _loader([a, a.clone(), c, torch.zeros(40, 3)], y, 16), names)
    assert r.accuracy["a"] == pytest.approx(r.accuracy["b"], abs=1e-12)
    assert r.loss["a"] == pytest.approx(r.loss["b"], abs=1e-12)
    assert r.accuracy["dummy"] == pytest.approx(0.0, abs=1e-12)
    assert r.loss["dummy"] == pytest.approx(0.0, abs=1e-12)
    assert sum(r.accuracy.values()) == pytest.approx(r.full_accuracy - r.empty_accuracy)
    assert sum(r.loss.values()) == pytest.approx(r.empty_loss - r.full_loss)
    assert abs(r.accuracy["c"]) > 0  # not everything is zero


def test_shapley_matrix_against_the_permutation_definition():
    """phi_i = mean over all orderings of i's marginal value, on a random game."""
    import itertools
    m = 4
    v = torch.randn(1 << m, dtype=torch.float64)
    phi = v @ dg.shapley_matrix(m)
    want = torch.zeros(m, dtype=torch.float64)
    perms = list(itertools.permutations(range(m)))
    for p in perms:
        s = 0
        for i in p:
            want[i] += v[s | 1 << i] - v[s]
            s |= 1 << i
    torch.testing.assert_close(phi, want / len(perms))
    assert dg.coalitions(2) == [(False, False), (True, False), (False, True), (True, True)]


def test_per_sample_values():
    g = torch.Generator().manual_seed(3)
    y = torch.randint(0, 3, (30,), generator=g)
    za, zv = torch.randn(30, 3, generator=g), torch.randn(30, 3, generator=g) * 2
    f = Additive(["audio", "visual"], torch.tensor([0.5, 0.0, 0.0]))
    r = dg.shapley(f, _loader([za, zv], y, 8), ["audio", "visual"], per_sample=True)
    acc = r.per_sample["accuracy"]
    assert acc.shape == (30, 2) and r.per_sample["loss"].shape == (30, 2)
    # the data set's values are the per-sample values' means
    torch.testing.assert_close(acc.mean(0), torch.tensor([r.accuracy["audio"],
                                                          r.accuracy["visual"]],
                                                         dtype=torch.float64))
    # each sample's two-player formula: phi_a = (v(a) - v(0) + v(av) - v(v)) / 2
    pred = {k: (f((za, zv), dg.ModalityMask(["audio", "visual"], k)).argmax(1) == y).double()
            for k in dg.coalitions(2)}
    want_a = (pred[(True, False)] - pred[(False, False)] + pred[(True, True)]
              - pred[(False, True)]) / 2
    torch.testing.assert_close(acc[:, 0], want_a)


def test_mean_masking_replaces_with_the_mean_feature():
    g = torch.Generator().manual_seed(4)
    y = torch.randint(0, 3, (21,), generator=g)
    za, zv = torch.randn(21, 3, generator=g) + 1, torch.randn(21, 3, generator=g)
    f = Additive(["audio", "visual"], torch.zeros(3))
    r = dg.shapley(f, _loader([za, zv], y, 4), ["audio", "visual"], masking="mean",
                   loss_fn=_true_logit_loss)
    for n, z in (("audio", za), ("visual", zv)):
        own = z.gather(1, y[:, None]).mean()
        mean = z.double().mean(0)[y].mean()
        assert r.loss[n] == pytest.approx((own - mean).item(), abs=1e-6)
    zero = dg.shapley(f, _loader([za, zv], y, 4), ["audio", "visual"], loss_fn=_true_logit_loss)
    assert zero.loss["audio"] != pytest.approx(r.loss["audio"], abs=1e-3)
    assert r.masking == "mean" and zero.masking == "zero"


def test_dict_batches_and_split():
    y = torch.tensor([0, 1, 1])
    za, zv = torch.eye(2)[y] * 3, torch.zeros(3, 2)
    f = Additive(["a", "v"], torch.zeros(2))
    loader = [{"x": (za, zv), "label": y}]
    r = dg.shapley(lambda inputs, mask: f(inputs["x"], mask), loader, ["a", "v"])
    assert r.accuracy["a"] > 0
    r2 = dg.shapley(f, [(y, (za, zv))], ["a", "v"], split=lambda b: (b[1], b[0]))
    assert r2.accuracy == r.accuracy


# ---- bad input --------------------------------------------------------------------------
def test_forward_that_ignores_the_mask_warns():
    y = torch.tensor([0, 1, 1, 0])
    z = torch.randn(4, 2)
    with pytest.warns(RuntimeWarning, match="same accuracy and loss.*mask\\(name, features\\)"):
        r = dg.shapley(lambda inputs, mask: inputs[0] + inputs[1], _loader([z, z], y, 2),
                       ["a", "b"])
    assert r.accuracy == {"a": 0.0, "b": 0.0}


def test_too_many_modalities_is_refused():
    names = [f"m{i}" for i in range(dg.MAX_MODALITIES + 1)]
    with pytest.raises(ValueError, match=f"{len(names)} modalities.*up to {dg.MAX_MODALITIES}"):
        dg.shapley(lambda i, m: i, [], names)


def test_loader_without_labels_is_refused():
    f = Additive(["a", "b"], torch.zeros(2))
    with pytest.raises(ValueError, match="without labels.*Tensor of shape \\(4, 2\\)"):
        dg.shapley(f, [torch.randn(4, 2)], ["a", "b"])
    with pytest.raises(ValueError, match="without labels.*'label'"):
        dg.shapley(f, [{"audio": torch.randn(4, 2)}], ["a", "b"])
    with pytest.raises(TypeError, match="integer tensor of class indices.*float32"):
        dg.shapley(f, [((torch.randn(4, 2), torch.randn(4, 2)), torch.rand(4))], ["a", "b"])
    with pytest.raises(ValueError, match="no batches"):
        dg.shapley(f, [], ["a", "b"])


def test_other_bad_arguments():
    f = Additive(["a", "b"], torch.zeros(2))
    data = _loader([torch.randn(4, 2), torch.randn(4, 2)], torch.tensor([0, 1, 0, 1]), 2)
    with pytest.raises(ValueError, match="masking must be one of"):
        dg.shapley(f, data, ["a", "b"], masking="noise")
    with pytest.raises(ValueError, match="distinct"):
        dg.shapley(f, data, ["a", "a"])
    with pytest.raises(KeyError, match="unknown modality 'a'"):
        dg.shapley(f, data, ["x", "y"])
    with pytest.raises(ValueError, match="modality 'b' never was"):
        dg.shapley(lambda i, mask: mask("a", i[0]) + i[1], data, ["a", "b"], masking="mean")
    with pytest.raises(TypeError, match=r"fused logits \[B, C\]"):
        dg.shapley(lambda i, mask: mask("a", i[0]).sum(1), data, ["a", "b"])


# ---- probes ------------------------------------------------------------------------------
def test_linear_probe_separable_random_and_reproducible():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (200,), generator=g)
    centers = torch.randn(4, 8, generator=g) * 4
    x = centers[y] + torch.randn(200, 8, generator=g)
    assert dg.linear_probe(x[:150], y[:150], x[150:], y[150:], 4, seed=1) == 1.0
    noise = torch.randn(200, 8, generator=g)
    chance = dg.linear_probe(noise[:150], y[:150], noise[150:], y[150:], 4, seed=1)
    assert chance < 0.6
    a = dg.linear_probe(noise[:150], y[:150], noise[150:], y[150:], 4, steps=3, seed=5)
    b = dg.linear_probe(noise[:150], y[:150], noise[150:], y[150:], 4, steps=3, seed=5)
    assert a == b


def test_probe_accuracy_per_encoder():
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, 3, (120,), generator=g)
    good = torch.eye(3)[y] * 5 + torch.randn(120, 3, generator=g) * 0.1
    bad = torch.randn(120, 3, generator=g)
    enc = torch.nn.Identity()
    loader = _loader([good, bad], y, 32)
    acc = dg.probe_accuracy({"good": lambda x: enc(x[0]), "bad": lambda x: x[1]}, loader[:2],
                            loader[2:], n_classes=3)
    assert acc["good"] == 1.0 and acc["bad"] < 0.7


# ---- report ------------------------------------------------------------------------------
def _result():
    y = torch.tensor([0, 0, 1, 1])
    za = torch.tensor([[2., -2.], [2., -2.], [-2., 2.], [-2., 2.]])
    zv = torch.tensor([[1., -1.], [-1., 1.], [-1., 1.], [1., -1.]])
    return dg.shapley(Additive(["audio", "visual"], torch.tensor([0.1, 0.0])),
                      _loader([za, zv], y, 4), ["audio", "visual"])


def test_report_tables_and_figure(tmp_path):
    r = _result()
    rep = dg.report({"before": {"shapley": r, "probe": {"audio": 0.5, "visual": 0.25}},
                     "after": {"shapley": r.to_dict(), "probe": {"audio": 0.75, "visual": 0.6}}})
    text = str(rep)
    assert "Shapley share %" in text and "100.0" in text and "+50.0" in text and "60.0" in text
    md = rep.markdown()
    assert md.splitlines()[0].startswith("| run") and "| after" in md
    assert "accuracy 100.0% with every modality, 50.0% with none" in md
    path = os.path.join(tmp_path, "imbalance.png")
    fig = rep.figure(path)
    assert os.path.getsize(path) > 1000 and len(fig.axes) == 2
    single = dg.report(probe={"audio": 0.7, "visual": 0.4})
    assert "70.0" in single.table() and math.isnan(float("nan"))
    with pytest.raises(ValueError, match="neither"):
        dg.report({"x": {}})
    with pytest.raises(ValueError, match="format"):
        rep.table("html")


# ---- data parallel -----------------------------------------------------------------------
WORLD = 2


def _dist_data(n=26):
    g = torch.Generator().manual_seed(11)
    y = torch.randint(0, 3, (n,), generator=g)
    return [torch.randn(n, 3, generator=g), torch.randn(n, 3, generator=g) + 0.5], y


def shapley_worker(rank, world, port, out_dir):
    import torch.distributed as dist
    from _dist_utils import init
    init(rank, world, port)
    zs, y = _dist_data()
    part = slice(rank * 13, (rank + 1) * 13)  # each rank its half
    f = Additive(["a", "v"], torch.zeros(3))
    out = {masking: dg.shapley(f, _loader([z[part] for z in zs], y[part], 5), ["a", "v"],
                               masking=masking).to_dict() for masking in ("zero", "mean")}
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def test_shapley_under_data_parallel_reduces_over_ranks(tmp_path):
    from _dist_utils import spawn
    spawn(shapley_worker, WORLD, str(tmp_path))
    zs, y = _dist_data()
    f = Additive(["a", "v"], torch.zeros(3))
    for masking in ("zero", "mean"):
        want = dg.shapley(f, _loader(zs, y, 7), ["a", "v"], masking=masking).to_dict()
        for rank in range(WORLD):
            got = torch.load(os.path.join(tmp_path, f"rank{rank}.pt"))[masking]
            assert got["samples"] == 26
            for key in ("accuracy", "loss"):
                assert got[key] == pytest.approx(want[key], abs=1e-9), (masking, key)
