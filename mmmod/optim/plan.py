"""The step of a ``ModulatedOptimizer`` as a plan: stages chosen once, run in order.

The optimizer builds a :class:`StepPlan` at construction (and again after unpickling) from its
method's :class:`~mmmod.methods.traits.MethodTraits` and its options; ``step()`` runs it:

1. checks (``step_checks``: everything that can refuse, before the first write)
2. per evaluation of the gradients (once, or once per closure call of an LBFGS-like optimizer):
   corrections that merge objectives (MMPareto's ``combine_``), coefficients, corrections of
   the gradients (InfoReg's proximal pull, ``correct_grads_`` / ``observe_grads_``), the
   shards' whole-tensor stds, modulation -- each stage present only when the method and the
   options need it (:attr:`StepPlan.evaluation`)
3. the update: the inner optimizer's step, or the fused update that modulates inside it
   (``fused=True``), then ``apply_to="update"``'s scaling of the change
4. record: last scores and coefficients, skipped count, history row, step counter.

What a stage hands the next lives in one :class:`Evaluation`, never on the optimizer. Stages
read the optimizer only through its public attributes and its run state
(``opt.run_state``, mmmod/optim/state.py); what is fixed at construction (the method, the fused
update, the kept objectives, the shard plan, the signals) is held here. Inside the window a
non-finite coefficient still means "skip this step's modulation", decided on the device.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from .. import functional
from . import distributed, selection, step_checks, update


def noise_only_coefficients(k: torch.Tensor) -> torch.Tensor:
    """Coefficients that leave the gradients' scale alone and keep the step's skip signal: 1
    where ``k`` is finite, NaN where it is not (the modulation skips a step whose coefficients
    are not all finite). For a step whose scaling happens elsewhere -- in the backward
    (attached grad scales) or on the update (``apply_to="update"``) -- while its noise still
    goes to the gradients. One element-wise op on the device, no host read."""
    return torch.where(torch.isfinite(k), torch.ones_like(k), torch.full_like(k, float("nan")))


class Evaluation:
    """What one evaluation's stages hand each other: the checks' findings, then the step's
    scores and coefficients, the shards' stds and, with the fused update, the coefficients it
    applies (``fused_coeffs``, None: the gradients were modulated here)."""

    __slots__ = ("modulate", "grads", "fused_plan", "pairs", "scores", "coeffs", "stds",
                 "fused_coeffs", "skipped")

    def __init__(self, checked: step_checks.Checked) -> None:
        self.modulate, self.grads = checked.modulate, checked.grads
        self.fused_plan, self.pairs = checked.fused_plan, checked.pairs
        self.scores = self.coeffs = self.stds = self.fused_coeffs = self.skipped = None


class StepPlan:
    """The stages of a step, fixed by the method (its traits) and the optimizer's options."""

    def __init__(self, method: Any, *, fused: Any, objectives: Any, shards: Any, signals: Any,
                 devices: list, closure_required: bool) -> None:
        self.method, self.traits = method, method.traits()
        self.fused, self.objectives, self.shards, self.signals = fused, objectives, shards, signals
        self.devices, self.device = devices, devices[0]
        self.closure_required = closure_required
        t = self.traits
        #: the stages of one evaluation of the gradients, in order (none for a method that
        #: does not modulate: its step only records what was observed)
        self.evaluation: tuple[Callable[[Any, Evaluation], None], ...] = tuple(
            stage for stage, needed in (
                (self.combine_objectives, t.combines_objectives),
                (self.coefficients, True),
                (self.correct_grads, t.corrects_grads),
                (self.shard_stds, t.noise and shards.needs_stds),
                (self.modulate, fused is not None or t.scales or t.noise)) if needed and t.modulates)

    # ---- the step --------------------------------------------------------------------------
    def run(self, opt, closure):
        """Checks and evaluation(s), update, record; returns the closure's loss."""
        done: list = []  # one Evaluation per modulated evaluation (None: no modulation)
        if self.closure_required:
            def evaluate():
                with torch.enable_grad():
                    loss = closure()
                self.read_signal_gradients(opt)
                done.append(self.evaluate(opt))
                return loss
            before = self.snapshot(opt, None)
            loss = opt.optimizer.step(evaluate)
        else:
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            self.read_signal_gradients(opt)
            done.append(self.evaluate(opt))
            before = self.snapshot(opt, done[-1])
            self.update(opt, done[-1])
        last = done[-1] if done else None
        if before is not None and last is not None:
            update.scale_updates(opt.params, before, last.coeffs)
        self.record(opt, done)
        return loss

    def evaluate(self, opt) -> Evaluation | None:
        """Every check of this evaluation, then its stages; None for a method that does not
        modulate. Nothing after the checks refuses."""
        checked = step_checks.run(opt, self)
        if checked is None:
            return None
        ev = Evaluation(checked)
        for stage in self.evaluation:
            stage(opt, ev)
        ev.skipped = (~torch.isfinite(ev.coeffs).all()).to(torch.int64)
        return ev

    # ---- evaluation stages -------------------------------------------------------------------
    def combine_objectives(self, opt, ev: Evaluation) -> None:
        """A correction merging per-objective gradients (MMPareto) into the ``.grad`` tensors."""
        if ev.pairs is not None:
            fused, summed = ev.pairs
            extra = {"shards": self.shards, "kept": self.objectives.kept} \
                if self.traits.whole_tensor_stats and self.shards.located else {}
            self.method.combine_(fused, summed, opt.run_state.method_state, alpha=opt.alpha,
                                 names=opt.names, fused_scale=self.objectives.fused_scale,
                                 backend=opt.requested_backend, **extra)

    def coefficients(self, opt, ev: Evaluation) -> None:
        ev.scores, ev.coeffs = self.step_coefficients(opt)

    def correct_grads(self, opt, ev: Evaluation) -> None:
        """The method's own correction of the gradients (InfoReg's proximal pull); the window
        gates it too: outside it the method only observes them."""
        extra = {"shards": self.shards} if self.traits.whole_tensor_stats and self.shards.located \
            else {}
        fix = self.method.correct_grads_ if ev.modulate else self.method.observe_grads_
        fix(selection.param_tensors(opt.params), ev.grads, opt.run_state.method_state,
            backend=opt.requested_backend, **extra)

    def shard_stds(self, opt, ev: Evaluation) -> None:
        """Sharded tensors' whole-tensor stds: one collective per shard group, every rank."""
        if ev.modulate:
            ev.stds = self.shards.global_stds(ev.grads, opt.backend)

    def modulate(self, opt, ev: Evaluation) -> None:
        """Scale (and noise) the selected gradients inside the window, or hand the
        coefficients to the fused update. With grad scales attached the backward already
        applied k, and with ``apply_to="update"`` the update takes it: the gradients then get
        only the noise (:func:`noise_only_coefficients`)."""
        if not ev.modulate:
            return
        t = self.traits
        hooked = opt.run_state.grad_scales is not None
        if ev.fused_plan is not None:
            ev.fused_coeffs = noise_only_coefficients(ev.coeffs) if hooked else ev.coeffs
            return
        if not ((t.scales and not hooked) or t.noise):  # k = 1 needs no pass
            return
        noise_only = opt.apply_to == "update" or hooked
        if noise_only and not t.noise:
            return
        step_t = opt.run_state.step_t
        functional.modulate_(
            ev.grads, noise_only_coefficients(ev.coeffs) if noise_only else ev.coeffs,
            noise=t.noise, noise_std=opt.noise_std, noise_rng=opt.noise_rng, seed=opt.seed,
            step=opt.step_count if step_t is None else step_t, backend=opt.requested_backend,
            offsets=self.shards.offsets, names=opt.names, tensor_names=opt.param_names,
            stds=ev.stds, _prechecked=True)

    # ---- update ------------------------------------------------------------------------------
    def snapshot(self, opt, ev: Evaluation | None):
        """``apply_to="update"``: the parameters before the inner step (the fused update scales
        the update itself)."""
        if ev is not None and ev.fused_coeffs is not None:
            return None
        t = self.traits
        if opt.apply_to == "update" and t.modulates and t.scales and opt.in_window():
            return update.snapshot(opt.params)
        return None

    def update(self, opt, ev: Evaluation | None) -> None:
        if ev is None or ev.fused_coeffs is None:
            opt.optimizer.step()
            return
        self.fused.step(ev.grads, ev.fused_coeffs, noise=self.traits.noise,
                        noise_std=opt.noise_std, seed=opt.seed, step=opt.step_count,
                        offsets=self.shards.offsets, backend=opt.requested_backend,
                        apply_to=opt.apply_to, stds=ev.stds, plan=ev.fused_plan)

    # ---- record ------------------------------------------------------------------------------
    def record(self, opt, done: list) -> None:
        """This step's values are final here: last scores, coefficients, skipped count, the
        history row; then the counter advances and the pending scores go, whatever happens."""
        run = opt.run_state
        last = done[-1] if done else None
        s = k = bad = None
        if last is not None and last.scores is not None:
            s, k, bad = last.scores, last.coeffs, torch.stack([e.skipped for e in done]).amax()
            run.scores, run.coeffs = s, k
            run.skipped = bad if run.skipped is None else run.skipped + bad
        elif not self.traits.modulates and run.score_sum is not None:
            s = run.score_sum  # a baseline run still records what it observed, k = 1
            k = torch.ones_like(s, dtype=torch.float32)
        try:  # a failing logger is warned about by the recorder; the bookkeeping always completes
            if run.recorder is not None and s is not None:
                run.recorder.record(s, k, bad, self.record_extras(opt), step=opt.step_count,
                                    epoch=opt.epoch,
                                    samples=run.samples * distributed.world(opt.process_group),
                                    modulated=self.traits.modulates and opt.in_window())
        finally:
            opt.step_count += 1
            if run.step_t is not None:
                run.step_t.add_(1)  # on the device: a captured graph advances it at each replay
            run.clear_pending()  # the early coefficients (grad scales) too
            self.objectives.clear()
            if self.signals is not None:
                self.signals.reset()

    def record_extras(self, opt):
        """The row's extra columns: the method's log values and the opted-in signals."""
        run = opt.run_state
        extra = self.method.log_values(run.method_state) or {}
        if self.signals is not None:
            extra = {**extra, **self.signals.values(opt.process_group, run.aux_sum, run.samples)}
        return extra or None

    # ---- shared with observe() -----------------------------------------------------------------
    def step_coefficients(self, opt):
        """(scores, coefficients) of this step: made once, in observe() with grad scales."""
        run = opt.run_state
        if run.early is not None:
            return run.early
        s, per_sample = distributed.global_scores(
            run.score_sum, run.samples, self.traits.mean_scores, opt.process_group,
            len(opt.names), self.device)
        k = functional.coefficients(per_sample, opt.method, opt.alpha, opt.beta_max,
                                    backend=opt.requested_backend, state=run.method_state)
        return s, k

    def read_signal_gradients(self, opt) -> None:
        if self.signals is not None and opt.run_state.recorder is not None:
            self.signals.read_gradients()  # before the modulation changes them
