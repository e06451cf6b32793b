"""InfoReg's proximal correction of one modality (``mmmod::proximal_``), in plain torch.

One call corrects one modality's selected gradients in one pass per element::

    g <- g + beta (theta - theta_snapshot)      (float32 arithmetic, rounded to g's dtype)

and returns the Fisher increment ``sum over tensors of >= 2 dims of mean(g_new^2)`` as a 0-d
float64 tensor on beta's device. ``beta`` is a one-element float tensor on the tensors' device,
read by the kernels (no host sync); the fused kernels leave every gradient bit-identical when
it is 0 (they do not store). Tensors with no gradient are left out by the caller (the op's
schema holds no ``None``); empty tensors contribute nothing. The method: docs/semantics.md,
section "InfoReg".
"""
from __future__ import annotations

from typing import Sequence

import torch

#: dtypes the fused kernels take (g, theta and the snapshot share one per tensor)
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_inputs(grads, params, snapshots, beta) -> None:
    """The checks every implementation makes before anything is written (a ValueError or
    TypeError naming the bad argument)."""
    if not (len(grads) == len(params) == len(snapshots)):
        raise ValueError(f"mmmod.proximal_: {len(grads)} grads, {len(params)} params and "
                         f"{len(snapshots)} snapshots; expected one of each per tensor")
    if not isinstance(beta, torch.Tensor) or beta.numel() != 1 \
            or not beta.dtype.is_floating_point:
        raise ValueError("mmmod.proximal_: beta must be a one-element floating-point tensor")
    for i, (g, p, p0) in enumerate(zip(grads, params, snapshots)):
        if g.shape != p.shape or p0.shape != p.shape:
            raise ValueError(f"mmmod.proximal_: tensor {i}: grad {tuple(g.shape)}, param "
                             f"{tuple(p.shape)} and snapshot {tuple(p0.shape)} differ in shape")
        if not (g.dtype == p.dtype == p0.dtype) or g.dtype not in DTYPES:
            raise TypeError(f"mmmod.proximal_: tensor {i}: grad {g.dtype}, param {p.dtype}, "
                            f"snapshot {p0.dtype}; expected one dtype among float32, float16, "
                            f"bfloat16, float64")
        if not (g.device == p.device == p0.device == beta.device):
            raise ValueError(f"mmmod.proximal_: tensor {i}: grad on {g.device}, param on "
                             f"{p.device}, snapshot on {p0.device}, beta on {beta.device}; "
                             f"expected one device")


@torch.no_grad()
def proximal_(grads: Sequence[torch.Tensor | None], params: Sequence[torch.Tensor],
              snapshots: Sequence[torch.Tensor], beta: torch.Tensor) -> torch.Tensor:
    """Reference of the fused proximal op, one modality: ``g <- g + beta (p - p0)`` for every
    tensor with a gradient, in float32 and cast back to g's dtype; returns the Fisher increment
    ``sum over tensors of >= 2 dims of mean(g_new^2)`` (float64, 0-d), all on the device.

    The increment is per-step (mean_e sum_t = sum_t mean_e), so no per-element accumulator is
    kept, unlike the authors' code."""
    fisher = None
    b = beta.float()
    for g, p, p0 in zip(grads, params, snapshots):
        if g is None or g.numel() == 0:
            continue
        new = g.float() + b * (p.float() - p0.float())
        # beta = 0 (every modality but the leader, most steps) leaves g bit for bit, -0.0 and
        # float64 included, decided on the device
        g.copy_(torch.where(b == 0, g, new.to(g.dtype)))
        if g.dim() >= 2:
            inc = g.float().square().mean().double()
            fisher = inc if fisher is None else fisher + inc
    if fisher is None:
        return torch.zeros((), dtype=torch.float64, device=beta.device)
    return fisher.to(beta.device)
