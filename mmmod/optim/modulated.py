"""``ModulatedOptimizer``: wrap any torch optimizer and modulate each modality's gradients.

Per step: ``zero_grad()`` (also drops the scores whose backward already ran), forward,
``observe(logits, labels)`` (any number of times), backward, ``step()``: the step plan's stages
(``plan``: checks, coefficients, corrections, modulation, update, record). Run state lives in a
holder shared with framework proxies (``state``).
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
from ..monitor.signals import Signals, check as check_signals
from . import (checkpoint, config, distributed, grad_scales, objectives, proxies, selection, sharding)
from . import state as run_state
from . import fused as fused_update
from . import plan as step_plan


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
                 history: int = 0, fused: bool = False, signals=()) -> None:
        self._run = run_state.RunState()  # first: the attributes below it are shared properties
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, ModulatedOptimizer):
            raise TypeError("optimizer is already a ModulatedOptimizer")
        self._method = m = config.method(method)
        traits = m.traits()  # the flags the step's parts read (mmmod/methods/traits.py)
        self.method = m.name
        self.alpha, self.beta_max = m.check_hyperparameters(
            m.default_alpha if alpha is None else alpha, beta_max)
        self.modulation_starts, self.modulation_ends = config.window(modulation_starts, modulation_ends)
        self.capturable = config.flag("capturable", capturable)
        self.strict = config.flag("strict", strict)
        self.noise_std, self.noise_rng = config.noise_options(noise_std, noise_rng, self.capturable)
        self.apply_to = config.choice("apply_to", apply_to, config.APPLY_TO)
        self.requested_backend = config.choice("backend", backend, backends.BACKENDS)
        seed = config.seed(seed)
        items = config.modalities(modalities)
        self.param_filter, keep = config.param_filter(param_filter, m)
        self.optimizer = optimizer
        self.names = [n for n, _ in items]
        optimized = {id(p) for g in optimizer.param_groups for p in g["params"]}
        self.params, self.param_names = selection.select(items, keep, self.param_filter, optimized)
        # sharded parameters (FSDP2): refusals, and each shard's place in the noise stream
        self._shards = sharding.plan(self.names, self.params, self.param_names, traits,
                                     self.noise_rng)
        # opt.backward(losses): per-objective gradients for a method that combines them
        self._objectives = objectives.ObjectiveGradients(self.names, self.params,
                                                         self.param_names, traits)
        devices = selection.devices(self.params)
        resolved = config.resolve_backends(self.requested_backend, devices, self.capturable)
        self.backend = "+".join(dict.fromkeys(resolved))  # what runs ("auto" resolved)
        self._closure_required = config.closure_required(optimizer)
        self.process_group = process_group
        self.seed = distributed.agree(process_group, seed, resolved)  # one collective, once
        self._devices = devices
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
        # imbalance signals added to the recorded rows (mmmod.monitor.signals), opt-in
        self.signals = check_signals(signals)
        self._signals = Signals(self.signals, self.names, [
            [e for _, e in selection.expand(n, src)] for n, src in items],
            self._device) if self.signals else None
        self.defaults = optimizer.defaults  # torch.optim.Optimizer bookkeeping, no params
        for kind in ("step_pre", "step_post", "state_dict_pre", "state_dict_post",
                     "load_state_dict_pre", "load_state_dict_post"):
            setattr(self, f"_optimizer_{kind}_hooks", OrderedDict())
        self._warned_capturable_if_run_uncaptured = True
        # ---- fused=True (mmmod/optim/fused.py): modulation inside the inner update ----------
        self.fused = config.flag("fused", fused)
        self._fused = None
        if self.fused:
            if self.capturable or self._closure_required or self.noise_rng != "philox":
                raise ValueError("fused=True needs capturable=False, noise_rng='philox' and an "
                                 "inner optimizer whose step takes no closure")
            self._fused = fused_update.FusedUpdate(optimizer, self.params, self.param_names,
                                                   self.names)
        self._build_plan()
        self._patch_step_function()

    def _build_plan(self) -> None:
        """The step's stages, fixed by the method and the options (mmmod/optim/plan.py): made at
        construction and after unpickling (a plan is never pickled)."""
        self._plan = step_plan.StepPlan(
            self._method, fused=self._fused, objectives=self._objectives, shards=self._shards,
            signals=self._signals, devices=self._devices, closure_required=self._closure_required)

    # ---- run state: one holder that framework proxies share (mmmod/optim/state.py) ----------
    epoch, step_count, seed = (run_state.shared(f) for f in ("epoch", "step_count", "seed"))
    alpha, beta_max = run_state.shared("alpha"), run_state.shared("beta_max")
    modulation_starts = run_state.shared("modulation_starts")
    modulation_ends = run_state.shared("modulation_ends")
    _epoch_hooked = run_state.shared("epoch_hooked")
    _score_sum, _observed, _samples = (run_state.shared(f) for f in ("score_sum", "observed", "samples"))
    _scores, _coeffs, _skipped = (run_state.shared(f) for f in ("scores", "coeffs", "skipped"))
    _recorder = run_state.shared("recorder")
    _grad_scales, _early = run_state.shared("grad_scales"), run_state.shared("early")
    _method_state, _step_t = run_state.shared("method_state"), run_state.shared("step_t")
    # (defined after the lines above, whose class-body name run_state is the module)
    run_state = property(lambda self: self._run, doc="This run's state holder (a "
                         "mmmod.optim.state.RunState): position, method state, pending and last "
                         "scores; checkpoints save its to_dict().")
    method_object = property(lambda self: self._method, doc="The registered Method instance "
                             "this optimizer runs (``method`` is its name).")

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
                f"backend={self.backend!r} (requested {self.requested_backend!r}),\n  {self.optimizer!r})")

    # ---- public API ------------------------------------------------------------------------
    def set_epoch(self, epoch: int, **inputs: Any) -> None:
        """Set the epoch the modulation window is checked against; ``inputs`` go to the
        method's ``on_epoch`` (e.g. per-modality validation accuracies)."""
        epoch = config.integer("epoch", epoch)
        config.epoch_not_before(self._epoch_hooked, epoch)
        # the method's per-epoch work (MSLR's history, InfoReg's snapshot and traces) runs once
        # per epoch: calling set_epoch again with the same epoch (e.g. every step) only sets
        # the epoch the window is checked against
        if epoch != self._epoch_hooked:
            if (inputs or self._plan.traits.epoch_inputs) and self._world() > 1:
                # every rank must feed the method the same values (docs/distributed.md)
                inputs = distributed.agree_epoch_inputs(self.process_group, epoch, inputs,
                                                        self.names)
            if self._plan.traits.needs_params:
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
        self._grad_scales = grad_scales.check(self, scales, self._plan)
        self._early = None

    def observe(self, logits: Mapping | Sequence[torch.Tensor], labels: torch.Tensor) -> None:
        """Accumulate the scores of one (micro-)batch from each modality's logits [B, C].

        Called with gradient recording off (``torch.no_grad()`` / ``inference_mode``: an
        evaluation pass) it records nothing, so evaluation batches never reach a training
        step. See ``zero_grad`` for which pending scores a step uses."""
        if not torch.is_grad_enabled():
            return
        with torch.no_grad():
            self._observe(logits, labels)

    def _observe(self, logits, labels) -> None:
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
        if self._plan.traits.prob_scores:  # the fused scores of every backend
            s = backends.get(self.requested_backend, labels.device).scores(zs, labels)
        else:
            s = self._method.batch_scores(zs, labels)
        # labels.shape[0]: host metadata, the divisor of a "mean" reduction; the unimodal hits
        # of the accuracy signal follow the scores' pending rule (state.py)
        hits = self._signals.hits(zs, labels) if self._signals is not None else None
        self._run.add_scores(s, labels.shape[0], run_state.grad_marks(self.params), aux=hits)
        if self._grad_scales is not None:  # the hooks act in the coming backward: k now
            self._early = self._plan.step_coefficients(self)
            grad_scales.write(self._grad_scales, self._early[1], self.in_window())

    def backward(self, losses: Mapping[Any, torch.Tensor], *, scaler: Any = None,
                 retain_graph: bool = False) -> None:
        """Backpropagate several objectives: ``losses`` maps each modality name to its
        unimodal loss and one more key (e.g. ``"multimodal"``) to the fused loss. Every
        ``.grad`` receives the summed loss's gradient; a method that combines per-objective
        gradients (``mmpareto``) also gets each selected tensor's fused-objective gradient
        (two backward passes in all). ``scaler``: a ``GradScaler`` that scales the losses here
        (then step with ``scaler.step(opt)``). Any number of calls per step (accumulation).
        See docs/multi_objective.md."""
        real = proxies.unwrap(self)
        real._objectives.backward(losses, real._device, scaler=scaler,
                                  retain_graph=config.flag("retain_graph", retain_graph),
                                  others=[p for g in real.optimizer.param_groups for p in g["params"]])

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the inner optimizer's gradients and drop the scores whose backward already
        ran; scores observed after the last backward are kept for the coming one, so both
        ``zero_grad, forward, observe, backward, step`` and Lightning's ``forward, observe,
        zero_grad, backward, step`` score this step's batches (mmmod/optim/state.py). The
        fused-objective gradients kept by ``backward`` are dropped with the gradients, and
        coefficients fixed early (grad scales) with their scores."""
        real = proxies.unwrap(self)  # a framework proxy's self.optimizer is not the inner one
        real._run.drop_backed(run_state.grad_marks(real.params))
        real.optimizer.zero_grad(set_to_none=set_to_none)
        real._run.mark = run_state.grad_marks(real.params)
        real._objectives.clear()

    def drop_scores(self) -> None:
        """Forget every score observed since the last step (e.g. after a step that a
        ``GradScaler`` skipped, or scores observed outside training)."""
        self._run.clear_pending()

    # torch.compile(opt.step) runs the step eagerly: a compiled graph would drop the Python
    # state the step changes (step counter, scores, history), see docs/distributed.md
    @torch._disable_dynamo  # (lazy: imports dynamo at the first call, as torch.optim does)
    def step(self, closure: Callable[[], Any] | None = None):
        """Run the step plan (``plan``): checks, coefficients, corrections, modulation (inside
        the window), update, record. With an inner optimizer that requires a closure, each of
        its evaluations is modulated. Every check runs before the first write to a gradient,
        parameter or method state (``step_checks``): a refused step changes nothing and does
        not count."""
        if self._closure_required and closure is None:
            raise TypeError(f"{type(self.optimizer).__name__}.step() requires a closure: call "
                            f"step(closure), the closure calling zero_grad(), observe() and "
                            f"backward()")
        return self._plan.run(self, closure)

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
        return self._plan.traits.needs_params and any(
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
