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
def sum_logits(linears: Sequence[torch.nn.Linear], features: Sequence[torch.Tensor], *,
               full_bias: bool = False) -> list[torch.Tensor]:
    """Sum fusion ``out = sum_m (W_m f_m + b_m)``: z_m = W_m f_m + b_m / M, the split the
    official OGM-GE code scores (``main.py`` @ 0f64793 lines 82-86: ``fc_x.bias / 2``,
    ``fc_y.bias / 2``; docs/semantics.md section 1). ``full_bias=True`` gives each branch's
    own logits W_m f_m + b_m instead (they add up to the fused logits; the authors' do not)."""
    if len(linears) != len(features):
        raise ValueError(f"{len(linears)} linear layers for {len(features)} feature tensors")
    share = 1 if full_bias else len(features)
    return [F.linear(f.detach(), lin.weight, None if lin.bias is None else lin.bias / share)
            for lin, f in zip(linears, features)]


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


class _GradScaledSum(torch.autograd.Function):
    """sum_m c_m forward; backward hands each c_m the incoming gradient times scales[m]."""

    @staticmethod
    def forward(ctx, scales, *contributions):
        # kept by reference, not saved: the scales are written after the forward, before the
        # backward (save_for_backward would refuse the in-place write)
        ctx.scales = scales
        out = contributions[0]
        for c in contributions[1:]:
            out = out + c
        return out

    @staticmethod
    def backward(ctx, grad):
        scales = ctx.scales
        # read when backward runs, on the device: whatever the scales hold then applies
        s = scales.to(grad.dtype)
        return (None, *(grad * s[m] for m in range(s.shape[0])))


class GradScales:
    """AGM's mechanism as its authors apply it (lihong2303/AGM model/CREMAD_net.py @ 5a65542,
    ``GradMod``, lines 39-55): the fused logits are the sum of each modality's contribution,
    and a backward hook multiplies the gradient that flows back through modality m's
    contribution by ``scales[m]``, so k_m reaches everything upstream of that contribution (the
    encoders, the fusion head, every tensor, 1-D ones included), not only the encoder
    parameters the optimizer scales by default. Not equivalent to scaling encoder gradients
    (docs/semantics.md, AGM).

    ``scales`` is a float32 device tensor [M] (ones at first); write this step's coefficients
    into it with :meth:`set_` before ``backward()`` (on the device, no host sync)::

        gs = mmmod.fusion.GradScales(2, device)
        out = gs.fuse([m_a, m_v])        # AGM: m_a = (full - no_audio + no_visual) / 2, ...
        gs.set_(k)                       # k: this step's AGM coefficients, a tensor [2]
        loss_fn(out, y).backward()
    """

    def __init__(self, num_modalities: int, device: torch.device | str | None = None):
        if isinstance(num_modalities, bool) or not isinstance(num_modalities, int) or num_modalities < 1:
            raise ValueError(f"num_modalities must be an int >= 1, got {num_modalities!r}")
        self.scales = torch.ones(num_modalities, dtype=torch.float32, device=device)

    def set_(self, coefficients: torch.Tensor) -> None:
        """Copy the coefficients [M] into the scales (device to device, no host read)."""
        if not isinstance(coefficients, torch.Tensor) or coefficients.shape != self.scales.shape:
            raise ValueError(f"coefficients must be a tensor of shape {tuple(self.scales.shape)}, "
                             f"got {getattr(coefficients, 'shape', type(coefficients).__name__)}")
        self.scales.copy_(coefficients.detach())

    def fuse(self, contributions: Sequence[torch.Tensor]) -> torch.Tensor:
        """The fused logits ``sum_m contributions[m]`` (in index order), each contribution's
        gradient multiplied by ``scales[m]`` in the backward."""
        return grad_scaled_sum(contributions, self.scales)


def grad_scaled_sum(contributions: Sequence[torch.Tensor], scales: torch.Tensor) -> torch.Tensor:
    """``sum_m contributions[m]``; the gradient reaching contribution m is scaled by
    ``scales[m]`` (a tensor [M], read when the backward runs)."""
    contributions = list(contributions)
    if not contributions:
        raise ValueError("grad_scaled_sum needs at least one contribution")
    if scales.dim() != 1 or scales.shape[0] != len(contributions):
        raise ValueError(f"scales has shape {tuple(scales.shape)}, need ({len(contributions)},): "
                         f"one scale per contribution")
    shape = contributions[0].shape
    for m, c in enumerate(contributions):
        if c.shape != shape:
            raise ValueError(f"contribution {m} has shape {tuple(c.shape)}, contribution 0 "
                             f"{tuple(shape)}: the contributions must have one shape")
    return _GradScaledSum.apply(scales, *contributions)
