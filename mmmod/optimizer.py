"""``ModulatedOptimizer``: wrap any torch optimizer and modulate each modality's gradients.

Per training step::

    opt.zero_grad()                      # also clears the scores gathered so far
    out = model(batch)
    opt.observe({"audio": z_a, "visual": z_v}, labels)   # any number of times (accumulation)
    loss.backward()
    opt.step()                           # coefficients -> modulate gradients -> inner step

The wrapper owns no parameters: ``param_groups`` and ``state`` are the inner optimizer's live
objects, so LR schedulers, ``GradScaler`` and checkpointing act on the real thing.
"""
from __future__ import annotations

import sys
from collections import OrderedDict
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.distributed as dist

from . import backends, filters, functional
from .slices import ParamSlice

METHODS = ("ogm", "ogm_ge", "mlb", "none")
APPLY_TO = ("grad", "update")
_HYPER = ("method", "alpha", "beta_max", "modulation_starts", "modulation_ends", "noise_std",
          "noise_rng", "apply_to")


class ModulatedOptimizer(torch.optim.Optimizer):
    """Modulate the selected gradients of each modality, then run the inner optimizer.

    Args:
        optimizer: any ``torch.optim.Optimizer`` holding (at least) every modulated parameter.
        modalities: ordered mapping ``name -> nn.Module | iterable of parameters``; the order
            fixes the modality index (0 = audio, 1 = visual in the papers' code).
        method: ``"ogm"``, ``"ogm_ge"`` (OGM + Gaussian noise), ``"mlb"`` or ``"none"``.
        alpha: coefficient strength; default 0.1 for OGM/OGM-GE (the official README default;
            the paper uses 0.8 on CREMA-D) and 0.5 for MLB (its CREMA-D setting).
        beta_max: MLB's upper bound on the coefficient of a lagging modality (default 2).
        modulation_starts, modulation_ends: inclusive 0-based epoch window (``set_epoch``) in
            which gradients are modulated; scores and coefficients are computed every step.
            Defaults 0 and ``None`` (no end; the official script stops after epoch 50).
        noise_std: ``"raw"`` (sigma from the gradient before scaling, the published OGM-GE) or
            ``"scaled"`` (after scaling, the first public version).
        noise_rng: ``"philox"`` (counter-based, identical on every backend and rank) or
            ``"torch"`` (consumes torch's generator exactly as the official code; syncs).
        param_filter: which tensors of a modality are modulated: ``"conv"`` (4-D, official
            OGM-GE), ``"matrix"`` (2+ dims), ``"all"`` or ``callable(name, param) -> bool``.
            Default: ``"conv"`` for OGM/OGM-GE, ``"all"`` for MLB.
        apply_to: ``"grad"`` (scale the gradient, as the papers do) or ``"update"`` (scale the
            change the inner optimizer makes, a per-modality learning rate that survives Adam's
            normalisation; costs one copy of the selected parameters per step).
        backend: ``"auto"``, ``"torch"``, ``"triton"``, ``"cpu"`` or ``"cuda"``.
        seed: Philox key; under ``torch.distributed`` rank 0's seed is broadcast once.
        process_group: group whose ranks share one global batch (default: the default group
            when ``torch.distributed`` is initialised, else none).
        capturable: keep the noise counter (the optimizer step) in a 0-d int64 tensor on the
            parameters' device and advance it there, so ``observe`` + ``step`` captured in a
            CUDA graph draw fresh noise at every replay (as ``torch.optim.Adam(capturable=True)``
            keeps its step on the device). ``backend="auto"`` then uses Triton rather than the
            CUDA extension on GPUs. Replays do not advance the Python-side ``step_count``;
            :attr:`device_step` is the counter.
        strict: raise on out-of-range labels and non-finite logits even when that needs a host
            sync (labels on an accelerator). Otherwise such a step is skipped on the device and
            counted in :attr:`skipped_steps`; CPU labels are always range-checked eagerly.

    Non-finite values are never spread by the modulation:

    - NaN in a modality's logits, a label outside ``[0, C)``, or ``+inf`` at the true class make
      that score NaN; then every coefficient is NaN, the step's modulation is skipped on the
      device (gradients bit-for-bit untouched, no noise), counted in :attr:`skipped_steps`, and
      the inner step still runs. ``+-inf`` at another class is the softmax limit (probability 0
      for that sample, no skip). ``strict=True`` raises on any non-finite logit instead.
    - NaN/inf in a selected gradient tensor: its std is not finite, so that tensor gets
      ``k * g`` without noise; each non-finite element stays where it was, no other is touched.
    - ``torch.amp.GradScaler``: ``scaler.step`` unscales before calling :meth:`step`, so the
      modulation sees true gradients; a step the scaler skips (inf/NaN found) never reaches
      :meth:`step`: ``step_count`` (the noise counter) does not advance and the step's scores are
      dropped by the next :meth:`zero_grad` of this wrapper (call it, not only the model's).

    Data parallel (DDP): the M score sums are all-reduced over ``process_group`` (one small
    collective, no host sync on NCCL), so every rank gets the global batch's coefficients; with
    the seed agreed at construction and sigma taken from the already-averaged gradients, the
    replicas stay bit-identical. See ``docs/distributed.md``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer,
                 modalities: Mapping[str, torch.nn.Module | Iterable[torch.Tensor]],
                 method: str = "ogm_ge", *, alpha: float | None = None, beta_max: float = 2.0,
                 modulation_starts: int = 0, modulation_ends: int | None = None,
                 noise_std: str = "raw", noise_rng: str = "philox",
                 param_filter: str | Callable | None = None, apply_to: str = "grad",
                 backend: str = "auto", seed: int = 0, process_group: Any = None,
                 strict: bool = False, capturable: bool = False) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, ModulatedOptimizer):
            raise TypeError("optimizer is already a ModulatedOptimizer")
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
        if apply_to not in APPLY_TO:
            raise ValueError(f"apply_to must be one of {APPLY_TO}, got {apply_to!r}")
        if noise_std not in functional.NOISE_STD:
            raise ValueError(f"noise_std must be one of {functional.NOISE_STD}, got {noise_std!r}")
        if noise_rng not in functional.NOISE_RNG:
            raise ValueError(f"noise_rng must be one of {functional.NOISE_RNG}, got {noise_rng!r}")
        if capturable and noise_rng == "torch":
            raise ValueError("capturable=True needs noise_rng='philox': the 'torch' noise mode "
                             "reads each gradient's std on the host (parity only)")
        if backend not in backends.BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; expected one of {backends.BACKENDS}")
        if not isinstance(modalities, Mapping) or len(modalities) < 2:
            raise ValueError("modalities must be an ordered mapping of at least two "
                             "name -> module/parameters entries")
        if modulation_ends is not None and modulation_ends < modulation_starts:
            raise ValueError(f"modulation_ends ({modulation_ends}) < modulation_starts "
                             f"({modulation_starts})")
        self.optimizer = optimizer
        self.method = method
        self.alpha = functional.DEFAULT_ALPHA[method] if alpha is None else float(alpha)
        self.beta_max = float(beta_max)
        self.modulation_starts = int(modulation_starts)
        self.modulation_ends = None if modulation_ends is None else int(modulation_ends)
        self.noise_std = noise_std
        self.noise_rng = noise_rng
        self.apply_to = apply_to
        self.backend = backend
        self.strict = bool(strict)
        self.param_filter = filters.DEFAULT_FILTER[method] if param_filter is None else param_filter
        self.names = [str(n) for n in modalities]
        self.params, self.param_names = self._select(modalities, filters.resolve(self.param_filter))
        self._offsets = [functional.stream_offsets(ps) for ps in self.params]
        if method == "ogm_ge":
            self._refuse_sharded()
        self.process_group = process_group
        self.seed = self._agree_seed(int(seed))
        self.epoch = 0
        self.step_count = 0
        self.capturable = bool(capturable)
        self._step_t: torch.Tensor | None = None
        if self.capturable:
            dev = next((_param_of(e).device for ps in self.params for e in ps), None)
            self._step_t = torch.zeros((), dtype=torch.int64, device=dev)
        self._score_sum: torch.Tensor | None = None
        self._observed = 0
        self._scores: torch.Tensor | None = None
        self._coeffs: torch.Tensor | None = None
        self._skipped: torch.Tensor | None = None  # device counter, read only on request
        # torch.optim.Optimizer bookkeeping (hooks, profiling), without re-registering params
        self.defaults = optimizer.defaults
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._warned_capturable_if_run_uncaptured = True
        self._patch_step_function()

    # ---- the inner optimizer's live state -------------------------------------------------
    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value):
        self.optimizer.param_groups = value

    @property
    def state(self):
        return self.optimizer.state

    @state.setter
    def state(self, value):
        self.optimizer.state = value

    def add_param_group(self, param_group: dict) -> None:
        self.optimizer.add_param_group(param_group)

    def __repr__(self) -> str:
        return (f"ModulatedOptimizer(method={self.method!r}, alpha={self.alpha}, "
                f"modalities={self.names}, apply_to={self.apply_to!r}, "
                f"backend={self.backend!r},\n  {self.optimizer!r})")

    # ---- set-up ------------------------------------------------------------------------
    def _select(self, modalities, keep):
        optimized = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
        owner: dict[int, tuple[str, Any]] = {}  # id(param) -> (modality, entry)
        params, names = [], []
        for name, src in modalities.items():
            named = _expand(name, src)
            chosen, chosen_names, seen = [], [], set()
            for pname, e in named:
                p = e.param if isinstance(e, ParamSlice) else e
                if not isinstance(p, torch.Tensor):
                    raise TypeError(f"modality {name!r}: entry {pname!r} is a {type(e).__name__}, "
                                    f"not a parameter")
                explicit = isinstance(e, ParamSlice)  # slices are chosen by hand: no filter
                if id(e) in seen or not (explicit or keep(pname, p)):
                    continue
                seen.add(id(e))
                prev = owner.get(id(p))
                if prev is not None and not (explicit and isinstance(prev[1], ParamSlice)
                                             and not prev[1].overlaps(e)):
                    raise ValueError(f"parameter {pname!r} of modality {name!r} also belongs to "
                                     f"modality {prev[0]!r}; a parameter may be modulated "
                                     f"by one modality only")
                if id(p) not in optimized:
                    raise ValueError(f"parameter {pname!r} of modality {name!r} is not in the "
                                     f"inner optimizer's param_groups, so it would never be "
                                     f"updated")
                owner[id(p)] = (name, e)
                chosen.append(e)
                chosen_names.append(pname)
            if not chosen:
                raise ValueError(f"modality {name!r}: param_filter {self.param_filter!r} "
                                 f"selects no parameter tensor (of {len(named)})")
            params.append(chosen)
            names.append(chosen_names)
        return params, names

    def _group(self):
        if self.process_group is not None:
            return self.process_group
        if dist.is_available() and dist.is_initialized():
            return dist.group.WORLD
        return None

    def _refuse_sharded(self) -> None:
        """OGM-GE on sharded parameters (FSDP) would take sigma and the noise offsets from each
        rank's shard, not the whole tensor: refuse rather than silently change the method."""
        for name, ps, pnames in zip(self.names, self.params, self.param_names):
            for e, pname in zip(ps, pnames):
                kind = _sharded_kind(e.param if isinstance(e, ParamSlice) else e)
                if kind:
                    raise ValueError(
                        f"parameter {pname!r} of modality {name!r} is {kind}: OGM-GE's per-tensor "
                        f"sigma and noise need the whole tensor on every rank, which sharded "
                        f"parameters do not have. Use method='ogm' or 'mlb' (exact under "
                        f"sharding), or DDP for OGM-GE")

    def _world(self) -> int:
        group = self._group()
        return 1 if group is None else dist.get_world_size(group)

    def _agree_seed(self, seed: int) -> int:
        """Every rank must draw the same noise: take rank 0's seed (once, at construction)."""
        if self._world() == 1:
            return seed
        group = self._group()
        dev = _collective_device(group)
        t = torch.tensor([seed], dtype=torch.int64, device=dev)
        dist.broadcast(t, src=dist.get_global_rank(group, 0), group=group)
        return int(t.item())

    # ---- public API --------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Set the epoch that the modulation window is checked against."""
        self.epoch = int(epoch)

    def in_window(self) -> bool:
        return self.modulation_starts <= self.epoch and (
            self.modulation_ends is None or self.epoch <= self.modulation_ends)

    @torch.no_grad()
    def observe(self, logits: Mapping[str, torch.Tensor] | Sequence[torch.Tensor],
                labels: torch.Tensor) -> None:
        """Accumulate the scores of one (micro-)batch from each modality's logits [B, C]."""
        if isinstance(logits, Mapping):
            unknown = [n for n in logits if n not in self.names]
            if unknown:
                raise KeyError(f"observe() got logits for unknown modality {unknown[0]!r}; "
                               f"modalities are {self.names}")
            missing = [n for n in self.names if n not in logits]
            if missing:
                raise KeyError(f"observe() is missing logits for modality {missing[0]!r}")
            zs = [logits[n] for n in self.names]
        else:
            zs = list(logits)
            if len(zs) != len(self.names):
                raise ValueError(f"observe() got {len(zs)} logits for {len(self.names)} "
                                 f"modalities {self.names}")
        functional.check_logits(zs, labels, self.names)
        if labels.device.type == "cpu" or self.strict:
            functional.check_labels_in_range(zs, labels, self.names)
        if self.strict:
            for n, z in zip(self.names, zs):
                if not bool(torch.isfinite(z).all()):
                    raise ValueError(f"logits of modality {n!r} contain NaN or inf")
        s = backends.get(self.backend, labels.device).scores(zs, labels)
        self._score_sum = s if self._score_sum is None else self._score_sum + s
        self._observed += 1

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the inner optimizer's gradients and drop the scores gathered for them."""
        self.optimizer.zero_grad(set_to_none=set_to_none)
        self._score_sum = None
        self._observed = 0

    def step(self, closure: Callable[[], Any] | None = None):
        """Compute the coefficients, modulate the gradients (inside the window), step."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.method != "none":
            if self._observed == 0:
                raise RuntimeError("step() called without observe(): give the per-modality "
                                   "logits of this step's batch to observe() before step() "
                                   "(zero_grad() clears them)")
            self._coefficients_for_step()
        modulate = self.method != "none" and self.in_window()
        grads = self._grads() if modulate else None
        if modulate and self.apply_to == "grad":
            self._modulate(grads, self._coeffs, self.method == "ogm_ge")
        elif modulate:
            if self.method == "ogm_ge":  # noise still goes to the gradient; k goes to the update
                self._modulate(grads, self._coeffs * 0 + 1, True)  # NaN (skip) survives
            before = [[_param_of(e).clone() for e in ps] for ps in self.params]
        self.optimizer.step()
        if modulate and self.apply_to == "update":
            self._scale_updates(before)
        self.step_count += 1
        if self._step_t is not None:
            self._step_t.add_(1)  # on the device: a captured graph advances it at each replay
        self._score_sum = None
        self._observed = 0
        return loss

    @property
    def scores(self) -> dict[str, torch.Tensor]:
        """Last step's summed scores per modality (global batch under data parallelism)."""
        return {} if self._scores is None else dict(zip(self.names, self._scores.unbind()))

    @property
    def coefficients(self) -> dict[str, torch.Tensor]:
        """Last step's coefficients per modality (computed also outside the window)."""
        return {} if self._coeffs is None else dict(zip(self.names, self._coeffs.unbind()))

    @property
    def device_step(self) -> torch.Tensor | None:
        """The capturable noise counter (0-d int64 on the parameters' device), else ``None``."""
        return self._step_t

    @property
    def skipped_steps(self) -> int:
        """Steps whose modulation was skipped for non-finite scores (reading it syncs)."""
        return 0 if self._skipped is None else int(self._skipped)

    # ---- the step's parts ----------------------------------------------------------------
    def _coefficients_for_step(self) -> None:
        s = self._score_sum
        if self._world() > 1:
            s = s.clone()
            # one small collective; on NCCL wait() only makes the current stream wait for it
            # (no host sync), on gloo it blocks until the M sums have arrived
            dist.all_reduce(s, group=self._group(), async_op=True).wait()
        k = backends.get(self.backend, s.device).coefficients(s, self.method, self.alpha,
                                                              self.beta_max)
        bad = (~torch.isfinite(k).all()).to(torch.int64)
        self._skipped = bad if self._skipped is None else self._skipped + bad
        self._scores, self._coeffs = s, k

    def _grads(self) -> list[list[torch.Tensor | None]]:
        """Every selected gradient, validated before anything is modified."""
        out = []
        for name, ps, pnames in zip(self.names, self.params, self.param_names):
            gs = []
            for e, pname in zip(ps, pnames):
                g = _grad_of(e)
                if g is not None and (g.is_sparse or g.layout != torch.strided):
                    raise ValueError(f"parameter {pname!r} of modality {name!r} has a sparse "
                                     f"gradient; mmmod modulates dense gradients only")
                gs.append(g)
            out.append(gs)
        return out

    def _modulate(self, grads, coeffs, noise: bool) -> None:
        functional.modulate_(grads, coeffs, noise=noise, noise_std=self.noise_std,
                             noise_rng=self.noise_rng, seed=self.seed,
                             step=self.step_count if self._step_t is None else self._step_t,
                             backend=self.backend, offsets=self._offsets, names=self.names)

    @torch.no_grad()
    def _scale_updates(self, before) -> None:
        """p <- p0 + k (p - p0): the inner step's change scaled by k (1 where skipped)."""
        k = self._coeffs.float()
        k = torch.where(torch.isfinite(k).all(), k, torch.ones_like(k))
        for m, (ps, p0) in enumerate(zip(self.params, before)):
            by_device: dict[torch.device, tuple[list, list]] = {}
            for e, q in zip(ps, p0):
                p = _param_of(e)
                a, b = by_device.setdefault(p.device, ([], []))
                a.append(p)
                b.append(q)
            for device, (cur, old) in by_device.items():
                torch._foreach_sub_(cur, old)
                torch._foreach_mul_(cur, k[m].to(device))
                torch._foreach_add_(cur, old)

    # ---- checkpointing -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        sd = self.optimizer.state_dict()
        sd["mmmod"] = {
            # the device counter is the truth under capture (replays do not run Python);
            # reading it here syncs once per checkpoint, never per step
            "step_count": self.step_count if self._step_t is None else int(self._step_t),
            "seed": self.seed, "epoch": self.epoch,
            "modalities": list(self.names),
            "hyper": {h: getattr(self, h) for h in _HYPER},
            "skipped_steps": self._skipped.clone() if self._skipped is not None else None,
            "scores": None if self._scores is None else self._scores.clone(),
            "coefficients": None if self._coeffs is None else self._coeffs.clone(),
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        sd = dict(state_dict)
        own = sd.pop("mmmod", None)
        if own is None:
            raise KeyError("state_dict has no 'mmmod' entry: it was not saved by a "
                           "ModulatedOptimizer (load it into the inner optimizer instead)")
        if list(own["modalities"]) != self.names:
            raise ValueError(f"state_dict was saved for modalities {own['modalities']}, "
                             f"this optimizer has {self.names}")
        self.optimizer.load_state_dict(sd)
        self.step_count = int(own["step_count"])
        if self._step_t is not None:
            self._step_t.fill_(self.step_count)
        self.seed = int(own["seed"])
        self.epoch = int(own["epoch"])
        for h, v in own["hyper"].items():
            setattr(self, h, v)
        self._skipped = own.get("skipped_steps")
        self._scores = own.get("scores")
        self._coeffs = own.get("coefficients")


def _expand(name: str, src) -> list[tuple[str, Any]]:
    """(name, tensor or ParamSlice) entries of one modality, modules expanded."""
    if isinstance(src, torch.nn.Module):
        return list(src.named_parameters())
    if isinstance(src, (torch.Tensor, ParamSlice)):
        src = [src]
    out = []
    for i, e in enumerate(src):
        if isinstance(e, torch.nn.Module):
            out += [(f"{name}[{i}].{n}", p) for n, p in e.named_parameters()]
        elif isinstance(e, ParamSlice):
            out.append((f"{name}[{i}][{e.start}:{e.stop} along dim {e.dim}]", e))
        else:
            out.append((f"{name}[{i}]", e))
    return out


def _sharded_kind(p: torch.Tensor) -> str:
    """'' for an ordinary tensor, else what kind of sharded parameter it is. Looks only at
    modules already imported: a DTensor or FlatParameter cannot exist before its module is."""
    dt = sys.modules.get("torch.distributed.tensor")
    if dt is not None and isinstance(p, getattr(dt, "DTensor", ())):
        return "a DTensor (FSDP2 / tensor parallel)"
    fp = sys.modules.get("torch.distributed.fsdp._flat_param")
    if fp is not None and isinstance(p, getattr(fp, "FlatParameter", ())):
        return "an FSDP FlatParameter"
    return ""


def _param_of(e) -> torch.Tensor:
    """The (detached) tensor a selected entry updates in place."""
    return e.view(e.param.detach()) if isinstance(e, ParamSlice) else e.detach()


def _grad_of(e) -> torch.Tensor | None:
    if isinstance(e, ParamSlice):
        g = e.param.grad
        return None if g is None else e.view(g)
    return e.grad


def _collective_device(group) -> torch.device:
    backend = dist.get_backend(group)
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
