"""``ModulatedOptimizer``: wrap any torch optimizer and modulate each modality's gradients.

Per step: ``zero_grad()`` (also drops the scores gathered so far), forward, ``observe(logits,
labels)`` (any number of times), backward, ``step()``: coefficients -> modulation -> inner step.
The wrapper owns no parameters: ``param_groups`` and ``state`` are the inner optimizer's live
objects. Argument checks live in ``config``, parameter selection in ``selection``, data-parallel
agreement in ``distributed``, ``apply_to="update"`` in ``update``, checkpoints in ``checkpoint``.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Mapping, Sequence

import torch

from .. import backends, functional
from ..monitor.history import Recorder
from . import checkpoint, config, distributed, grad_scales, selection, sharding, update
from . import fused as fused_update


class ModulatedOptimizer(checkpoint.Checkpointing, torch.optim.Optimizer):
    """Modulate the selected gradients of each modality, then run the inner optimizer.

    ``modalities``: ordered mapping (dict or ``nn.ModuleDict``) of str/int name -> module,
    parameter(s) or ``ParamSlice``; the order fixes the modality index. ``method``: a name in
    ``mmmod.methods`` (defaults for ``alpha`` and ``param_filter`` come from it). Inner
    optimizers whose ``step`` requires a closure (``LBFGS``) get one that modulates each
    evaluation they make. Every argument is validated here; see README "API" and
    docs/semantics.md for the semantics, and ``checkpoint`` for the load policy.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, modalities: Mapping, method: str = "ogm_ge",
                 *, alpha: float | None = None, beta_max: float = 2.0, modulation_starts: int = 0,
                 modulation_ends: int | None = None, noise_std: str = "raw",
                 noise_rng: str = "philox", param_filter: str | Callable | None = None,
                 apply_to: str = "grad", backend: str = "auto", seed: int = 0,
                 process_group: Any = None, strict: bool = False, capturable: bool = False,
                 history: int = 0, fused: bool = False) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, ModulatedOptimizer):
            raise TypeError("optimizer is already a ModulatedOptimizer")
        self._method = m = config.method(method)
        self.method = m.name
        self.alpha, self.beta_max = m.check_hyperparameters(
            m.default_alpha if alpha is None else alpha, beta_max)
        self.modulation_starts, self.modulation_ends = config.window(modulation_starts, modulation_ends)
        self.capturable = config.flag("capturable", capturable)
        self.strict = config.flag("strict", strict)
        self.noise_std, self.noise_rng = config.noise_options(noise_std, noise_rng, self.capturable)
        self.apply_to = config.choice("apply_to", apply_to, config.APPLY_TO)
        self.backend = config.choice("backend", backend, backends.BACKENDS)
        seed = config.seed(seed)
        items = config.modalities(modalities)
        self.param_filter, keep = config.param_filter(param_filter, m)
        self.optimizer = optimizer
        self.names = [n for n, _ in items]
        optimized = {id(p) for g in optimizer.param_groups for p in g["params"]}
        self.params, self.param_names = selection.select(items, keep, self.param_filter, optimized)
        # sharded parameters (FSDP2): refusals, and each shard's place in the noise stream
        self._shards = sharding.plan(self.names, self.params, self.param_names, m,
                                     self.noise_rng)
        devices = selection.devices(self.params)
        resolved = config.resolve_backends(self.backend, devices, self.capturable)
        self._closure_required = config.closure_required(optimizer)
        self._offsets = self._shards.offsets  # registration-order stream offsets (local parts)
        self.process_group = process_group
        self.seed = distributed.agree(process_group, seed, resolved)  # one collective, once
        self.epoch, self.step_count = 0, 0
        self._epoch_hooked = None  # the last epoch whose on_epoch ran
        self._step_t = torch.zeros((), dtype=torch.int64, device=devices[0]) if capturable else None
        self._method_state = m.init_state(len(self.names), devices[0])
        self._device = devices[0]
        self._score_sum, self._observed, self._samples = None, 0, 0
        self._scores = self._coeffs = self._skipped = None  # _skipped: device counter
        # attach_grad_scales: the scales observe() writes, and the (scores, coefficients) it made
        self._grad_scales = self._early = None
        # per-step history (mmmod.monitor): off (None) unless history > 0 or a logger is added
        history = config.integer("history", history, minimum=0)
        self._recorder = Recorder(self.names, history, device=self._device) if history else None
        self.defaults = optimizer.defaults  # torch.optim.Optimizer bookkeeping, no params
        for kind in ("step_pre", "step_post", "state_dict_pre", "state_dict_post",
                     "load_state_dict_pre", "load_state_dict_post"):
            setattr(self, f"_optimizer_{kind}_hooks", OrderedDict())
        self._warned_capturable_if_run_uncaptured = True
        # ---- fused=True (mmmod/optim/fused.py): modulation inside the inner update ----------
        self.fused = config.flag("fused", fused)
        self._fused, self._fused_pending = None, None
        if self.fused:
            if self.capturable or self._closure_required or self.noise_rng != "philox":
                raise ValueError("fused=True needs capturable=False, noise_rng='philox' and an "
                                 "inner optimizer whose step takes no closure")
            self._fused = fused_update.FusedUpdate(optimizer, self.params, self.param_names,
                                                   self.names)
        self._patch_step_function()

    # ---- the inner optimizer's live state ---------------------------------------------------
    param_groups = property(lambda self: self.optimizer.param_groups,
                            lambda self, v: setattr(self.optimizer, "param_groups", v))
    state = property(lambda self: self.optimizer.state,
                     lambda self, v: setattr(self.optimizer, "state", v))

    def add_param_group(self, param_group: dict) -> None:
        self.optimizer.add_param_group(param_group)

    def __repr__(self) -> str:
        return (f"ModulatedOptimizer(method={self.method!r}, alpha={self.alpha}, "
                f"modalities={self.names}, apply_to={self.apply_to!r}, "
                f"backend={self.backend!r},\n  {self.optimizer!r})")

    # ---- public API ------------------------------------------------------------------------
    def set_epoch(self, epoch: int, **inputs: Any) -> None:
        """Set the epoch the modulation window is checked against; ``inputs`` go to the
        method's ``on_epoch`` (e.g. per-modality validation accuracies)."""
        epoch = config.integer("epoch", epoch)
        # the method's per-epoch work (MSLR's history, InfoReg's snapshot and traces) runs once
        # per epoch: calling set_epoch again with the same epoch (e.g. every step) only sets
        # the epoch the window is checked against
        if epoch != self._epoch_hooked:
            if self._method.needs_params:
                inputs["params"] = selection.param_tensors(self.params)
            self._method.on_epoch(self._method_state, epoch, names=self.names, **inputs)
            self._epoch_hooked = epoch
        self.epoch = epoch

    def in_window(self) -> bool:
        return self.modulation_starts <= self.epoch and (
            self.modulation_ends is None or self.epoch <= self.modulation_ends)

    def attach_grad_scales(self, scales) -> None:
        """Write each step's coefficients into ``scales`` (a ``mmmod.fusion.GradScales`` the
        model fuses its modalities' contributions with) in ``observe()``, before the backward its
        hooks act in, instead of scaling the selected gradients in ``step()``; ``None`` detaches.
        One ``observe()`` per step then (docs/semantics.md section 8)."""
        self._grad_scales = grad_scales.check(self, scales)
        self._early = None

    @torch.no_grad()
    def observe(self, logits: Mapping | Sequence[torch.Tensor], labels: torch.Tensor) -> None:
        """Accumulate the scores of one (micro-)batch from each modality's logits [B, C]."""
        if self._early is not None:
            raise RuntimeError("observe() called twice in one step with grad scales attached: "
                               "the first call already fixed this step's coefficients")
        zs = config.ordered_logits(logits, self.names)
        functional.check_logits(zs, labels, self.names)
        # with several ranks a raise on one would leave the others waiting in step()'s
        # collective: a bad label makes the scores NaN and every rank skips the step instead
        if (labels.device.type == "cpu" and self._world() == 1) or self.strict:
            functional.check_labels_in_range(zs, labels, self.names)
        if self.strict:
            for n, z in zip(self.names, zs):
                if not bool(torch.isfinite(z).all()):
                    raise ValueError(f"logits of modality {n!r} contain NaN or inf")
        if self._method.score == "prob":  # the fused scores of every backend
            s = backends.get(self.backend, labels.device).scores(zs, labels)
        else:
            s = self._method.batch_scores(zs, labels)
        self._score_sum = s if self._score_sum is None else self._score_sum + s
        self._observed += 1
        self._samples += labels.shape[0]  # host metadata: the divisor of a "mean" reduction
        if self._grad_scales is not None:  # the hooks act in the coming backward: k now
            self._early = self._step_coefficients()
            grad_scales.write(self._grad_scales, self._early[1], self.in_window())

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the inner optimizer's gradients and drop the scores gathered for them."""
        self.optimizer.zero_grad(set_to_none=set_to_none)
        self._score_sum, self._observed, self._samples = None, 0, 0
        self._early = None

    def step(self, closure: Callable[[], Any] | None = None):
        """Coefficients, modulation (inside the window), inner step. With an inner optimizer
        that requires a closure, each of its evaluations is modulated."""
        if self._closure_required and closure is None:
            raise TypeError(f"{type(self.optimizer).__name__}.step() requires a closure: call "
                            f"step(closure), the closure calling zero_grad(), observe() and "
                            f"backward()")
        outcome: list = []  # (scores, coefficients, skipped flag) of each modulated evaluation
        if self._closure_required:
            def evaluate():
                with torch.enable_grad():
                    loss = closure()
                outcome.append(self._modulate_gradients())
                return loss
            before = self._snapshot()
            loss = self.optimizer.step(evaluate)
        else:
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            outcome.append(self._modulate_gradients())
            before = self._snapshot()
            if self._fused_pending is not None:  # fused=True: modulation inside the update
                grads, k, stds = self._fused_pending
                self._fused_pending = None
                self._fused.step(grads, k, noise=self._method.noise, noise_std=self.noise_std,
                                 seed=self.seed, step=self.step_count, offsets=self._offsets,
                                 backend=self.backend, apply_to=self.apply_to, stds=stds)
            else:
                self.optimizer.step()
        last = outcome[-1] if outcome else None
        if before is not None and last is not None:
            update.scale_updates(self.params, before, last[1])
        # ---- this step's values are final here: scores, coefficients, skipped flag ----------
        s = k = bad = None
        if last is not None and last[0] is not None:
            s, k, bad = last[0], last[1], torch.stack([o[2] for o in outcome]).amax()
            self._scores, self._coeffs = s, k
            self._skipped = bad if self._skipped is None else self._skipped + bad
        elif not self._method.modulates and self._score_sum is not None:
            s = self._score_sum  # a baseline run still records what it observed, k = 1
            k = torch.ones_like(s, dtype=torch.float32)
        if self._recorder is not None and s is not None:
            self._recorder.record(s, k, bad, self._method.log_values(self._method_state) or None,
                                  step=self.step_count, epoch=self.epoch,
                                  samples=self._samples * self._world(),
                                  modulated=self._method.modulates and self.in_window())
        self.step_count += 1
        if self._step_t is not None:
            self._step_t.add_(1)  # on the device: a captured graph advances it at each replay
        self._score_sum, self._observed, self._samples = None, 0, 0
        self._early = None
        return loss

    @property
    def scores(self) -> dict:
        """Last step's summed scores per modality (global batch under data parallelism)."""
        return {} if self._scores is None else dict(zip(self.names, self._scores.unbind()))

    @property
    def coefficients(self) -> dict:
        """Last step's coefficients per modality (computed also outside the window)."""
        return {} if self._coeffs is None else dict(zip(self.names, self._coeffs.unbind()))

    # ---- history and logging (mmmod.monitor) -------------------------------------------------
    def history(self, format: str = "tensors"):
        """The recorded steps (the last ``history`` of them): a dict of CPU tensors (one host
        read), or ``format="rows"`` for a list of dicts. See docs/logging.md."""
        if self._recorder is None:
            raise RuntimeError("history is off: construct the optimizer with history=N (the "
                               "number of steps to keep) or add a logger")
        return self._recorder.history(format)

    def add_logger(self, logger, every: int = 100):
        """Send every recorded row to ``logger.write(rows)`` (``mmmod.monitor.CSVLogger``,
        ``TensorBoardLogger``, ...), one host read per ``every`` steps. Returns a handle whose
        ``remove()`` flushes and detaches it."""
        return self._ensure_recorder().add_logger(logger, every)

    def register_log_hook(self, fn: Callable, every: int = 100):
        """Call ``fn(rows)`` with the rows of the last ``every`` steps (plain floats), every
        ``every`` steps: one line to feed wandb, Lightning or any logger."""
        return self._ensure_recorder().register_log_hook(fn, every)

    def flush_logs(self) -> None:
        """Deliver the rows not yet sent to the loggers (e.g. at the end of training)."""
        if self._recorder is not None:
            self._recorder.flush()

    @property
    def recorder(self) -> Recorder | None:
        """The :class:`mmmod.monitor.Recorder` of this optimizer, or ``None`` when off."""
        return self._recorder

    def _ensure_recorder(self) -> Recorder:
        if self._recorder is None:
            self._recorder = Recorder(self.names, 0, device=self._device)
        return self._recorder

    @property
    def sharded_state(self) -> bool:
        """Whether ``state_dict()["mmmod"]`` differs between ranks: a method that keeps a copy
        of the parameters (InfoReg's snapshot) holds this rank's shards of sharded (FSDP2)
        parameters. Save it per rank then (docs/distributed.md); otherwise it is replicated."""
        return self._method.needs_params and any(
            selection.sharded_kind(selection.param_of(e)) for ps in self.params for e in ps)

    @property
    def device_step(self) -> torch.Tensor | None:
        """The capturable noise counter (0-d int64 on the parameters' device), else ``None``."""
        return self._step_t

    @property
    def skipped_steps(self) -> int:
        """Steps whose modulation was skipped for non-finite scores (reading it syncs)."""
        return 0 if self._skipped is None else int(self._skipped)

    def _world(self) -> int:
        return distributed.world(self.process_group)

    # ---- the step's parts --------------------------------------------------------------------
    def _modulate_gradients(self):
        """Validate every selected gradient, then compute this evaluation's coefficients,
        apply the method's gradient correction and modulate (inside the window): (scores,
        coefficients, skipped flag), or Nones for a method that does not modulate."""
        m = self._method
        if not m.modulates:
            return None, None, None
        if self._observed == 0 and m.needs_scores:
            raise RuntimeError("step() called without observe(): give the per-modality logits "
                               "of this step's batch to observe() before step() (zero_grad() "
                               "clears them)")
        modulate = self.in_window()
        grads = None
        if modulate or m.corrects_grads:  # everything that can fail, before any state changes
            grads = [[selection.grad_of(e) for e in ps] for ps in self.params]
            functional.check_grads(grads, self.names, self.param_names)
        s, k = self._step_coefficients()
        if m.corrects_grads:
            # a method reading whole-tensor statistics gets the located shards (FSDP2)
            extra = {"shards": self._shards} if m.whole_tensor_stats and self._shards.located \
                else {}
            # the window gates the correction too; outside it the method only observes
            fix = m.correct_grads_ if modulate else m.observe_grads_
            fix(selection.param_tensors(self.params), grads, self._method_state,
                backend=self.backend, **extra)
        # shards' whole-tensor stds: one collective per shard group, every rank
        stds = self._shards.global_stds(grads) if modulate and m.noise and \
            self._shards.needs_stds else None
        # attached grad scales applied k in the backward: here k = 1 (NaN kept: skip)
        hooked = self._grad_scales is not None
        if modulate and self._fused is not None:
            self._fused_pending = (grads, k * 0 + 1 if hooked else k, stds)  # fused update
        elif modulate and ((m.scales and not hooked) or m.noise):  # k = 1 needs no pass
            noise_only = self.apply_to == "update" or hooked  # k went elsewhere, noise to grads
            if not noise_only or m.noise:
                functional.modulate_(
                    grads, k * 0 + 1 if noise_only else k, noise=m.noise,
                    noise_std=self.noise_std, noise_rng=self.noise_rng, seed=self.seed,
                    step=self.step_count if self._step_t is None else self._step_t,
                    backend=self.backend, offsets=self._offsets, names=self.names,
                    tensor_names=self.param_names, stds=stds,
                    _prechecked=True)  # k*0+1 keeps NaN (skip)
        return s, k, (~torch.isfinite(k).all()).to(torch.int64)

    def _step_coefficients(self):
        """(scores, coefficients) of this step: made once, in observe() with grad scales."""
        if self._early is not None:
            return self._early
        m = self._method
        s, per_sample = distributed.global_scores(
            self._score_sum, self._samples, m.score_reduction == "mean", self.process_group,
            len(self.names), self._device)
        k = functional.coefficients(per_sample, self.method, self.alpha, self.beta_max,
                                    backend=self.backend, state=self._method_state)
        return s, k

    def _snapshot(self):
        if self._fused_pending is not None:
            return None  # the fused update scales the update itself
        if self.apply_to == "update" and self._method.modulates and self._method.scales \
                and self.in_window():
            return update.snapshot(self.params)
        return None
