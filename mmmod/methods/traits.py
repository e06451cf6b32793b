"""What the optimizer's step plan needs to know about a method, as one frozen value.

A :class:`~mmmod.methods.base.Method` declares its behaviour with class attributes (``noise``,
``scales``, ``corrects_grads``, ...), the public subclassing API. The optimizer reads them once,
when it builds its step plan, through :class:`MethodTraits`: the stages then consult one small
immutable description instead of the method object's scattered attributes, and the plan is
fixed for the optimizer's lifetime (a flag changed on a registered instance afterwards does not
reach an optimizer already built with it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class MethodTraits:
    """The method flags the step reads, grouped by the stage that reads them."""

    name: str
    # scores (observe): the fused probability scores, or the method's batch_scores
    prob_scores: bool          # score == "prob"
    mean_scores: bool          # score_reduction == "mean": the rule receives per-sample means
    needs_scores: bool         # step() refuses a step nobody observed
    # coefficients and corrections
    modulates: bool            # False: the method only records scores (``"none"``)
    scales: bool               # the coefficients multiply the selected gradients
    noise: bool                # OGM-GE's Gaussian noise joins the modulation
    corrects_grads: bool       # correct_grads_ / observe_grads_ run every step
    combines_objectives: bool  # combine_ merges per-objective gradients (opt.backward)
    # sharded parameters and per-epoch work
    shard_safe: bool
    whole_tensor_stats: bool
    needs_params: bool         # on_epoch receives the selected parameters
    epoch_inputs: tuple

    @classmethod
    def of(cls, method: Any) -> "MethodTraits":
        """The traits a method object declares now (its class attributes or overrides)."""
        return cls(name=method.name, prob_scores=method.score == "prob",
                   mean_scores=method.score_reduction == "mean",
                   needs_scores=bool(method.needs_scores), modulates=bool(method.modulates),
                   scales=bool(method.scales), noise=bool(method.noise),
                   corrects_grads=bool(method.corrects_grads),
                   combines_objectives=bool(method.combines_objectives),
                   shard_safe=bool(method.shard_safe),
                   whole_tensor_stats=bool(method.whole_tensor_stats),
                   needs_params=bool(method.needs_params),
                   epoch_inputs=tuple(method.epoch_inputs))
