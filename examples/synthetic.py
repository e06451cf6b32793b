"""Synthetic two-modality data and small models shared by the examples (no download).

Audio is the easy modality: its features carry the class clearly. Vision carries it weakly,
plus a second cue audio lacks (which of a class pair), so a model that leans on audio alone is
capped: the imbalance the modulation methods address. Every example runs on these in seconds.
"""
from __future__ import annotations

import argparse

import torch
from torch import nn

CLASSES = 6


def make_data(n: int, seed: int, image: bool = False):
    """(audio, visual, labels): audio [n, 24] or [n, 1, 12, 12], visual [n, 32] or [n, 3, 12, 12]."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    # audio tells the class pair (y // 2) clearly and nothing about y % 2
    pa = torch.randn(CLASSES // 2, 24, generator=torch.Generator().manual_seed(100))
    xa = pa[y // 2] * 1.5 + torch.randn(n, 24, generator=g)
    # vision tells the whole class, weakly
    pv = torch.randn(CLASSES, 32, generator=torch.Generator().manual_seed(101))
    xv = pv[y] * 0.45 + torch.randn(n, 32, generator=g)
    if image:  # the same information laid out as small images for conv encoders
        xa = nn.functional.pad(xa, (0, 144 - 24)).view(n, 1, 12, 12)
        xv = nn.functional.pad(xv, (0, 144 - 32)).view(n, 1, 12, 12).expand(n, 3, 12, 12).clone()
    return xa, xv, y


def loaders(n_train: int = 2048, n_val: int = 512, batch_size: int = 64, seed: int = 0,
            image: bool = False):
    tr = torch.utils.data.TensorDataset(*make_data(n_train, seed, image))
    va = torch.utils.data.TensorDataset(*make_data(n_val, seed + 1, image))
    return (torch.utils.data.DataLoader(tr, batch_size=batch_size, shuffle=True,
                                        generator=torch.Generator().manual_seed(seed)),
            torch.utils.data.DataLoader(va, batch_size=256))


class MLPPair(nn.Module):
    """Two MLP encoders and a concat-fusion head: ``forward`` returns the fused logits and
    each modality's features (what ``observe`` and the unimodal heads need)."""

    def __init__(self, d_audio: int = 24, d_visual: int = 32, hidden: int = 64,
                 classes: int = CLASSES, unimodal_heads: bool = False):
        super().__init__()
        self.audio = nn.Sequential(nn.Linear(d_audio, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.visual = nn.Sequential(nn.Linear(d_visual, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.head = nn.Linear(2 * hidden, classes)
        # MLB trains one linear head per modality next to the fusion head
        self.heads = nn.ModuleDict({"audio": nn.Linear(hidden, classes),
                                    "visual": nn.Linear(hidden, classes)}) if unimodal_heads else None

    def forward(self, xa, xv):
        fa, fv = self.audio(xa), self.visual(xv)
        return self.head(torch.cat([fa, fv], 1)), (fa, fv)


class ConvPair(nn.Module):
    """Two small conv encoders (4-D conv weights: what OGM-GE's default filter keeps)."""

    def __init__(self, classes: int = CLASSES, width: int = 16):
        super().__init__()

        def encoder(cin):
            return nn.Sequential(nn.Conv2d(cin, width, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.audio, self.visual = encoder(1), encoder(3)
        self.head = nn.Linear(2 * width, classes)

    def forward(self, xa, xv):
        fa, fv = self.audio(xa), self.visual(xv)
        return self.head(torch.cat([fa, fv], 1)), (fa, fv)


@torch.no_grad()
def accuracy(model, loader) -> dict:
    """Fused accuracy and each modality's share of the fusion head alone (its logits from
    ``mmmod.fusion.concat_logits``), on ``loader``."""
    import mmmod
    model.eval()
    hits = {"fused": 0, "audio": 0, "visual": 0}
    n = 0
    for xa, xv, y in loader:
        out, feats = model(xa, xv)
        za, zv = mmmod.fusion.concat_logits(model.head, feats)
        for key, z in (("fused", out), ("audio", za), ("visual", zv)):
            hits[key] += int((z.argmax(1) == y).sum())
        n += len(y)
    model.train()
    return {k: v / n for k, v in hits.items()}


def arguments(description: str, epochs: int) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--epochs", type=int, default=epochs, help="training epochs")
    p.add_argument("--tiny", action="store_true",
                   help="a few steps on a little data (what the tests run)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="examples_out", help="folder for logs the example writes")
    return p.parse_args()


def budget(args) -> dict:
    """Loader sizes for the run: the full synthetic set, or a tiny one for --tiny."""
    return {"n_train": 192, "n_val": 128} if args.tiny else {}
