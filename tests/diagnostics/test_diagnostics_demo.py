"""The demo's imbalance report: measured before and after training, without changing the
training itself; the CLI prints it and draws imbalance.png, or skips it with --no-report."""
import json

import pytest
import torch

from mmmod.demo import cli, data, imbalance, train

TINY = dict(n_train=96, n_test=48, duration=0.25, n_mels=16, image_size=16)


@pytest.fixture(scope="module")
def tiny_data():
    return data.make_dataset(data.SyntheticConfig(**TINY))


@pytest.mark.parametrize("fusion", ["concat", "film"])
def test_train_one_measures_before_and_after(tiny_data, fusion):
    tr, te = tiny_data
    cfg = train.TrainConfig(epochs=1, batch_size=32, width=4, fusion=fusion, progress=False,
                            probe_steps=10, backend="torch")
    r = train.train_one("ogm_ge", tr, te, cfg, seed=0)
    for when in ("before", "after"):
        sh = r.imbalance[when]["shapley"]
        assert sh["samples"] == len(te) and sh["names"] == ["audio", "visual"]
        full, none = sh["coalitions"]["audio+visual"], sh["coalitions"]["none"]
        assert sum(sh["accuracy"].values()) == pytest.approx(full["accuracy"] - none["accuracy"])
        assert sum(sh["loss"].values()) == pytest.approx(none["loss"] - full["loss"])
    assert r.imbalance["after"]["probe"] == r.probe_acc  # the final probes, not measured twice
    assert r.imbalance["after"]["shapley"]["coalitions"]["audio+visual"]["accuracy"] == \
        pytest.approx(r.fused_acc)  # the full coalition is the model itself
    # measuring changes nothing of the training
    off = train.train_one("ogm_ge", tr, te, train.TrainConfig(**{**cfg.to_dict(),
                                                               "imbalance": False}), seed=0)
    assert off.imbalance == {} and off.fused_acc == r.fused_acc
    assert off.steps["coeff/audio"] == r.steps["coeff/audio"]


def test_masked_forward_zeroes_the_masked_features():
    from mmmod.diagnostics import ModalityMask
    from mmmod.demo.models import AVClassifier
    torch.manual_seed(0)
    m = AVClassifier(8, "concat", width=4).eval()
    a, v = torch.randn(3, 1, 16, 20), torch.randn(3, 2, 3, 16, 16)
    f = imbalance.masked_forward(m)
    with torch.no_grad():
        out, (fa, fv) = m(a, v)
        torch.testing.assert_close(f((a, v), ModalityMask(m.names, (True, True))), out)
        want = m.fusion(fa, torch.zeros_like(fv))
        torch.testing.assert_close(f((a, v), ModalityMask(m.names, (True, False))), want)


def test_cli_prints_the_report_and_draws_it(tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--epochs", "1", "--n-train", "64", "--n-test", "32", "--width", "4",
            "--method", "mlb", "--quiet", "--backend", "torch", "--image-size", "16"]
    assert cli.main(args + ["--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "Shapley share %" in text and "mlb before" in text and "mlb after" in text
    assert (out / "imbalance.png").stat().st_size > 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["runs"][0]["imbalance"]) == {"before", "after"}
    assert cli.main(args + ["--out", str(tmp_path / "off"), "--no-report", "--no-plots"]) == 0
    assert "Shapley" not in capsys.readouterr().out
    assert not (tmp_path / "off" / "imbalance.png").exists()


def test_demo_records_the_signals_when_asked(tiny_data):
    tr, te = tiny_data
    cfg = train.TrainConfig(epochs=1, batch_size=32, width=4, progress=False, probe_steps=5,
                            backend="torch", imbalance=False, signals=("accuracy", "speed"))
    r = train.train_one("baseline", tr, te, cfg, seed=0)
    assert {"acc/audio", "acc/visual", "speed/audio", "speed/visual"} <= set(r.steps)
    assert all(0.0 <= a <= 1.0 for a in r.steps["acc/visual"])
    with pytest.raises(SystemExit, match="unknown signal 'bogus'"):
        cli.main(["--signals", "accuracy,bogus"])
