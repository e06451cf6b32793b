"""The method interface and the registry every layer reads (optimizer, functional, backends,
filters, demo, docs, tests).

A method turns the M per-modality scores of a step into M coefficients, on the device, with no
host sync. It declares its defaults (``alpha``, which parameter tensors it modulates), whether
it adds OGM-GE noise, whether it is exact on sharded parameters, and any state it keeps across
steps or epochs (tensors, saved in the optimizer's ``state_dict``). Fused backends evaluate some
rules natively (``Method.native`` names the rule); every other method's torch rule runs on the
device between the fused scores and the fused modulation, so a new method needs no new kernel.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch

from ..reference.native_rules import MODULATING
from .traits import MethodTraits


class Method:
    """Base class of a modulation method; subclass it and :func:`register` an instance."""

    #: the name users pass as ``method=``
    name: str = ""
    #: one line for tables and ``--help``
    summary: str = ""
    #: ``alpha`` when the user gives none
    default_alpha: float = 0.1
    #: ``param_filter`` when the user gives none: ``"conv"``, ``"matrix"`` or ``"all"``
    default_filter: str = "all"
    #: adds OGM-GE's Gaussian noise to the selected gradients
    noise: bool = False
    #: modulates gradients at all (``"none"`` only computes scores, if observed)
    modulates: bool = True
    #: multiplies the selected gradients by its coefficients; ``False`` for a rule whose
    #: coefficients are always 1 (InfoReg acts through ``correct_grads_`` only): the optimizer
    #: then skips the scaling pass over the gradients (and ``apply_to="update"``'s snapshot)
    scales: bool = True
    #: exact on sharded parameters (FSDP/DTensor): the rule needs nothing per whole tensor, or
    #: gathers what it needs (``whole_tensor_stats``)
    shard_safe: bool = True
    #: :meth:`correct_grads_` needs a statistic of each whole tensor (InfoReg's Fisher trace):
    #: on sharded parameters the optimizer locates every shard and passes ``shards`` (a
    #: ``mmmod.optim.sharding.ShardPlan``) whose ``sum_over_shards`` adds per-shard partial sums
    whole_tensor_stats: bool = False
    #: a rule the fused backends may evaluate in their scores epilogue instead of
    #: :meth:`coefficients`: the label of a ``mmmod.reference.native_rules.MODULATING`` rule
    #: (``"ogm"`` or ``"mlb"``); ``None`` runs the torch rule
    native: str | None = None
    #: the hyperparameters the rule reads (documentation and ``repr``)
    hyperparameters: tuple[str, ...] = ("alpha",)
    #: the per-epoch inputs :meth:`on_epoch` takes (``set_epoch(e, **inputs)``), e.g.
    #: ``("val_acc",)``; a training loop reads this to know what to supply
    epoch_inputs: tuple[str, ...] = ()

    # -- the rule ----------------------------------------------------------------------------
    def coefficients(self, scores: torch.Tensor, *, alpha: float, beta_max: float,
                     state: dict[str, torch.Tensor]) -> torch.Tensor:
        """Coefficients [M] (float32, on the scores' device) from this step's scores [M].

        Must not read a device value on the host. ``state`` is this method's state (from
        :meth:`init_state`); update it in place. A NaN score must give NaN coefficients (the
        step's modulation is then skipped on the device): :meth:`nan_if_any_nan` does that.
        """
        raise NotImplementedError(f"method {self.name!r} defines no coefficient rule")

    # -- state -------------------------------------------------------------------------------
    def init_state(self, num_modalities: int, device: torch.device | str | None = None
                   ) -> dict[str, torch.Tensor]:
        """Fresh per-method state: a dict of tensors (saved and restored with the optimizer)."""
        return {}

    def on_epoch(self, state: dict[str, torch.Tensor], epoch: int, *, names: Sequence[str],
                 **inputs: Any) -> None:
        """Called by ``set_epoch(epoch, **inputs)``; per-epoch inputs (e.g. validation
        accuracies keyed by modality) arrive in ``inputs``. The default takes none."""
        if inputs:
            raise TypeError(f"method {self.name!r} takes no per-epoch inputs, got "
                            f"{sorted(inputs)}")

    def log_values(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-modality state worth logging each step (name -> tensor [M]); default none."""
        return {}

    # -- optional hooks (the defaults describe a method that needs only the summed scores) ---
    #: what ``observe()`` sums per sample: ``"prob"`` is softmax(z_m)[i, y_i] (the fused
    #: scores of every backend); any other kind means the optimizer calls
    #: :meth:`batch_scores` instead (e.g. AGM's clamped negative log-likelihood)
    score: str = "prob"
    #: ``"sum"``: :meth:`coefficients` receives the step's score sums; ``"mean"``: the sums
    #: divided by the step's number of samples (summed over micro-batches and, under DDP,
    #: all-reduced together with the sums)
    score_reduction: str = "sum"
    #: the rule reads the scores; ``False`` lets the optimizer evaluate :meth:`coefficients`
    #: on a step nobody observed (it then passes zeros), e.g. MSLR's per-epoch rule
    needs_scores: bool = True
    #: the optimizer passes the selected parameters, ``params=[[tensor, ...] per modality]``
    #: (registration order, the same lists as the gradients), to :meth:`on_epoch`
    needs_params: bool = False
    #: the optimizer calls :meth:`correct_grads_` every step inside the modulation window (and
    #: :meth:`observe_grads_` outside it), after :meth:`coefficients` and before the
    #: modulation (InfoReg's proximal term)
    corrects_grads: bool = False
    #: the rule combines per-objective gradients (MMPareto, PCGrad-style surgery): training
    #: calls ``opt.backward({fused: L, modality: L_m, ...})``, which keeps each selected
    #: tensor's fused-objective gradient next to its summed one, and ``step()`` calls
    #: :meth:`combine_` (inside the modulation window) instead of scaling (docs/multi_objective.md)
    combines_objectives: bool = False

    def batch_scores(self, logits: Sequence[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        """Sums over the batch of this method's per-sample score, float32 [M], on the device and
        with no host sync; a label outside [0, C) makes that modality's sum NaN. Called by the
        optimizer only when :attr:`score` is not ``"prob"``; the default is the reference
        probability sums."""
        from ..reference.scores import scores as prob_scores
        return prob_scores(list(logits), labels)

    def correct_grads_(self, params: Sequence[Sequence[torch.Tensor]],
                       grads: Sequence[Sequence[torch.Tensor | None]],
                       state: dict[str, torch.Tensor], backend: str | None = None,
                       **kwargs: Any) -> None:
        """Change the selected gradients in place before the modulation (``None`` entries have
        no gradient this step). Sync-free; the default does nothing. ``backend`` is the
        optimizer's backend preference (``None``: follow the tensors' device). A method with
        ``whole_tensor_stats`` also receives ``shards=`` when some selected tensor is sharded
        (``params`` and ``grads`` are then the local shards)."""
        return None

    def combine_(self, fused: Sequence[Sequence[torch.Tensor]],
                 summed: Sequence[Sequence[torch.Tensor]], state: dict[str, torch.Tensor], *,
                 alpha: float, names: Sequence[str], fused_scale: torch.Tensor | None = None,
                 backend: str | None = None, **kwargs: Any) -> None:
        """Write each modality's combined gradient into ``summed`` (a method with
        :attr:`combines_objectives`). ``summed[m][i]`` is the ``.grad`` of tensor i of modality
        m: the gradient of the summed loss. ``fused[m][i]`` is its gradient of the fused
        objective, in the units of ``summed`` once multiplied by ``fused_scale`` (a 0-d
        float64 tensor, the GradScaler's inverse scale, or ``None``); modality m's own
        objective's gradient is ``summed - fused_scale * fused``. Sync-free, in place. A method
        with ``whole_tensor_stats`` also receives ``shards=`` (a ``ShardPlan``) and ``kept=``
        (per modality, the entry indices of the given tensors) when some tensor is a shard."""
        raise NotImplementedError(f"method {self.name!r} declares combines_objectives but "
                                  f"defines no combine_")

    def observe_grads_(self, params: Sequence[Sequence[torch.Tensor]],
                       grads: Sequence[Sequence[torch.Tensor | None]],
                       state: dict[str, torch.Tensor], backend: str | None = None,
                       **kwargs: Any) -> None:
        """Called instead of :meth:`correct_grads_` on a step outside the modulation window
        (``modulation_starts``/``modulation_ends``): the gradients must be left as they are,
        but the method may gather what later steps need (InfoReg's Fisher trace). Same
        arguments; the default does nothing."""
        return None

    def check_state(self, state: dict[str, torch.Tensor],
                    params: Sequence[Sequence[torch.Tensor]], names: Sequence[str]) -> None:
        """Refuse (ValueError naming the entry) a method state loaded from a checkpoint that
        does not fit these parameters; called before anything is restored. Default: no
        parameter-shaped state, nothing to check."""
        return None

    # -- validation --------------------------------------------------------------------------
    def check_hyperparameters(self, alpha: Any, beta_max: Any) -> tuple[float, float]:
        """``(alpha, beta_max)`` as floats, or a ValueError/TypeError naming the bad one."""
        a = real_number("alpha", alpha)
        if a < 0:
            raise ValueError(f"alpha must be >= 0 for method {self.name!r}, got {a} (a negative "
                             f"alpha would invert the rule)")
        b = real_number("beta_max", beta_max)
        if b < 1:
            raise ValueError(f"beta_max must be >= 1, got {b} (it bounds the coefficient of a "
                             f"lagging modality from above; below 1 it would slow it down)")
        return a, b

    def traits(self) -> MethodTraits:
        """The flags above as one frozen value: what the optimizer's step plan reads (once, when
        it is built)."""
        return MethodTraits.of(self)

    # -- helpers for subclasses -------------------------------------------------------------
    @staticmethod
    def nan_if_any_nan(scores: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """k, or NaN everywhere when any score is NaN (decided on the device)."""
        return torch.where(torch.isnan(scores).any(), torch.full_like(k, float("nan")), k)

    def __repr__(self) -> str:
        return f"<mmmod method {self.name!r}: {self.summary}>"


def real_number(what: str, value: Any) -> float:
    """A finite real number as float, else an error naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not (
            isinstance(value, torch.Tensor) and value.numel() == 1 and not value.requires_grad):
        raise TypeError(f"{what} must be a real number, got {type(value).__name__} {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{what} must be finite, got {v}")
    return v


_REGISTRY: dict[str, Method] = {}


def register(method: Method, *, replace: bool = False) -> Method:
    """Make ``method`` usable by name (``ModulatedOptimizer(..., method=method.name)``).

    Re-registering a taken name is an error unless ``replace=True``.
    """
    if isinstance(method, type):
        raise TypeError(f"register() takes a Method instance, got the class {method.__name__}; "
                        f"use register({method.__name__}())")
    if not isinstance(method, Method):
        raise TypeError(f"register() takes a mmmod.methods.Method, got {type(method).__name__}")
    name = method.name
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"a method's name must be an identifier-like string, got {name!r}")
    if method.default_filter not in ("conv", "matrix", "all"):
        raise ValueError(f"method {name!r}: default_filter must be 'conv', 'matrix' or 'all', "
                         f"got {method.default_filter!r}")
    natives = sorted(r.label for r in MODULATING)
    if method.native is not None and method.native not in natives:
        raise ValueError(f"method {name!r}: native must be None or one of {natives}, got "
                         f"{method.native!r}")
    if name in _REGISTRY and not replace:
        raise ValueError(f"a method named {name!r} is already registered "
                         f"({_REGISTRY[name]!r}); pick another name or pass replace=True")
    method.check_hyperparameters(method.default_alpha, 2.0)
    _REGISTRY[name] = method
    return method


def unregister(name: str) -> None:
    """Remove a registered method (built-ins included; mostly for tests)."""
    if name not in _REGISTRY:
        raise KeyError(f"no method named {name!r} is registered")
    del _REGISTRY[name]


def get(name: str | Method) -> Method:
    """The registered method called ``name`` (a Method instance is returned as is)."""
    if isinstance(name, Method):
        return name
    if not isinstance(name, str):
        raise TypeError(f"method must be a string name, got {type(name).__name__} {name!r}")
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; registered methods are {names()}") from None


def names() -> tuple[str, ...]:
    """Registered method names, in registration order (built-ins first)."""
    return tuple(_REGISTRY)


def table() -> list[Mapping[str, Any]]:
    """One row per registered method (for docs, ``mmmod.info`` and the demo's ``--help``)."""
    return [{"name": m.name, "summary": m.summary, "alpha": m.default_alpha,
             "param_filter": m.default_filter, "noise": m.noise, "shard_safe": m.shard_safe,
             "whole_tensor_stats": m.whole_tensor_stats,
             "combines_objectives": m.combines_objectives,
             "native": m.native, "hyperparameters": m.hyperparameters}
            for m in _REGISTRY.values()]
