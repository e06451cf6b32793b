"""The built-in demo: data, models, fusion heads' per-modality logits, training, CLI."""
import json
import subprocess
import sys

import pytest
import torch

from mmmod import fusion as mfusion
from mmmod.demo import cli, data, models, train

TINY = dict(n_train=96, n_test=48, duration=0.25, n_mels=16, image_size=16)


def test_dataset_deterministic_and_shaped():
    cfg = data.SyntheticConfig(**TINY)
    tr1, te1 = data.make_dataset(cfg)
    tr2, _ = data.make_dataset(cfg)
    assert torch.equal(tr1.audio, tr2.audio) and torch.equal(tr1.visual, tr2.visual)
    assert tr1.audio.shape[:3] == (96, 1, 16) and tr1.visual.shape == (96, 1, 3, 16, 16)
    assert te1.labels.bincount().tolist() == [6] * 8  # balanced
    assert torch.isfinite(tr1.audio).all() and torch.isfinite(tr1.visual).all()
    tr3, _ = data.make_dataset(data.SyntheticConfig(seed=1, **TINY))
    assert not torch.equal(tr1.visual, tr3.visual)


def test_dataset_knobs():
    with pytest.raises(ValueError):
        data.SyntheticConfig(n_classes=7)
    with pytest.raises(ValueError):
        data.SyntheticConfig(audio_shared_pairs=3, visual_shared_pairs=2)
    sig = data.class_signatures(data.SyntheticConfig(audio_shared_pairs=1, visual_shared_pairs=1))
    assert "sounds like class 1" in sig[0]["audio"] and "looks like class 6" in sig[7]["visual"]
    cfg = data.SyntheticConfig(n_frames=3, **TINY)
    tr, _ = data.make_split(cfg, 8, 0), None
    assert tr.visual.shape == (8, 3, 3, 16, 16)


def test_audio_pair_sharing_removes_the_audio_cue():
    """With every pair shared, the two members of a pair have the same audio distribution."""
    cfg = data.SyntheticConfig(audio_shared_pairs=4, visual_shared_pairs=0, audio_dropout=0.0,
                               **TINY)
    g = torch.Generator().manual_seed(0)
    lab = torch.tensor([0] * 200 + [1] * 200)
    w = data.render_audio(lab, cfg, g)
    env = w.abs().unfold(1, 100, 100).mean(-1)  # coarse envelope
    # the 8 Hz pulse shows up as envelope variance; both classes carry it half the time
    v0, v1 = env[:200].std(1).mean(), env[200:].std(1).mean()
    assert abs(v0 - v1) / (v0 + v1) < 0.15


@pytest.mark.parametrize("fusion", models.FUSIONS)
def test_fusion_heads_give_per_modality_logits(fusion):
    torch.manual_seed(0)
    m = models.AVClassifier(8, fusion, width=4)
    out, feats = m(torch.randn(3, 1, 16, 20), torch.randn(3, 2, 3, 16, 16))
    assert out.shape == (3, 8) and feats[0].shape == (3, 16)
    if fusion in ("concat", "sum"):
        za, zv = m.split_logits(feats)
        # concat: the split adds back up to the fused logits (b/M each); sum: each branch keeps
        # half of its own bias, as the official OGM-GE code (docs/semantics.md section 1)
        missing = 0 if fusion == "concat" else (m.fusion.fc_a.bias + m.fusion.fc_v.bias).detach() / 2
        torch.testing.assert_close(za + zv, out.detach() - missing)
        assert not za.requires_grad
    else:
        assert not m.has_split
        with pytest.raises(ValueError, match="unimodal heads"):
            m.split_logits(feats)
    za, zv = m.head_logits(feats)
    assert za.shape == zv.shape == (3, 8)


def test_concat_split_matches_library():
    m = models.AVClassifier(5, "concat", width=4)
    fa, fv = torch.randn(2, 16), torch.randn(2, 16)
    ref = mfusion.concat_logits(m.fusion.fc_out, [fa, fv])
    got = m.split_logits([fa, fv])
    for r, g in zip(ref, got):
        torch.testing.assert_close(r, g)


def test_resnet18_flag_sizes():
    enc = models.make_encoder(3, resnet18=True)
    assert enc.out_dim == 512
    n = sum(p.numel() for p in enc.parameters())
    assert 11_000_000 < n < 11_300_000  # torchvision resnet18 trunk without fc: 11.18 M


@pytest.fixture(scope="module")
def tiny_data():
    return data.make_dataset(data.SyntheticConfig(**TINY))


@pytest.mark.parametrize("method,fusion", [("baseline", "concat"), ("ogm_ge", "concat"),
                                           ("ogm", "sum"), ("mlb", "concat"), ("mlb", "sum"),
                                           ("ogm_ge", "film"), ("mlb", "gated"),
                                           ("multiloss", "concat")])
def test_train_one_runs_every_method_and_fusion(tiny_data, method, fusion):
    tr, te = tiny_data
    cfg = train.TrainConfig(epochs=2, batch_size=32, width=4, fusion=fusion, progress=False,
                            probe_steps=10, backend="torch")
    r = train.train_one(method, tr, te, cfg, seed=0)
    assert 0.0 <= r.fused_acc <= 1.0
    assert set(r.probe_acc) == {"audio", "visual"}
    n_steps = 2 * 3
    # the optimizer's recorded history: one row per step, every column as long
    st = r.steps
    assert set(st) == {"step", "epoch", "samples", "modulated", "skipped", "score/audio",
                       "score/visual", "coeff/audio", "coeff/visual"}
    assert all(len(v) == n_steps for v in st.values())
    assert st["step"] == list(range(n_steps)) and st["epoch"] == [0, 0, 0, 1, 1, 1]
    assert st["samples"] == [32] * n_steps and not any(st["skipped"])
    for n in ("audio", "visual"):  # summed p(true class): between 0 and the batch size
        assert all(0.0 < s < b for s, b in zip(st[f"score/{n}"], st["samples"]))
    ks = st["coeff/audio"] + st["coeff/visual"]
    if method in ("baseline", "multiloss"):
        assert all(k == 1.0 for k in ks) and not any(st["modulated"])
    elif method in ("ogm", "ogm_ge"):
        # OGM damps exactly one modality per step
        for ka, kv in zip(st["coeff/audio"], st["coeff/visual"]):
            assert min(ka, kv) <= 1.0 and max(ka, kv) == 1.0
        assert st["modulated"] == [True] * 3 + [False] * 3  # default window: first half
    else:
        assert all(0.0 < k < 2.0 for k in ks) and all(st["modulated"])
    json.dumps(r.to_dict())


def test_ogm_window_defaults_to_first_half(tiny_data):
    tr, te = tiny_data
    cfg = train.TrainConfig(epochs=2, batch_size=48, width=4, progress=False, probe_steps=5,
                            backend="torch")
    r = train.train_one("ogm_ge", tr, te, cfg, seed=0)
    # epoch 0 modulated, epoch 1 not: k is still computed and recorded, flagged not applied
    assert r.steps["modulated"] == [True, True, False, False]
    assert all(min(ka, kv) < 1.0 for ka, kv in zip(r.steps["coeff/audio"], r.steps["coeff/visual"]))


def test_same_seed_same_initialisation(tiny_data):
    tr, te = tiny_data
    cfg = train.TrainConfig(epochs=1, batch_size=48, width=4, progress=False, probe_steps=5,
                            backend="torch")
    a = train.train_one("baseline", tr, te, cfg, seed=3)
    b = train.train_one("baseline", tr, te, cfg, seed=3)
    assert a.fused_acc == b.fused_acc and a.steps["score/audio"] == b.steps["score/audio"]


def test_cli_end_to_end(tmp_path, capsys):
    out = tmp_path / "out"
    rc = cli.main(["--epochs", "1", "--n-train", "64", "--n-test", "32", "--width", "4",
                   "--seeds", "2", "--method", "baseline,ogm_ge", "--out", str(out), "--quiet",
                   "--backend", "torch", "--image-size", "16"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "| method" in text and "ogm_ge" in text and "baseline" in text
    res = json.loads((out / "results.json").read_text())
    assert res["seeds"] == [0, 1] and len(res["runs"]) == 4
    assert set(res["summary"]) == {"baseline", "ogm_ge"}
    assert (out / "scores_coefficients.png").stat().st_size > 0
    assert (out / "accuracy.png").stat().st_size > 0
    # every run logged through mmmod.monitor: its CSV equals the history in results.json
    import csv
    run = next(r for r in res["runs"] if r["method"] == "ogm_ge" and r["seed"] == 1)
    with open(out / "logs" / "ogm_ge_seed1.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == run["steps"]["step"]
    assert [float(r["coeff/visual"]) for r in rows] == run["steps"]["coeff/visual"]
    assert (out / "logs" / "baseline_seed0.csv").exists()
    # and `mmmod plot` redraws the demo's curves from results.json
    from mmmod.monitor import plot as mplot
    assert mplot.main([str(out / "results.json"), "-o", str(tmp_path / "again.png")]) == 0
    assert (tmp_path / "again.png").stat().st_size > 0
    assert (tmp_path / "again_accuracy.png").stat().st_size > 0


def test_cli_errors():
    with pytest.raises(SystemExit):
        cli.main(["--method", "nope"])
    with pytest.raises(SystemExit):
        cli.main(["--dataset", "cremad"])  # needs --data


def test_python_m_mmmod_dispatch():
    r = subprocess.run([sys.executable, "-m", "mmmod"], capture_output=True, text=True)
    assert r.returncode == 0 and "demo" in r.stdout and "plot" in r.stdout
    r = subprocess.run([sys.executable, "-m", "mmmod", "bogus"], capture_output=True, text=True)
    assert r.returncode == 2
    r = subprocess.run([sys.executable, "-m", "mmmod", "demo", "--help"], capture_output=True,
                       text=True)
    assert r.returncode == 0 and "--epochs" in r.stdout and "--fusion" in r.stdout
    r = subprocess.run([sys.executable, "-m", "mmmod", "plot", "--help"], capture_output=True,
                       text=True)
    assert r.returncode == 0 and "RUN" in r.stdout and "--smooth" in r.stdout


def test_cli_on_real_layout(tmp_path):
    """--data trains on a data set in the official CREMA-D layout."""
    sf = pytest.importorskip("soundfile")
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    emos = ["NEU", "HAP", "SAD", "FEA", "DIS", "ANG"]
    for split, n in (("train", 12), ("test", 6)):
        lines = []
        for i in range(n):
            clip, emo = f"{split}{i}", emos[i % 6]
            lines.append(f"{clip},{emo}\n")
            (tmp_path / "AudioWAV").mkdir(exist_ok=True)
            sf.write(str(tmp_path / "AudioWAV" / f"{clip}.wav"),
                     rng.standard_normal(4000).astype(np.float32) * 0.1, 16000)
            d = tmp_path / "Image-01-FPS" / clip
            d.mkdir(parents=True)
            for k in range(3):
                Image.fromarray((rng.random((24, 24, 3)) * 255).astype(np.uint8)).save(d / f"{k}.jpg")
        (tmp_path / f"{split}.csv").write_text("".join(lines))
    out = tmp_path / "out"
    rc = cli.main(["--data", str(tmp_path), "--dataset", "cremad", "--epochs", "1", "--width", "4",
                   "--image-size", "16", "--n-frames", "1", "--method", "baseline,ogm_ge",
                   "--out", str(out), "--quiet", "--no-plots", "--backend", "torch"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["data"]["n_train"] == 12 and res["data"]["dataset"] == "cremad"


def test_demo_methods_come_from_the_registry():
    from mmmod import methods
    assert train.demo_methods()[:2] == ("baseline", "multiloss")
    assert set(train.demo_methods()[2:]) == set(methods.names()) - {"none"}

    class Quarter(methods.Method):
        name = "quarter_demo_test"

        def coefficients(self, scores, *, alpha, beta_max, state):
            return torch.full_like(scores, 0.25)
    methods.register(Quarter())
    try:
        assert "quarter_demo_test" in train.demo_methods()
        assert cli._methods("baseline,quarter_demo_test") == ["baseline", "quarter_demo_test"]
    finally:
        methods.unregister("quarter_demo_test")
    with pytest.raises(SystemExit, match="quarter_demo_test"):
        cli._methods("quarter_demo_test")


@pytest.mark.parametrize("method", ["agm", "mslr", "inforeg"])
def test_train_one_runs_the_added_methods(tiny_data, method, monkeypatch):
    tr, te = tiny_data
    seen = []
    if method == "mslr":  # it is fed the heads' accuracy of the previous epoch, from epoch 1 on
        from mmmod.methods.mslr import MSLR
        real = MSLR.on_epoch

        def spy(self, state, epoch, **kw):
            seen.append((epoch, kw.get("val_acc")))
            return real(self, state, epoch, **kw)
        monkeypatch.setattr(MSLR, "on_epoch", spy)
    cfg = train.TrainConfig(epochs=3, batch_size=32, width=4, progress=False, probe_steps=5,
                            backend="torch")
    r = train.train_one(method, tr, te, cfg, seed=0)
    assert len(r.steps["step"]) == 9 and all(r.steps["modulated"])
    if method == "mslr":
        assert seen[0] == (0, None)
        for epoch, acc in seen[1:]:
            assert set(acc) == {"audio", "visual"} and all(0.0 <= a <= 1.0 for a in acc.values())


def test_cli_help_states_each_default_once_and_explains_every_flag():
    p = cli.build_parser()
    text = p.format_help()
    fmt = p._get_formatter()
    for a in p._actions:
        if a.dest == "help":
            continue
        assert a.help, f"{a.option_strings} has no help"
        assert fmt._expand_help(a).count("default") <= 1, a.option_strings
    assert "(default: None)" not in text and "(default: False)" not in text
    assert "--seed SEED           first seed (default: 0)" in text
    assert "training epochs (default: 15 on the built-in data, 30 on --data)" in " ".join(text.split())


def test_cli_methods_none_is_the_baseline():
    assert cli._methods("none,ogm_ge") == ["baseline", "ogm_ge"]
    with pytest.raises(SystemExit, match="unknown method 'nope'"):
        cli._methods("nope")


@pytest.mark.parametrize("method,fusion", [("inforeg", "concat"), ("inforeg", "sum"),
                                           ("inforeg", "film"), ("agm", "concat")])
def test_demo_trains_each_method_with_its_authors_losses(tiny_data, method, fusion, monkeypatch):
    """InfoReg's authors train on CE(fused) + CE(z_a) + CE(z_v), z_m the concat head's halves
    with autograd (GeWu-Lab/InfoReg_CVPR2025 main.py @ ea7b9d5): the demo's loss is that sum,
    and its z_m are the logits observe() scores; AGM's authors use the fused loss alone."""
    from mmmod import losses

    calls = []
    real = losses.multi_loss

    def spy(out, unimodal, y, *a, **k):
        calls.append((out, unimodal, y))
        return real(out, unimodal, y, *a, **k)
    monkeypatch.setattr(train.losses, "multi_loss", spy)
    observed = []
    real_observe = train.ModulatedOptimizer.observe

    def observe(self, logits, labels):
        observed.append([t.clone() for t in logits.values()])
        return real_observe(self, logits, labels)
    monkeypatch.setattr(train.ModulatedOptimizer, "observe", observe)
    tr, te = tiny_data
    cfg = train.TrainConfig(epochs=1, batch_size=48, width=4, fusion=fusion, progress=False,
                            probe_steps=5, backend="torch")
    r = train.train_one(method, tr, te, cfg, seed=0)
    assert r.objective == train.objective(method)
    if method == "agm":
        assert calls == [] and r.objective == "CE(fused)"
        return
    assert r.objective == "CE(fused) + CE(z_a) + CE(z_v)" and len(calls) == 2 == len(observed)
    for (out, unimodal, _), z in zip(calls, observed):
        assert all(u.requires_grad for u in unimodal)  # the encoders learn from them
        for u, zo in zip(unimodal, z):
            assert torch.equal(u.detach(), zo)
        if fusion == "concat":  # a linear split: the halves sum to the fused logits
            torch.testing.assert_close(unimodal[0] + unimodal[1], out, rtol=1e-5, atol=1e-5)


def test_split_logits_with_grad_equal_the_library_split():
    torch.manual_seed(0)
    for fusion in ("concat", "sum"):
        model = models.AVClassifier(5, fusion, width=4)
        out, feats = model(torch.randn(3, 1, 16, 20), torch.randn(3, 2, 3, 16, 16))
        got = train.split_logits_with_grad(model, feats)
        want = model.split_logits(feats)
        for g, w in zip(got, want):
            assert g.requires_grad
            torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_table_names_each_methods_training_loss():
    s = {"baseline": {k: (0.5, 0.0) for k in ("fused_acc", "audio_probe", "visual_probe", "wall_s")},
         "inforeg": {k: (0.5, 0.0) for k in ("fused_acc", "audio_probe", "visual_probe", "wall_s")}}
    table = cli.format_table(s)
    assert "training loss" in table and "CE(fused) + CE(z_a) + CE(z_v)" in table
