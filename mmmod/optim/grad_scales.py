"""The optimizer writing each step's coefficients into ``mmmod.fusion.GradScales`` (AGM's
mechanism as its authors apply it: docs/semantics.md section 8).

The hooks act in the backward, so the coefficients must be in the scales before it: with scales
attached, ``observe()`` computes the step's coefficients (the method's state advances there,
once) and writes them on the device; ``step()`` reuses them and does not scale the selected
gradients with them a second time (noise and gradient corrections still apply there).
"""
from __future__ import annotations

import torch


def check(opt, grad_scales, plan):
    """``grad_scales`` if the optimizer (its step ``plan``: method traits, device, closure) can
    drive it, else a ValueError/TypeError naming why."""
    from ..fusion import GradScales  # fusion imports nothing of the optimizer's

    if grad_scales is None:
        return None
    if not isinstance(grad_scales, GradScales):
        raise TypeError(f"grad_scales must be a mmmod.fusion.GradScales, got "
                        f"{type(grad_scales).__name__}")
    scales = grad_scales.scales
    if scales.shape != (len(opt.names),):
        raise ValueError(f"grad_scales holds {scales.shape[0]} scales but the optimizer has "
                         f"{len(opt.names)} modalities {opt.names}")
    if scales.device != plan.device:
        raise ValueError(f"grad_scales lives on {scales.device} but the modalities' parameters on "
                         f"{plan.device}")
    if not (plan.traits.modulates and plan.traits.scales):
        raise ValueError(f"method {opt.method!r} computes no coefficients to write into "
                         f"grad_scales")
    if opt.apply_to != "grad":
        raise ValueError(f"grad_scales scales the backward's gradients: it needs apply_to='grad', "
                         f"got {opt.apply_to!r}")
    if plan.closure_required:
        raise ValueError(f"grad_scales needs the coefficients before the backward; "
                         f"{type(opt.optimizer).__name__} evaluates a closure inside step()")
    return grad_scales


@torch.no_grad()
def write(grad_scales, coefficients: torch.Tensor, modulate: bool) -> None:
    """This step's coefficients into the scales inside the window; ones outside it and on a step
    whose coefficients are not finite (skipped, docs/semantics.md section 4), so a skipped step
    leaves the backward's gradients as they are. On the device, no host read."""
    scales = grad_scales.scales
    if not modulate:
        scales.fill_(1.0)
        return
    k = coefficients.to(scales.device, scales.dtype)
    scales.copy_(torch.where(torch.isfinite(k).all(), k, torch.ones_like(k)))
