"""Coefficient rules (docs/semantics.md section 3), evaluated on the device with no host sync."""
from __future__ import annotations

import torch

from .native_rules import METHODS, NativeRule, rule_of

__all__ = ["METHODS", "coefficients", "ogm_coefficients", "mlb_coefficients"]


def _others_mean(s: torch.Tensor) -> torch.Tensor:
    """mean_{j != m} s_j for every m, summing the others in index order (exact for M = 2)."""
    m = s.shape[0]
    rows = [sum(s[j] for j in range(m) if j != i) for i in range(m)]
    return torch.stack(rows) / (m - 1)


@torch.no_grad()
def ogm_coefficients(s: torch.Tensor, alpha: float) -> torch.Tensor:
    """OGM / OGM-GE: damp the modality (or modalities) leading the others.

    M = 2 is the official rule exactly: rho_1 = s_1 / s_0, rho_0 = 1 / rho_1; if rho_1 > 1 damp
    modality 1, else (ties included) damp modality 0. M > 2 is the one-to-others rule
    rho_m = s_m / mean_{j != m} s_j, damped where rho_m > 1.
    """
    s = s.float()
    one = torch.ones((), dtype=s.dtype, device=s.device)
    if s.shape[0] == 2:
        rho1 = s[1] / s[0]
        rho0 = one / rho1
        first_leads = rho1 > 1
        k1 = torch.where(first_leads, 1 - torch.tanh(alpha * rho1), one)
        k0 = torch.where(first_leads, one, 1 - torch.tanh(alpha * rho0))
        k = torch.stack((k0, k1))
    else:
        rho = s / _others_mean(s)
        k = torch.where(rho > 1, 1 - torch.tanh(alpha * rho), one)
    # a NaN score (bad label, non-finite logits, empty batch) must surface as NaN, not as 1
    return torch.where(torch.isnan(s).any(), torch.full_like(k, float("nan")), k)


@torch.no_grad()
def mlb_coefficients(s: torch.Tensor, alpha: float, beta_max: float) -> torch.Tensor:
    """MLB: r_m = mean_{j != m} s_j / s_m; k_m = 1 + (beta_m - 1) tanh(alpha (r_m - 1))."""
    s = s.float()
    r = _others_mean(s) / s
    beta = torch.where(r > 1, torch.full_like(r, float(beta_max)), torch.full_like(r, 2.0))
    k = 1 + (beta - 1) * torch.tanh(alpha * (r - 1))
    return torch.where(torch.isnan(s).any(), torch.full_like(k, float("nan")), k)


def coefficients(s: torch.Tensor, method: str | int, alpha: float, beta_max: float = 2.0) -> torch.Tensor:
    """k [M] by a native rule: a method name (``"ogm_ge"``), a :class:`NativeRule` or its code."""
    rule = rule_of(method)
    if s.dim() != 1 or s.shape[0] < 2:
        raise ValueError(f"scores must be a 1-D tensor of M >= 2 modalities, got shape {tuple(s.shape)}")
    if rule is NativeRule.OGM:
        return ogm_coefficients(s, alpha)
    if rule is NativeRule.MLB:
        return mlb_coefficients(s, alpha, beta_max)
    return torch.ones_like(s, dtype=torch.float32)  # NativeRule.NONE
