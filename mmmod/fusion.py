"""Per-modality logits from a fusion head (docs/semantics.md section 1), without autograd."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .slices import ParamSlice


@torch.no_grad()
def concat_logits(linear: torch.nn.Linear, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Concat fusion ``out = W [f_0; f_1; ...] + b``: z_m = f_m W[:, cols(m)]^T + b / M."""
    widths = [f.shape[-1] for f in features]
    if sum(widths) != linear.in_features:
        raise ValueError(f"feature widths {widths} sum to {sum(widths)} but the fusion layer "
                         f"takes {linear.in_features} inputs")
    m = len(features)
    out, start = [], 0
    for f, w in zip(features, widths):
        bias = None if linear.bias is None else linear.bias / m
        out.append(F.linear(f.detach(), linear.weight[:, start:start + w], bias))
        start += w
    return out


@torch.no_grad()
def sum_logits(linears: Sequence[torch.nn.Linear], features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Sum fusion ``out = sum_m (W_m f_m + b_m)``: z_m = W_m f_m + b_m (full bias of that branch)."""
    if len(linears) != len(features):
        raise ValueError(f"{len(linears)} linear layers for {len(features)} feature tensors")
    return [lin(f.detach()) for lin, f in zip(linears, features)]


def concat_slices(linear: torch.nn.Linear, widths: Sequence[int]) -> list[ParamSlice]:
    """Each modality's column block of a concat-fusion weight (MLB modulates it with the
    modality's encoder): ``modalities={"audio": [enc_a, slices[0]], ...}``."""
    if sum(widths) != linear.in_features:
        raise ValueError(f"widths {list(widths)} sum to {sum(widths)} but the fusion layer takes "
                         f"{linear.in_features} inputs")
    out, start = [], 0
    for w in widths:
        out.append(ParamSlice(linear.weight, 1, start, start + w))
        start += w
    return out
