"""Every check of a ``ModulatedOptimizer`` step, run before its first write.

A step writes method state (AGM's running means, InfoReg's beta and Fisher), gradients
(InfoReg's correction, the modulation) and parameters (the inner update). A refusal after
the first of those writes would leave the step half applied, and a retry would count it twice;
so everything that can refuse -- scores observed, the gradients, the backends and their
environment, the fused update's group options and buckets -- is checked here, in stages, and
nothing after them refuses. Each stage is a module-level function (the atomicity test makes
each one fail in turn). They read the optimizer's public attributes and the step plan's
fixed parts (``plan``: the method's traits, devices, fused update, kept objectives).
"""
from __future__ import annotations

from typing import NamedTuple

from .. import backends, functional
from . import config, selection
from . import fused as fused_update


class Checked(NamedTuple):
    modulate: bool        # inside the modulation window
    grads: list | None    # the selected gradients, checked (None: not needed this step)
    fused_plan: list | None  # the fused update's plan, or None: modulate, then the inner step
    pairs: tuple | None   # (fused, summed) per-objective gradients of a combining method, or None


def observed(opt, plan) -> None:
    if opt.run_state.observed == 0 and plan.traits.needs_scores:
        raise RuntimeError(
            "step() called without observe(): give the per-modality logits of this step's "
            "batch to observe() before step() (zero_grad() drops the scores whose backward "
            "already ran; observe() under torch.no_grad() records nothing). In a training "
            "framework, call observe() on mmmod.unwrap(optimizer) (a proxy may not forward "
            "it) or use mmmod.integrations (Lightning callback, Trainer callback): see "
            "docs/integrations.md")


def gradients(opt, plan, modulate: bool) -> list | None:
    if not (modulate or plan.traits.corrects_grads):
        return None
    grads = [[selection.grad_of(e) for e in ps] for ps in opt.params]
    functional.check_grads(grads, opt.names, opt.param_names)
    return grads


def environment(opt, plan) -> None:
    """The backend of every parameter device resolves, and the CPU extension's environment
    variables (read at each of its op calls) are valid."""
    for device in plan.devices:
        if backends.get(opt.requested_backend, device).name == "cpu":
            config.cpu_environment()


def fused_plan(opt, plan, grads, modulate: bool) -> list | None:
    """The fused update's plan (group options, buckets, kernels), or None when this step runs
    unfused: outside the window, or when a step pre-hook must see the modulated gradients."""
    if plan.fused is None or not modulate or fused_update.has_step_pre_hooks(opt.optimizer):
        return None
    return plan.fused.plan(grads, opt.requested_backend)


def objectives(opt, plan, grads, modulate: bool) -> tuple | None:
    """A method combining per-objective gradients: the (fused, summed) pairs kept by
    ``opt.backward`` (refused when the step's gradients came from a plain backward)."""
    if not (modulate and plan.traits.combines_objectives):
        return None
    return plan.objectives.pairs(grads, opt.process_group, id(opt))


def run(opt, plan) -> Checked | None:
    """All stages in order: what the step needs, or None for a method that does not modulate."""
    if not plan.traits.modulates:
        return None
    observed(opt, plan)
    modulate = opt.in_window()
    grads = gradients(opt, plan, modulate)
    environment(opt, plan)
    fused = fused_plan(opt, plan, grads, modulate)
    return Checked(modulate, grads, fused, objectives(opt, plan, grads, modulate))


STAGES = ("observed", "gradients", "environment", "fused_plan", "objectives")
