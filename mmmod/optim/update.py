"""``apply_to="update"``: scale the inner optimizer's change of each modality's parameters
by that modality's coefficient, p <- p0 + k (p - p0), instead of the gradient."""
from __future__ import annotations

import torch

from .selection import local_param_of


@torch.no_grad()
def snapshot(params) -> list[list[torch.Tensor]]:
    """A copy of every selected parameter before the inner step (one copy per step; of the
    local shard for a sharded parameter: the update is scaled element-wise)."""
    return [[local_param_of(e).clone() for e in ps] for ps in params]


@torch.no_grad()
def scale_updates(params, before, coeffs: torch.Tensor) -> None:
    """p <- p0 + k_m (p - p0) for modality m's parameters; k = 1 (no change) when the step's
    coefficients are not finite (a skipped step), decided on the device."""
    k = coeffs.float()
    k = torch.where(torch.isfinite(k).all(), k, torch.ones_like(k))
    for m, (ps, p0) in enumerate(zip(params, before)):
        by_device: dict[torch.device, tuple[list, list]] = {}
        for e, q in zip(ps, p0):
            p = local_param_of(e)
            a, b = by_device.setdefault(p.device, ([], []))
            a.append(p)
            b.append(q)
        for device, (cur, old) in by_device.items():
            torch._foreach_sub_(cur, old)
            torch._foreach_mul_(cur, k[m].to(device))
            torch._foreach_add_(cur, old)
