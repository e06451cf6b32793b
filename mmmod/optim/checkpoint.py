"""ModulatedOptimizer checkpoints: what ``state_dict()["mmmod"]`` holds and the load policy.

Policy: a checkpoint never switches what is computed or on which tensors. The modality names
(in order), the method, ``apply_to``, ``noise_std``, ``noise_rng`` and the selected tensors
(names and shapes per modality) must equal the optimizer's, else loading raises before anything
changes. Scalar hyperparameters (``alpha``, ``beta_max``, the modulation window) and the run's
position (step, seed, epoch, method state, last scores/coefficients, skipped count) are restored
from the checkpoint, as torch restores a parameter group's ``lr``; they are validated first:
a missing hyperparameter is named, the skipped count must be a non-negative integer, the last
scores and coefficients one float per modality, and the method state finite (and, for the
built-in methods' running values, non-negative). The inner optimizer's type is recorded
(``"inner"``) and a checkpoint of another type is refused by name (checkpoints without the
record, from older versions, are not checked for it).

The run's position is the optimizer's run state (``opt.run_state``, mmmod/optim/state.py):
:meth:`~mmmod.optim.state.RunState.to_dict` gives what is saved and
:meth:`~mmmod.optim.state.RunState.load_dict` restores it; the method object is
``opt.method_object``. Nothing here reads a private attribute of the optimizer.
"""
from __future__ import annotations

import copy
from typing import Any

import torch

from . import config
from .proxies import unwrap
from .selection import param_of, param_tensors
from .state import grad_marks, upgrade

KEYS = ("step_count", "seed", "epoch", "modalities", "selection", "hyper", "method_state",
        "skipped_steps", "scores", "coefficients")


def selection(opt) -> list[list[list]]:
    """Per modality, [name, shape] of every selected tensor."""
    return [[[n, list(param_of(e).shape)] for e, n in zip(ps, pnames)]
            for ps, pnames in zip(opt.params, opt.param_names)]


def inner_type(optimizer) -> str:
    t = type(optimizer)
    return f"{t.__module__}.{t.__qualname__}"


#: method-state entries of the built-in methods that hold counts, means of losses, accuracies,
#: ratios or Fisher traces: never negative in a state the method wrote
NON_NEGATIVE = {"agm": ("score_mean", "steps"), "mslr": ("ratio", "base_rate", "history"),
                "inforeg": ("beta", "window", "fisher", "traces")}


def entry(opt) -> dict[str, Any]:
    run = opt.run_state.to_dict()
    return {
        "inner": inner_type(opt.optimizer),
        "step_count": run["step_count"], "seed": run["seed"], "epoch": run["epoch"],
        "modalities": list(opt.names), "selection": selection(opt),
        "hyper": {**{h: getattr(opt, h) for h in config.STRUCTURAL},
                  **{h: run[h] for h in config.SCALARS}},
        "method_state": run["method_state"], "skipped_steps": run["skipped_steps"],
        "scores": run["scores"], "coefficients": run["coefficients"],
    }


def validated(opt, own: Any) -> dict[str, Any]:
    """The checkpoint's mmmod entry checked against ``opt``: the values to restore."""
    if not isinstance(own, dict) or any(k not in own for k in KEYS):
        missing = [k for k in KEYS if not isinstance(own, dict) or k not in own]
        raise ValueError(f"state_dict['mmmod'] lacks {missing}: not a checkpoint of this "
                         f"version of ModulatedOptimizer")
    if list(own["modalities"]) != list(opt.names):
        raise ValueError(f"state_dict was saved for modalities {own['modalities']}, "
                         f"this optimizer has {opt.names}")
    hyper = own["hyper"]
    missing = [h for h in config.STRUCTURAL + config.SCALARS
               if not isinstance(hyper, dict) or h not in hyper]
    if missing:
        raise ValueError(f"state_dict['mmmod']['hyper'] lacks {missing} (a checkpoint of an "
                         f"older version?): set them on the optimizer and save it again, or "
                         f"add them to the checkpoint")
    for h in config.STRUCTURAL:
        if hyper.get(h) != getattr(opt, h):
            raise ValueError(f"state_dict was saved with {h}={hyper.get(h)!r}, this optimizer "
                             f"has {h}={getattr(opt, h)!r}; a checkpoint never switches what is "
                             f"computed: build the optimizer with the checkpoint's settings")
    mine = selection(opt)
    for name, saved, cur in zip(opt.names, own["selection"], mine):
        if [[n, list(s)] for n, s in saved] != cur:
            raise ValueError(f"state_dict selects other tensors for modality {name!r} "
                             f"(saved {_brief(saved)}, this optimizer {_brief(cur)}); check "
                             f"param_filter and the model")
    if "inner" in own and own["inner"] != inner_type(opt.optimizer):
        raise ValueError(f"state_dict was saved for inner optimizer {own['inner']}, this "
                         f"optimizer wraps {inner_type(opt.optimizer)}; its state and param "
                         f"group options would not fit: build the optimizer with the "
                         f"checkpoint's inner optimizer")
    out = {"step_count": config.integer("step_count", own["step_count"], minimum=0),
           "seed": config.seed(own["seed"]), "epoch": config.integer("epoch", own["epoch"])}
    out["alpha"], out["beta_max"] = opt.method_object.check_hyperparameters(hyper["alpha"],
                                                                            hyper["beta_max"])
    out["modulation_starts"], out["modulation_ends"] = config.window(
        hyper["modulation_starts"], hyper["modulation_ends"])
    # a method's state may grow (MSLR's accuracy history, InfoReg's traces gain a row per
    # epoch) and gain entries (InfoReg's parameter snapshots): every fresh entry must be there
    # with its dtype, number of dimensions and trailing shape; extra entries are tensors too
    state, fresh = own["method_state"], opt.run_state.method_state
    if isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values()):
        # parameter-shaped state (InfoReg's snapshots) against this optimizer's (local)
        # tensors, named, before the generic check below
        opt.method_object.check_state(state, param_tensors(opt.params), opt.names)
    if not isinstance(state, dict) or not set(fresh) <= set(state) or any(
            not isinstance(v, torch.Tensor) for v in state.values()) or any(
            state[k].dtype != v.dtype or state[k].dim() != v.dim()
            or state[k].shape[1:] != v.shape[1:] or (v.dim() == 1 and state[k].shape != v.shape)
            for k, v in fresh.items()):
        raise ValueError(f"state_dict's method state does not fit method {opt.method!r}")
    _check_state_values(opt, state, fresh)
    out["method_state"] = state
    out["skipped_steps"] = _skipped(own["skipped_steps"])
    for k in ("scores", "coefficients"):
        out[k] = _per_modality(k, own[k], len(opt.names))
    return out


def _skipped(v: Any) -> torch.Tensor | None:
    """None or a 0-d integer tensor >= 0 (the device counter ``step`` adds to)."""
    if v is None:
        return None
    if not isinstance(v, torch.Tensor) or v.dim() != 0 or v.dtype.is_floating_point or \
            v.dtype.is_complex or v.dtype == torch.bool:
        raise ValueError(f"state_dict['mmmod']['skipped_steps'] must be None or a 0-d integer "
                         f"tensor, got {type(v).__name__} {v!r}")
    if int(v) < 0:
        raise ValueError(f"state_dict['mmmod']['skipped_steps'] must be >= 0, got {int(v)}")
    return v


def _per_modality(what: str, v: Any, m: int) -> torch.Tensor | None:
    if v is None:
        return None
    if not isinstance(v, torch.Tensor) or tuple(v.shape) != (m,) or not v.dtype.is_floating_point:
        raise ValueError(f"state_dict['mmmod'][{what!r}] must be None or a float tensor of shape "
                         f"({m},), got {type(v).__name__} "
                         f"{tuple(v.shape) if isinstance(v, torch.Tensor) else v!r}")
    return v


def _check_state_values(opt, state: dict, fresh: dict) -> None:
    """Refuse, by entry, a method state holding NaN/inf or (for the built-in methods' running
    values) a negative value: it would poison every later coefficient silently."""
    positive = NON_NEGATIVE.get(opt.method, ()) if type(opt.method_object).__module__.startswith(
        "mmmod.methods.") else ()
    for k in fresh:
        v = state[k]
        if not v.dtype.is_floating_point or v.numel() == 0:
            continue
        if not bool(torch.isfinite(v).all()):
            raise ValueError(f"state_dict's method state {k!r} of method {opt.method!r} holds "
                             f"NaN or inf")
        if k in positive and bool((v < 0).any()):
            raise ValueError(f"state_dict's method state {k!r} of method {opt.method!r} holds a "
                             f"negative value ({float(v.min())})")


def _brief(sel) -> str:
    return f"{len(sel)} tensors: " + ", ".join(f"{n} {tuple(s)}" for n, s in sel[:3]) + (
        ", ..." if len(sel) > 3 else "")


def save(opt) -> dict[str, Any]:
    """The inner optimizer's state_dict plus ours under "mmmod", with the hooks registered on
    the wrapper (``register_state_dict_pre_hook`` / ``_post_hook``) run as torch runs them."""
    for hook in opt._optimizer_state_dict_pre_hooks.values():
        hook(opt)
    sd = opt.optimizer.state_dict()
    sd["mmmod"] = entry(opt)
    for hook in opt._optimizer_state_dict_post_hooks.values():
        sd = hook(opt, sd) or sd
    return sd


def load(opt, state_dict: dict[str, Any]) -> None:
    """Validate our entry fully, then load the inner optimizer, then restore ours: a refused
    checkpoint changes nothing. Load hooks registered on the wrapper run around it."""
    for hook in opt._optimizer_load_state_dict_pre_hooks.values():
        state_dict = hook(opt, state_dict) or state_dict
    sd = dict(state_dict)
    own = sd.pop("mmmod", None)
    if own is None:
        raise KeyError("state_dict has no 'mmmod' entry: it was not saved by a "
                       "ModulatedOptimizer (load it into the inner optimizer instead)")
    values = validated(opt, own)
    opt.optimizer.load_state_dict(sd)
    opt.run_state.load_dict(values)
    for hook in opt._optimizer_load_state_dict_post_hooks.values():
        hook(opt)


def portable_state(opt) -> dict[str, Any]:
    """The instance state to pickle or deep-copy: what torch's ``Optimizer.__getstate__``
    keeps (``defaults``; ``state`` and ``param_groups`` live in the inner optimizer) plus
    mmmod's own, never a per-instance wrapper of a method (an LR scheduler sets ``opt.step``
    to a function holding a weak reference to this optimizer: a copy calling it would step
    the original). The recorder (history and loggers, which may hold open files) belongs to
    this run: a copy starts without one."""
    cls = type(opt)
    state = {k: v for k, v in opt.__dict__.items()
             if not (callable(v) and callable(getattr(cls, k, None)))}
    state.pop("_opt_called", None)  # the scheduler wrapper's flag goes with the wrapper
    state.pop("_plan", None)  # rebuilt on load from the pieces it holds (__setstate__)
    state["_run"] = opt.run_state.portable()
    return state


class Checkpointing:
    """state_dict / load_state_dict with the wrapper's own hooks, pickling and deep copies
    (mixed into ModulatedOptimizer ahead of torch.optim.Optimizer, whose versions would save
    only param_groups and state)."""

    def state_dict(self) -> dict[str, Any]:
        return save(unwrap(self))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a checkpoint; one of other modalities, method, apply_to, noise settings or
        selected tensors is refused before anything changes (see the module's policy)."""
        load(unwrap(self), state_dict)  # through a framework proxy: the real optimizer

    def __getstate__(self) -> dict[str, Any]:
        if self.process_group is not None:
            raise TypeError("a ModulatedOptimizer bound to an explicit process_group cannot be "
                            "pickled (process groups cannot); copy.deepcopy keeps the group")
        return portable_state(self)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(upgrade(state))
        self._patch_step_function()
        self._build_plan()
        self._run.mark = grad_marks(self.params)

    def __deepcopy__(self, memo):
        """A copy that trains identically; with (model, optimizer) copied together it
        updates the copied model's parameters. An explicit process group is shared."""
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        memo[id(self._method)] = self._method  # the registered rule is shared; its state is not
        if self.process_group is not None:
            memo[id(self.process_group)] = self.process_group
        new.__setstate__(copy.deepcopy(portable_state(self), memo))
        return new
