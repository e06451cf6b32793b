"""Small ResNet-style encoders for spectrograms and frames, and fusion heads that each give
correct per-modality logits for modulation (docs/semantics.md section 1).

* ``concat``: ``out = W [f_a; f_v] + b``; z_m from ``mmmod.fusion.concat_logits`` (W's column
  block of modality m and b / M), as the official OGM-GE code.
* ``sum``: ``out = W_a f_a + b_a + W_v f_v + b_v``; z_m = W_m f_m + b_m / 2 (``sum_logits``),
  as the official OGM-GE code.
* ``film``: FiLM as in the official code (vision produces gamma, beta that modulate the audio
  features), and ``gated``: the official gated fusion (a sigmoid gate from the audio branch on
  the visual branch). Neither has a linear per-modality split -- the official code crashes
  there -- so z_m comes from the model's unimodal heads, linear classifiers on each encoder's
  features (trained on detached features unless the method trains them jointly, as MLB does).

``resnet18=True`` gives the paper's encoders: torchvision-style ResNet-18 trunks (64-128-256-512
channels, two BasicBlocks per stage, 7x7 stride-2 stem and max-pool), 512-d features, audio with
one input channel, frames with three; frames are folded into the batch and the pooled features
averaged over time, as the official code does.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import fusion as mfusion

FUSIONS = ("concat", "sum", "film", "gated")


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.down is None else self.down(x)))


class ResNetEncoder(nn.Module):
    """Conv stem + stages of BasicBlocks + global average pooling -> [B, widths[-1]].

    Accepts [B, C, H, W] or, for frames, [B, T, C, H, W] (frames averaged after pooling).
    """

    def __init__(self, in_channels: int, widths: Sequence[int] = (16, 32, 64),
                 blocks: Sequence[int] = (1, 1, 1), big_stem: bool = False) -> None:
        super().__init__()
        if big_stem:  # ResNet-18: 7x7 stride 2 + 3x3 max-pool
            self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 7, 2, 3, bias=False),
                                      nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True),
                                      nn.MaxPool2d(3, 2, 1))
        else:  # a stride-2 3x3 stem keeps small inputs cheap on a CPU
            self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, 2, 1, bias=False),
                                      nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        layers, cin = [], widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks)):
            for j in range(n):
                layers.append(BasicBlock(cin, w, 2 if (j == 0 and i > 0) else 1))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.out_dim = cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        frames = None
        if x.dim() == 5:
            frames = x.shape[1]
            x = x.flatten(0, 1)
        f = self.layers(self.stem(x)).mean(dim=(-2, -1))
        if frames is not None:
            f = f.view(-1, frames, f.shape[-1]).mean(dim=1)
        return f


def make_encoder(in_channels: int, width: int = 16, resnet18: bool = False) -> ResNetEncoder:
    if resnet18:
        return ResNetEncoder(in_channels, (64, 128, 256, 512), (2, 2, 2, 2), big_stem=True)
    return ResNetEncoder(in_channels, (width, 2 * width, 4 * width), (1, 1, 1))


class ConcatFusion(nn.Module):
    def __init__(self, da: int, dv: int, n_classes: int) -> None:
        super().__init__()
        self.fc_out = nn.Linear(da + dv, n_classes)
        self.widths = (da, dv)

    def forward(self, fa, fv):
        return self.fc_out(torch.cat([fa, fv], dim=1))

    def modality_logits(self, fa, fv):
        return mfusion.concat_logits(self.fc_out, [fa, fv])

    def modality_slices(self):
        """Each modality's column block of the fusion weight (MLB modulates it)."""
        return mfusion.concat_slices(self.fc_out, self.widths)


class SumFusion(nn.Module):
    def __init__(self, da: int, dv: int, n_classes: int) -> None:
        super().__init__()
        self.fc_a = nn.Linear(da, n_classes)
        self.fc_v = nn.Linear(dv, n_classes)

    def forward(self, fa, fv):
        return self.fc_a(fa) + self.fc_v(fv)

    def modality_logits(self, fa, fv):
        return mfusion.sum_logits([self.fc_a, self.fc_v], [fa, fv])

    def modality_slices(self):
        return [self.fc_a, self.fc_v]


class FiLMFusion(nn.Module):
    """Official OGM-GE FiLM: gamma, beta = split(fc(f_v)); out = fc_out(gamma * f_a + beta)."""

    def __init__(self, da: int, dv: int, n_classes: int, dim: int | None = None) -> None:
        super().__init__()
        self.dim = da
        self.fc = nn.Linear(dv, 2 * da)
        self.fc_out = nn.Linear(da, n_classes)

    def forward(self, fa, fv):
        gamma, beta = torch.split(self.fc(fv), self.dim, dim=1)
        return self.fc_out(gamma * fa + beta)

    modality_logits = None  # no linear split: use the unimodal heads
    modality_slices = None


class GatedFusion(nn.Module):
    """Official OGM-GE gated fusion: out = fc_out(sigmoid(fc_a(f_a)) * fc_v(f_v))."""

    def __init__(self, da: int, dv: int, n_classes: int, dim: int = 128) -> None:
        super().__init__()
        self.fc_a = nn.Linear(da, dim)
        self.fc_v = nn.Linear(dv, dim)
        self.fc_out = nn.Linear(dim, n_classes)

    def forward(self, fa, fv):
        return self.fc_out(torch.sigmoid(self.fc_a(fa)) * self.fc_v(fv))

    modality_logits = None
    modality_slices = None


_FUSION_CLS = {"concat": ConcatFusion, "sum": SumFusion, "film": FiLMFusion, "gated": GatedFusion}


class AVClassifier(nn.Module):
    """Audio and visual encoders, a fusion head, and one unimodal linear head per modality.

    ``forward(audio, visual)`` returns ``(fused_logits, [f_audio, f_visual])``;
    ``modality_logits(feats, heads=...)`` the per-modality logits used for the scores.
    """

    names = ("audio", "visual")

    def __init__(self, n_classes: int, fusion: str = "concat", width: int = 16,
                 resnet18: bool = False, visual_channels: int = 3) -> None:
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f"unknown fusion {fusion!r}; expected one of {FUSIONS}")
        self.fusion_name = fusion
        self.audio_net = make_encoder(1, width, resnet18)
        self.visual_net = make_encoder(visual_channels, width, resnet18)
        da, dv = self.audio_net.out_dim, self.visual_net.out_dim
        self.fusion = _FUSION_CLS[fusion](da, dv, n_classes)
        self.heads = nn.ModuleDict({"audio": nn.Linear(da, n_classes),
                                    "visual": nn.Linear(dv, n_classes)})

    @property
    def has_split(self) -> bool:
        """Whether the fusion head itself yields per-modality logits (concat, sum)."""
        return self.fusion.modality_logits is not None

    def forward(self, audio: torch.Tensor, visual: torch.Tensor):
        fa, fv = self.audio_net(audio), self.visual_net(visual)
        return self.fusion(fa, fv), [fa, fv]

    def head_logits(self, feats, detach: bool = True) -> list[torch.Tensor]:
        """Unimodal heads' logits; on detached features they train only the heads."""
        return [self.heads[n](f.detach() if detach else f) for n, f in zip(self.names, feats)]

    def split_logits(self, feats) -> list[torch.Tensor]:
        """The fusion head's own per-modality logits (concat/sum; no autograd)."""
        if not self.has_split:
            raise ValueError(f"{self.fusion_name} fusion has no per-modality split; "
                             f"use the unimodal heads (head_logits)")
        return self.fusion.modality_logits(*feats)
