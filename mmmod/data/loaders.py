"""CREMA-D, Kinetics-Sounds and AVE in the layouts the official OGM-GE preprocessing produces.

Each loader reads the split file the official code reads, keeps the samples whose audio and
frame folder both exist (the official code skips the others silently; here they are counted
in ``dataset.skipped``), and returns ``(spectrogram [1, F, T], frames [n_frames, 3, S, S],
label)`` per sample. WAV files are read with soundfile; audio features are log-mel (torchaudio
transforms or mmmod's pure-torch fallback) or, with ``audio_feature="stft"``, the official
CREMA-D feature (22.05 kHz, clip tiled to 3 s, log |STFT| with n_fft 512, hop 353). Frames are
decoded with Pillow (or matplotlib for PNG), resized to ``image_size`` and normalised with the
ImageNet mean/std, ``n_frames`` of them evenly spaced over the sorted frame files (random within
each segment when ``train=True``, the middle one otherwise).

Supported layouts (``root`` is the folder passed in):

CREMA-D (official ``CramedDataset``)::

    root/train.csv, root/test.csv       rows "<clip>,<EMO>", no header (a UTF-8 BOM is fine);
                                        EMO in NEU HAP SAD FEA DIS ANG -> labels 0..5
    root/AudioWAV/<clip>.wav            (or root/audio/<clip>.wav)
    root/Image-01-FPS/<clip>/*.jpg      (Image-{fps:02d}-FPS; or root/visual/<clip>/*.jpg)

Kinetics-Sounds (official ``data/KineticSound/my_{train,test}.txt`` and the VGG&KS
preprocessing tree)::

    root/my_train.txt, root/my_test.txt rows "<clip>,...,<label>" (comma- or space-separated;
                                        the last field is the integer label, as in
                                        "-4-0ihtnBU_000058_000068,10,4")
    root/train/<clip>/*.jpg             frames of one clip ...
    root/train/<clip>/<clip>.wav        ... and its audio, in the same folder
    root/test/<clip>/...                (audio may also be root/<split>/<clip>.wav)

AVE (official ``AVEDataset``)::

    root/stat.txt                       one class name per line; label = index in sorted order
    root/my_train.txt, my_test.txt,     rows "<class name>,<video id>[,...]"; a video id listed
    root/my_val.txt                     twice in a split is dropped, as the official code does
    root/audio/<video id>.wav           (the older audio_spec/*.pkl pickles are not read)
    root/visual/<video id>/*.jpg        (frame_00001.jpg, ...)
"""
from __future__ import annotations

import csv
import os
import random
from pathlib import Path
from typing import Optional, Sequence

import torch

from .features import IMAGENET_MEAN, IMAGENET_STD, LogMel, fit_length, log_stft, read_image, read_wav

CREMAD_CLASSES = ("NEU", "HAP", "SAD", "FEA", "DIS", "ANG")
IMAGE_EXTS = (".jpg", ".jpeg", ".png")


class AVFolderDataset(torch.utils.data.Dataset):
    """Samples ``(wav path, frame folder, label)`` -> ``(spec, frames, label)`` tensors."""

    def __init__(self, samples: Sequence[tuple], classes: Sequence[str], *, train: bool = False,
                 sample_rate: int = 16000, clip_seconds: float = 3.0,
                 audio_feature: str = "logmel", n_mels: int = 128, n_fft: int = 512,
                 hop_length: int = 256, n_frames: int = 3, image_size: int = 112,
                 cache: bool = False, skipped: int = 0, seed: int = 0) -> None:
        if audio_feature not in ("logmel", "stft"):
            raise ValueError(f"audio_feature must be 'logmel' or 'stft', got {audio_feature!r}")
        self.samples = [(Path(a), Path(v), int(y)) for a, v, y in samples]
        self.classes = list(classes)
        self.labels = torch.tensor([y for _, _, y in self.samples], dtype=torch.long)
        self.train, self.n_frames, self.image_size = train, int(n_frames), int(image_size)
        self.audio_feature = audio_feature
        if audio_feature == "stft":  # the official CREMA-D feature
            self.sample_rate, self.length = 22050, 22050 * 3
        else:
            self.sample_rate, self.length = int(sample_rate), int(round(sample_rate * clip_seconds))
            self.logmel = LogMel(self.sample_rate, n_fft, hop_length, n_mels)
        self.n_fft, self.hop_length = n_fft, hop_length
        self.skipped = skipped
        self._cache = {} if cache else None
        self._rng = random.Random(seed)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def audio(self, i: int) -> torch.Tensor:
        wave, _ = read_wav(self.samples[i][0], self.sample_rate)
        wave = fit_length(wave, self.length)
        with torch.no_grad():
            if self.audio_feature == "stft":
                spec = log_stft(wave, 512, 353)
            else:
                spec = self.logmel(wave)
                spec = (spec - spec.mean()) / 20.0
        return spec[None].float()

    def frame_files(self, i: int) -> list:
        folder = self.samples[i][1]
        return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS)

    def frames(self, i: int) -> torch.Tensor:
        files = self.frame_files(i)
        if not files:
            raise FileNotFoundError(f"no frames (.jpg/.png) in {self.samples[i][1]}")
        n = self.n_frames
        seg = len(files) / n
        picks = []
        for k in range(n):
            lo = int(k * seg)
            hi = max(lo, int((k + 1) * seg) - 1)
            picks.append(self._rng.randint(lo, hi) if self.train else (lo + hi) // 2)
        imgs = []
        for j in picks:
            img = read_image(files[min(j, len(files) - 1)], self.image_size)
            if self.train and self._rng.random() < 0.5:
                img = img.flip(-1)
            imgs.append((img - IMAGENET_MEAN) / IMAGENET_STD)
        return torch.stack(imgs)

    def __getitem__(self, i: int):
        if self._cache is not None and i in self._cache:
            spec, frames = self._cache[i]
        else:
            spec, frames = self.audio(i), self.frames(i)
            if self._cache is not None:
                self._cache[i] = (spec, frames)
        return spec, frames, self.samples[i][2]

    def batch(self, idx):
        """Stacked ``(audio, visual, labels)`` of the samples ``idx`` (used by the demo)."""
        items = [self[int(i)] for i in idx]
        return (torch.stack([a for a, _, _ in items]), torch.stack([v for _, v, _ in items]),
                torch.tensor([y for _, _, y in items], dtype=torch.long))


def _first_existing(*paths: Path) -> Optional[Path]:
    for p in paths:
        if p.exists():
            return p
    return None


def _rows(path: Path) -> list[list[str]]:
    """CSV rows (comma-separated, or whitespace-separated when a line has no comma)."""
    out = []
    with open(path, encoding="utf-8-sig", newline="") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            out.append(next(csv.reader([line])) if "," in line else line.split())
    return [[c.strip() for c in r] for r in out]


def _split_file(root: Path, split: str, names: Sequence[str]) -> Path:
    for n in names:
        if (root / n).exists():
            return root / n
    raise FileNotFoundError(f"no split file for split {split!r} in {root} (looked for "
                            f"{', '.join(names)})")


def cremad(root, split: str = "train", fps: int = 1, **kw) -> AVFolderDataset:
    """CREMA-D as the official OGM-GE ``CramedDataset`` reads it (see the module docstring)."""
    root = Path(root)
    csv_path = _split_file(root, split, [f"{split}.csv"])
    audio_dir = _first_existing(root / "AudioWAV", root / "audio") or root / "AudioWAV"
    visual_dir = _first_existing(root / f"Image-{fps:02d}-FPS", root / "visual") or root / "visual"
    index = {c: i for i, c in enumerate(CREMAD_CLASSES)}
    samples, skipped = [], 0
    for row in _rows(csv_path):
        if len(row) < 2 or row[1] not in index:
            raise ValueError(f"{csv_path}: bad row {row!r}; expected '<clip>,<EMO>' with EMO in "
                             f"{CREMAD_CLASSES}")
        a, v = audio_dir / f"{row[0]}.wav", visual_dir / row[0]
        if a.exists() and v.is_dir():
            samples.append((a, v, index[row[1]]))
        else:
            skipped += 1
    kw.setdefault("train", split == "train")
    return AVFolderDataset(samples, CREMAD_CLASSES, skipped=skipped, **kw)


def kinetics_sounds(root, split: str = "train", n_classes: Optional[int] = None,
                    **kw) -> AVFolderDataset:
    """Kinetics-Sounds in the official VGG&KS preprocessing tree (see the module docstring)."""
    root = Path(root)
    txt = _split_file(root, split, [f"my_{split}.txt", f"{split}.txt", f"{split}.csv"])
    samples, skipped, labels = [], 0, []
    for row in _rows(txt):
        name, label = row[0], int(row[-1])
        labels.append(label)
        folder = root / split / name
        a = _first_existing(folder / f"{name}.wav", root / split / f"{name}.wav",
                            root / "audio" / f"{name}.wav")
        if a is not None and folder.is_dir():
            samples.append((a, folder, label))
        else:
            skipped += 1
    if n_classes is None:  # both splits' labels, so train and test agree
        for other in ("train", "test"):
            p = root / f"my_{other}.txt"
            if other != split and p.exists():
                labels += [int(r[-1]) for r in _rows(p)]
        n_classes = max(labels) + 1 if labels else 0
    kw.setdefault("train", split == "train")
    return AVFolderDataset(samples, [str(i) for i in range(n_classes)], skipped=skipped, **kw)


def ave(root, split: str = "train", **kw) -> AVFolderDataset:
    """AVE as the official OGM-GE ``AVEDataset`` reads it (see the module docstring)."""
    root = Path(root)
    classes = sorted(r[0] for r in _rows(_split_file(root, split, ["stat.txt", "stat.csv"])))
    txt = _split_file(root, split, [f"my_{split}.txt", f"{split}.txt"])
    data: dict[str, str] = {}
    dropped = set()
    skipped = 0
    for row in _rows(txt):
        cls, vid = row[0], row[1]
        a, v = root / "audio" / f"{vid}.wav", root / "visual" / vid
        if not (a.exists() and v.is_dir()):
            skipped += 1
            continue
        if vid in data or vid in dropped:  # listed twice: the official code drops it
            data.pop(vid, None)
            dropped.add(vid)
            continue
        if cls not in classes:
            raise ValueError(f"{txt}: class {cls!r} of {vid!r} is not in stat.txt")
        data[vid] = cls
    samples = [(root / "audio" / f"{vid}.wav", root / "visual" / vid, classes.index(c))
               for vid, c in data.items()]
    kw.setdefault("train", split == "train")
    return AVFolderDataset(samples, classes, skipped=skipped + len(dropped), **kw)


DATASETS = {"cremad": cremad, "ks": kinetics_sounds, "kinetics_sounds": kinetics_sounds,
            "ave": ave}


def load(name: str, root, split: str = "train", **kw) -> AVFolderDataset:
    """``load("cremad" | "ks" | "ave", root, split)``."""
    key = name.lower().replace("-", "").replace("_", "")
    key = {"cremad": "cremad", "ks": "ks", "kineticssounds": "ks", "kineticsound": "ks",
           "ave": "ave"}.get(key)
    if key is None:
        raise ValueError(f"unknown dataset {name!r}; expected one of cremad, ks, ave")
    if not os.path.isdir(root):
        raise FileNotFoundError(f"data folder {root} does not exist")
    return DATASETS[key](root, split, **kw)
