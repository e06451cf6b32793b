"""Plain-torch definition of the per-objective gradient combine (docs/semantics.md section 11).

Shaped like the future fused op: one call per modality bucket, given per tensor the fused
objective's gradient ``fused[i]`` (``g_mm``) and the summed gradient ``summed[i]`` (``g_sum``,
the tensor's ``.grad``, overwritten); the unimodal gradient is ``b = g_sum - g_mm``, formed per
element in float64 (exact for float32 and narrower inputs). Three steps, all on the tensors'
device, no host sync:

1. :func:`pair_moments`: per tensor, float64 ``|a|^2``, ``|b|^2`` and ``a . b`` (exact float64
   products summed in float64) from one read of each pair;
2. :func:`min_norm_weights` / :func:`mmpareto_factors`: the modality's sums (tensors added in
   registration order), the sign rule and two-vector min-norm weights, and each tensor's
   factors ``(c_fused, c_summed)``;
3. :func:`combine_`: one write, ``g_sum <- c_fused g_mm + c_summed g_sum`` per tensor.

The op ``combine_`` takes every modality at once: ``groups`` gives each modality's number of
consecutive tensors, and steps 2 and 3 run per modality (:func:`weights_and_combine_`).

Bytes of the op this defines (the byte model's entry): per element two reads of the pair
(``g_mm`` and ``g_sum``: the reduction pass and the write pass) and one write of ``g_sum``,
20 B per fp32 element; plus O(tensors) float64 scalars. This reference itself goes through
float64 temporaries (it is the definition, not the fast path).

This module imports nothing from mmmod.
"""
from __future__ import annotations

from typing import Sequence

import torch

#: the code's weights when the gradients' cosine is positive (``MMPareto.py`` lines 165-172)
EQUAL_WEIGHT = 0.5
#: the solver's clamped weights (``min_norm_solvers.py`` lines 17-26)
CLAMP_HIGH, CLAMP_LOW = 0.999, 0.001


_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_pair_inputs(op: str, fused, summed, fused_scale=None) -> None:
    """The metadata checks of ``_pair_moments`` and ``combine_`` (every kernel makes them
    before anything is read or written): one fused gradient per summed one, each pair of one
    shape, one floating dtype (float32/16, bfloat16, float64) and one device; ``fused_scale``
    a one-element float64 tensor on that device."""
    if len(fused) != len(summed):
        raise ValueError(f"{op}: {len(fused)} fused gradients for {len(summed)} summed ones")
    device = summed[0].device if len(summed) else None
    for i, (a, s) in enumerate(zip(fused, summed)):
        if a.shape != s.shape:
            raise ValueError(f"{op}: tensor {i}: fused gradient {tuple(a.shape)} vs "
                             f"summed gradient {tuple(s.shape)}")
        if a.dtype != s.dtype or s.dtype not in _FLOATS:
            raise TypeError(f"{op}: tensor {i}: fused gradient {a.dtype}, summed gradient "
                            f"{s.dtype}; expected one dtype among float32, float16, bfloat16, "
                            f"float64")
        if a.device != device or s.device != device:
            raise ValueError(f"{op}: tensor {i}: fused gradient on {a.device}, summed gradient "
                             f"on {s.device}; expected one device ({device})")
    if fused_scale is not None:
        if fused_scale.numel() != 1 or fused_scale.dtype != torch.float64:
            raise TypeError(f"{op}: fused_scale must be a one-element float64 tensor, got "
                            f"{fused_scale.dtype} {tuple(fused_scale.shape)}")
        if device is not None and fused_scale.device != device:
            raise ValueError(f"{op}: fused_scale is on {fused_scale.device}, the gradients on "
                             f"{device}")


def check_moments(op: str, summed, moments) -> None:
    """The combine's moments: float64 ``[n, 3]`` on the gradients' device."""
    n = len(summed)
    if moments.dtype != torch.float64:
        raise TypeError(f"{op}: moments must be float64, got {moments.dtype}")
    if moments.dim() != 2 or moments.shape[0] != n or moments.shape[1] != 3:
        raise ValueError(f"{op}: moments must have shape [{n}, 3] (one (|a|^2, |b|^2, a.b) row "
                         f"per tensor), got {tuple(moments.shape)}")
    if n and moments.device != summed[0].device:
        raise ValueError(f"{op}: moments are on {moments.device}, the gradients on "
                         f"{summed[0].device}")


def check_groups(op: str, summed, groups) -> None:
    """``groups``: the number of tensors of each modality, in order, each at least one, adding
    up to the number of tensors."""
    groups = list(groups)
    if not groups or any(int(g) < 1 for g in groups):
        raise ValueError(f"{op}: groups must list each modality's number of tensors (each at "
                         f"least 1), got {groups}")
    if sum(groups) != len(summed):
        raise ValueError(f"{op}: groups {groups} add up to {sum(groups)} tensors, the gradients "
                         f"are {len(summed)}")


def _pair64(a: torch.Tensor, s: torch.Tensor, scale: torch.Tensor | None):
    a64 = a.detach().reshape(-1).double()
    if scale is not None:
        a64 = a64 * scale.reshape(())
    return a64, s.detach().reshape(-1).double() - a64


@torch.no_grad()
def pair_moments(fused: Sequence[torch.Tensor], summed: Sequence[torch.Tensor],
                 fused_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Float64 ``[n, 3]``: per tensor ``(|a|^2, |b|^2, a . b)`` with ``a = fused_scale * g_mm``
    and ``b = g_sum - a``. ``fused_scale`` (0-d float64, optional) brings ``g_mm`` to the units
    of ``g_sum`` (a GradScaler's inverse scale, a power of two: exact)."""
    if len(fused) != len(summed):
        raise ValueError(f"pair_moments: {len(fused)} fused gradients for {len(summed)} summed ones")
    rows = []
    for i, (a, s) in enumerate(zip(fused, summed)):
        if a.shape != s.shape:
            raise ValueError(f"pair_moments: tensor {i}: fused gradient {tuple(a.shape)} vs "
                             f"summed gradient {tuple(s.shape)}")
        a64, b64 = _pair64(a, s, fused_scale)
        rows.append(torch.stack([a64.dot(a64), b64.dot(b64), a64.dot(b64)]))
    if not rows:
        return torch.zeros(0, 3, dtype=torch.float64)
    return torch.stack(rows)


def ordered_sum(moments: torch.Tensor) -> torch.Tensor:
    """The modality's ``(aa, bb, ab)``: the rows added in registration order, from 0."""
    total = torch.zeros(moments.shape[1:], dtype=moments.dtype, device=moments.device)
    for row in moments:
        total = total + row
    return total


def min_norm_weights(aa: torch.Tensor, bb: torch.Tensor, ab: torch.Tensor) -> torch.Tensor:
    """``(w_a, w_b)`` minimising ``|w_a a + w_b b|`` with ``w_a + w_b = 1``, ``w >= 0``, as
    ``MinNormSolver._min_norm_element_from2`` has it (clamped to 0.999 / 0.001 at the ends)."""
    inner = (bb - ab) / (aa + bb - 2 * ab)  # only read where ab < aa and ab < bb: denominator > 0
    c = torch.where(ab >= aa, torch.full_like(aa, CLAMP_HIGH),
                    torch.where(ab >= bb, torch.full_like(aa, CLAMP_LOW), inner))
    return torch.stack([c, 1 - c])


def mmpareto_weights(total: torch.Tensor) -> torch.Tensor:
    """The modality's ``(w_mm, w_m)`` from its ``(aa, bb, ab)``: 1/2 each when the cosine is
    positive (``ab > 0``), else the min-norm weights."""
    aa, bb, ab = total.unbind()
    w = min_norm_weights(aa, bb, ab)
    return torch.where(ab > 0, torch.full_like(w, EQUAL_WEIGHT), w)


def mmpareto_factors(moments: torch.Tensor, weights: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per tensor ``(c_fused, c_summed)`` [n, 2] float64 such that
    ``c_fused a + c_summed g_sum = d 2 (w_mm a + w_m b)``, with ``d = gamma max(1, |g_sum| /
    |new|)`` from the tensor's moments (``|new| = 0``: ``d = gamma``)."""
    w_mm, w_m = weights.unbind()
    aa, bb, ab = moments.unbind(-1)
    new2 = (4 * (w_mm * w_mm * aa + w_m * w_m * bb + 2 * w_mm * w_m * ab)).clamp_min(0)
    sum2 = aa + bb + 2 * ab
    grow = (sum2 > new2) & (new2 > 0)
    d = torch.where(grow, (sum2 / torch.where(grow, new2, torch.ones_like(new2))).sqrt(),
                    torch.ones_like(new2)) * gamma
    return torch.stack([2 * d * (w_mm - w_m), 2 * d * w_m], dim=-1)


@torch.no_grad()
def combine_(fused: Sequence[torch.Tensor], summed: Sequence[torch.Tensor],
             factors: torch.Tensor, fused_scale: torch.Tensor | None = None) -> None:
    """``g_sum <- c_fused (fused_scale g_mm) + c_summed g_sum`` per tensor, in float32 (float64
    for float64 gradients), cast to the gradient's dtype: the one write."""
    for i, (a, s) in enumerate(zip(fused, summed)):
        work = torch.float64 if s.dtype == torch.float64 else torch.float32
        ca, cs = factors[i, 0], factors[i, 1]
        if fused_scale is not None:
            ca = ca * fused_scale.reshape(())
        out = a.detach().to(work) * ca.to(work) + s.detach().to(work) * cs.to(work)
        s.copy_(out.to(s.dtype))


def grouped_factors(moments: torch.Tensor, groups: Sequence[int], gamma: float
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per modality (its ``groups[m]`` consecutive rows) its weights and its tensors' factors:
    ``([len(groups), 2], [T, 2])`` float64, on the moments' device."""
    weights, factors, start = [], [], 0
    for n in groups:
        rows = moments[start:start + int(n)]
        weights.append(mmpareto_weights(ordered_sum(rows)))
        factors.append(mmpareto_factors(rows, weights[-1], gamma))
        start += int(n)
    return torch.stack(weights), torch.cat(factors)


@torch.no_grad()
def weights_and_combine_(fused: Sequence[torch.Tensor], summed: Sequence[torch.Tensor],
                         moments: torch.Tensor, gamma: float,
                         fused_scale: torch.Tensor | None = None,
                         groups: Sequence[int] | None = None) -> torch.Tensor:
    """Steps 2 and 3 from the moments (this rank's, or summed over shards): per modality (its
    ``groups[m]`` consecutive tensors; one modality of every tensor when ``groups`` is None)
    the weights, each tensor's factors and the write; returns ``(w_mm, w_m)`` per modality,
    float64 ``[len(groups), 2]`` (``[2]`` without ``groups``)."""
    weights, factors = grouped_factors(moments, [len(summed)] if groups is None else groups,
                                       gamma)
    combine_(fused, summed, factors, fused_scale)
    return weights[0] if groups is None else weights


@torch.no_grad()
def mmpareto_combine_(fused: Sequence[torch.Tensor], summed: Sequence[torch.Tensor],
                      gamma: float, fused_scale: torch.Tensor | None = None) -> torch.Tensor:
    """One modality's MMPareto combine (section 11): writes the combined gradients into
    ``summed`` and returns the modality's weights ``(w_mm, w_m)`` (float64 [2])."""
    if not summed:
        raise ValueError("mmpareto_combine_: a modality bucket with no tensor")
    moments = pair_moments(fused, summed, fused_scale)
    weights = mmpareto_weights(ordered_sum(moments))
    combine_(fused, summed, mmpareto_factors(moments, weights, gamma), fused_scale)
    return weights
