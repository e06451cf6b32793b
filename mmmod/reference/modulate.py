"""Applying the coefficients to gradients (docs/semantics.md section 4), in plain torch.

Per selected tensor g of modality m, in float32 and cast back to g's dtype:
  OGM, MLB:  g <- k_m * g
  OGM-GE:    g <- k_m * g + sigma * n,   sigma = float32(std(g) + 1e-8)
where std is the unbiased standard deviation of g's raw values accumulated in float64 (the
std of a one-element tensor is defined as 0, so its sigma is 1e-8), ``noise_std="scaled"``
uses |k_m| * std(g) instead (std after scaling, the first public version), and n is the
counter-based noise of :mod:`mmmod.reference.philox`. Empty tensors are left alone. A tensor
whose sigma is not finite (NaN/inf in g, or an overflowing std) gets no noise (sigma = 0), so
the modulation never spreads a non-finite value to other elements.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .philox import CHUNK, philox_normal

SIGMA_EPS = 1e-8


def tensor_std(g: torch.Tensor) -> torch.Tensor:
    """Unbiased std in float64; 0 for tensors of fewer than two elements."""
    if g.numel() < 2:
        return torch.zeros((), dtype=torch.float64, device=g.device)
    return g.detach().double().std()


def tensor_sigma(g: torch.Tensor, k: torch.Tensor, noise_std: str,
                 std: torch.Tensor | None = None) -> torch.Tensor:
    """float32 sigma of ``g``'s noise (before the non-finite check); ``std`` (float64, 0-d)
    replaces ``tensor_std(g)`` when given (a shard's sigma is the whole tensor's, gathered
    across ranks)."""
    return _sigma_of_std(tensor_std(g) if std is None else std, k, noise_std)


def _sigma_of_std(std: torch.Tensor, k: torch.Tensor, noise_std: str) -> torch.Tensor:
    std = std.double()
    if noise_std == "scaled":
        std = std * k.double().abs()
    return (std + SIGMA_EPS).float()


def noise_sigma(std: torch.Tensor, k: torch.Tensor, noise_std: str) -> torch.Tensor:
    """The noise scale (before the gate) made of float64 std(s) of any shape: float32
    ``std + 1e-8`` (``noise_std="scaled"``: ``|k| std + 1e-8``), 0 where that is not finite.

    The one place a given std becomes a sigma: the reference's own noisy rescale and every
    backend's ``modulate_sigma_`` (the sigma argument, from ``functional.modulate_(stds=)``)
    take it from here, so all of them agree on sigma bit for bit. Element-wise IEEE float64
    ops, so a ``[T]`` stack gives the bits of T separate 0-d calls."""
    sigma = _sigma_of_std(std, k, noise_std)
    return torch.where(torch.isfinite(sigma), sigma, torch.zeros_like(sigma))


def check_sigma(tensors: Sequence[torch.Tensor], offsets: Sequence[int], sigma) -> None:
    """Metadata checks of ``modulate_sigma_``'s arguments (no device value is read):
    one offset and one float32 sigma per tensor, sigma on the tensors' device."""
    who = "mmmod.modulate_sigma_"
    if len(offsets) != len(tensors):
        raise ValueError(f"{who}: {len(tensors)} tensors but {len(offsets)} offsets")
    if not isinstance(sigma, torch.Tensor):
        raise TypeError(f"{who}: sigma must be a tensor, got {type(sigma).__name__}")
    if sigma.dtype != torch.float32:
        raise TypeError(f"{who}: sigma must be float32 (one noise scale per tensor), got "
                        f"{sigma.dtype}")
    if sigma.dim() != 1 or sigma.shape[0] != len(tensors):
        raise ValueError(f"{who}: sigma must have shape [{len(tensors)}] (one per tensor), got "
                         f"{tuple(sigma.shape)}")
    if tensors and sigma.device != tensors[0].device:
        raise ValueError(f"{who}: sigma is on {sigma.device} but the tensors are on "
                         f"{tensors[0].device}")


@torch.no_grad()
def modulate_bucket_(tensors: Sequence[torch.Tensor], offsets: Sequence[int], k: torch.Tensor,
                     gate: torch.Tensor | None, *, noise: bool, noise_std: str, seed: int, step: int,
                     modality: int, stds: Sequence[torch.Tensor] | None = None) -> None:
    """In-place k * g (+ gate * sigma * n) for the tensors of one modality.

    ``k`` and ``gate`` are 0-d float32 device tensors (``gate`` 0 switches the noise off without
    a host sync); ``offsets[i]`` is tensor i's first flat element in the modality's stream.
    ``stds[i]`` (0-d float64), when given, is the std sigma is made of instead of tensor i's
    own: a shard of a larger tensor takes the whole tensor's (``mmmod.optim.sharding``).
    """
    k = k.float()
    if stds is not None and len(stds) != len(tensors):
        raise ValueError(f"stds must give one std per tensor: {len(tensors)} tensors, "
                         f"{len(stds)} stds")
    for i, (g, off) in enumerate(zip(tensors, offsets)):
        n = g.numel()
        if n == 0:
            continue
        if not noise:
            flat = g.view(-1)
            for s in range(0, n, CHUNK):
                part = flat[s:s + CHUNK]
                part.copy_(part.float() * k)
            continue
        # a non-finite gradient (NaN/inf anywhere in g) gets no noise: NaN stays where it was
        sigma = noise_sigma(tensor_std(g) if stds is None else stds[i], k, noise_std)
        _noisy_rescale_(g, off, k, sigma, gate, seed, step, modality)


@torch.no_grad()
def modulate_sigma_bucket_(tensors: Sequence[torch.Tensor], offsets: Sequence[int],
                           k: torch.Tensor, gate: torch.Tensor | None, sigma: torch.Tensor, *,
                           seed: int, step, modality: int) -> None:
    """In-place k * g + gate * sigma[i] * n for the tensors of one modality, sigma given.

    ``sigma`` is a float32 ``[T]`` tensor on the tensors' device: each tensor's noise scale
    before the gate (``noise_sigma`` of its std); a non-finite entry gets no noise. Same bits
    as :func:`modulate_bucket_` with ``noise=True`` when its statistics would have found the
    stds ``sigma`` was made of: same stream positions, same roundings."""
    check_sigma(tensors, offsets, sigma)
    k = k.float()
    for i, (g, off) in enumerate(zip(tensors, offsets)):
        if g.numel() == 0:
            continue
        s = sigma[i]
        _noisy_rescale_(g, off, k, torch.where(torch.isfinite(s), s, torch.zeros_like(s)), gate,
                        seed, step, modality)


def _noisy_rescale_(g, off, k, sigma, gate, seed, step, modality):
    """g <- float32(k g) + float32(gate sigma n), chunk by chunk (bounded temporaries)."""
    if gate is not None:
        sigma = sigma * gate
    flat = g.view(-1)
    for s in range(0, g.numel(), CHUNK):
        part = flat[s:s + CHUNK]
        z = philox_normal(seed, step, modality, off + s, part.numel(), g.device)
        part.copy_(part.float() * k + sigma * z)


@torch.no_grad()
def modulate_torch_rng_(grads: Sequence[Sequence[torch.Tensor]], coeffs: torch.Tensor, *,
                        noise: bool, noise_std: str) -> None:
    """The official code's arithmetic and random stream (syncs: parity only).

    For each tensor, modality by modality in order: ``g * k + zeros_like(g).normal_(0, std + 1e-8)``
    with ``std = float(g.std())`` of the raw gradient (``"scaled"``: of ``g * k``).
    """
    for m, tensors in enumerate(grads):
        k = float(coeffs[m])
        for g in tensors:
            if g.numel() == 0:
                continue
            if not noise:
                g.mul_(k)
                continue
            src = g * k if noise_std == "scaled" else g
            std = float(src.std()) if g.numel() > 1 else 0.0
            if not math.isfinite(std + SIGMA_EPS):  # non-finite gradient: no noise to spread
                g.mul_(k)
                continue
            z = torch.zeros_like(g).normal_(0, std + SIGMA_EPS)
            g.copy_(g * k + z)
