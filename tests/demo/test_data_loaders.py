"""The real-data loaders on tiny data sets written here in the official OGM-GE layouts."""
import sys
import warnings

import numpy as np
import pytest
import torch

sf = pytest.importorskip("soundfile")

from mmmod.data import features, loaders  # noqa: E402


def _wav(path, seconds=0.3, sr=16000, freq=440.0):
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * sr)) / sr
    sf.write(str(path), (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), sr)


def _frames(folder, n=4, size=20, names="frame_{:05d}.jpg", ext=None):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        img = (rng.random((size, size + 4, 3)) * 255).astype(np.uint8)
        name = names.format(i + 1)
        try:
            from PIL import Image
            Image.fromarray(img).save(folder / name)
        except ImportError:  # PNG via matplotlib
            import matplotlib.image as mpimg
            mpimg.imsave(str(folder / name.replace(".jpg", ".png")), img)


KW = dict(image_size=16, n_frames=2, n_mels=16, clip_seconds=0.25, n_fft=128, hop_length=64)


def _check(ds, n, n_classes):
    assert len(ds) == n and ds.n_classes == n_classes
    spec, frames, label = ds[0]
    assert spec.shape[0] == 1 and spec.shape[1] == 16 and torch.isfinite(spec).all()
    assert frames.shape == (2, 3, 16, 16) and torch.isfinite(frames).all()
    a, v, y = ds.batch(torch.arange(len(ds)))
    assert a.shape[0] == v.shape[0] == y.numel() == n
    assert torch.equal(y, ds.labels)


def test_cremad(tmp_path):
    rows = {"train": [("1001_DFA_ANG_XX", "ANG"), ("1001_DFA_HAP_XX", "HAP"),
                      ("1002_DFA_NEU_XX", "NEU")],
            "test": [("1003_DFA_SAD_XX", "SAD"), ("1004_DFA_FEA_XX", "FEA")]}
    for split, rs in rows.items():
        # a UTF-8 BOM, as the official CSVs have
        (tmp_path / f"{split}.csv").write_text("\ufeff" + "".join(f"{c},{e}\n" for c, e in rs),
                                               encoding="utf-8")
        for clip, _ in rs:
            _wav(tmp_path / "AudioWAV" / f"{clip}.wav")
            _frames(tmp_path / "Image-01-FPS" / clip)
    # a listed clip without its files is skipped, as the official code does
    with open(tmp_path / "train.csv", "a") as f:
        f.write("9999_MISSING,DIS\n")
    tr = loaders.cremad(tmp_path, "train", **KW)
    _check(tr, 3, 6)
    assert tr.skipped == 1
    assert tr.labels.tolist() == [5, 1, 0]  # official class_dict order
    te = loaders.load("CREMA-D", tmp_path, "test", **KW)
    assert te.labels.tolist() == [2, 3] and not te.train


def test_cremad_official_stft_feature(tmp_path):
    (tmp_path / "test.csv").write_text("clip,NEU\n")
    _wav(tmp_path / "AudioWAV" / "clip.wav", seconds=1.0, sr=22050)
    _frames(tmp_path / "Image-01-FPS" / "clip")
    ds = loaders.cremad(tmp_path, "test", audio_feature="stft", image_size=16, n_frames=1)
    spec, _, _ = ds[0]
    assert spec.shape == (1, 257, 188)  # 3 s at 22.05 kHz, n_fft 512, hop 353


def test_kinetics_sounds(tmp_path):
    rows = {"train": [("-4-0ihtnBU_000058_000068", 4), ("--6q_33gNew_000132_000142", 27)],
            "test": [("-00nar1nEPc_000033_000043", 13)]}
    for split, rs in rows.items():
        (tmp_path / f"my_{split}.txt").write_text("".join(f"{c},10,{y}\n" for c, y in rs))
        for clip, _ in rs:
            _frames(tmp_path / split / clip, names="{:05d}.jpg")
            _wav(tmp_path / split / clip / f"{clip}.wav")
    tr = loaders.kinetics_sounds(tmp_path, "train", **KW)
    _check(tr, 2, 28)
    assert tr.labels.tolist() == [4, 27]
    te = loaders.load("ks", tmp_path, "test", **KW)
    assert te.n_classes == 28 and te.labels.tolist() == [13]


def test_kinetics_sounds_space_separated(tmp_path):
    (tmp_path / "my_train.txt").write_text("clipA 3\nclipB 1\n")
    for c in ("clipA", "clipB"):
        _frames(tmp_path / "train" / c)
        _wav(tmp_path / "train" / f"{c}.wav")  # audio next to the clip folders
    tr = loaders.kinetics_sounds(tmp_path, "train", **KW)
    assert tr.labels.tolist() == [3, 1] and tr.n_classes == 4


def test_ave(tmp_path):
    (tmp_path / "stat.txt").write_text("Dog\nBell\nChainsaw\n")
    (tmp_path / "my_train.txt").write_text(
        "Dog,vidA,good,0,10\nBell,vidB,good,0,10\nChainsaw,vidC,good,0,10\nBell,vidC,good,0,10\n")
    (tmp_path / "my_test.txt").write_text("Chainsaw,vidD,good,0,10\n")
    for v in ("vidA", "vidB", "vidC", "vidD"):
        _wav(tmp_path / "audio" / f"{v}.wav")
        _frames(tmp_path / "visual" / v)
    tr = loaders.ave(tmp_path, "train", **KW)
    # classes sorted: Bell 0, Chainsaw 1, Dog 2; vidC listed twice -> dropped
    _check(tr, 2, 3)
    assert tr.labels.tolist() == [2, 0] and tr.skipped == 1
    te = loaders.load("ave", tmp_path, "test", **KW)
    assert te.labels.tolist() == [1]


def test_train_mode_frame_sampling_and_cache(tmp_path):
    (tmp_path / "train.csv").write_text("c1,HAP\n")
    _wav(tmp_path / "audio" / "c1.wav")
    _frames(tmp_path / "visual" / "c1", n=9)
    ds = loaders.cremad(tmp_path, "train", cache=True, **KW)
    assert ds.train
    a1, v1, _ = ds[0]
    a2, v2, _ = ds[0]
    assert torch.equal(v1, v2)  # cached


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        loaders.cremad(tmp_path, "train")
    with pytest.raises(ValueError, match="unknown dataset"):
        loaders.load("vggsound", tmp_path)
    (tmp_path / "train.csv").write_text("clip,XYZ\n")
    with pytest.raises(ValueError, match="EMO"):
        loaders.cremad(tmp_path, "train")


def test_logmel_fallback_matches_torchaudio():
    x = torch.randn(2, 4000)
    ref = features.LogMel(8000, 256, 64, 32, backend="torch")(x)
    assert ref.shape == (2, 32, 63)
    try:
        import torchaudio.transforms  # noqa: F401
    except Exception:
        pytest.skip("torchaudio not importable")
    ta = features.LogMel(8000, 256, 64, 32, backend="torchaudio")(x)
    torch.testing.assert_close(ta, ref, rtol=1e-4, atol=1e-3)


def test_no_torchaudio_warns_once_and_falls_back(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchaudio", None)  # import fails
    monkeypatch.setitem(sys.modules, "torchaudio.transforms", None)
    monkeypatch.setattr(features, "_TORCHAUDIO", None)
    monkeypatch.setattr(features, "_WARNED", False)
    with pytest.warns(RuntimeWarning, match="torchaudio"):
        m = features.LogMel(8000, 256, 64, 32)
    assert m.backend == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        features.LogMel(8000, 256, 64, 32)  # no second warning
    with pytest.raises(ImportError):
        features.LogMel(8000, 256, 64, 32, backend="torchaudio")


def test_package_import_does_not_import_torchaudio():
    code = ("import sys, mmmod, mmmod.data, mmmod.demo, mmmod.__main__; "
            "assert 'torchaudio' not in sys.modules, 'torchaudio imported'")
    import subprocess
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
