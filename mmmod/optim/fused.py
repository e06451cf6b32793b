"""Modulation fused into the inner optimizer's update (``ModulatedOptimizer(fused=True)``).

Unfused, a modulated step is three passes over the selected gradients: statistics (OGM-GE's
sigma), a read-modify-write that scales and adds noise, then the inner optimizer's own pass.
Fused, the statistics pass stays (sigma must be known before any element is updated) and the
other two become one: per element, the modulated gradient ``k g + sigma n`` (or ``k g``) is formed
in registers and fed straight into torch's SGD or Adam/AdamW arithmetic; the parameter and the
optimizer state are written, the gradient is not (it keeps its raw value).

The functional core mirrors torch.optim: ``reference_sgd_`` / ``reference_adam_``
(mmmod/reference/fused.py) define one bucket's update in plain torch, with the very tensor
operations of torch's ``_single_tensor_sgd`` / ``_single_tensor_adam`` applied to the modulated
gradient, so they equal "modulate, then torch's step" bit for bit; the backends' kernels of
``mmmod::fused_sgd_`` / ``fused_adam_`` (C++ on CPU, Triton) are tested against them and
reached through ``Backend.fused_update``. Hyperparameters are read from the inner
optimizer's ``param_groups`` at every step and the state is torch's own (``momentum_buffer``,
``exp_avg``, ``exp_avg_sq``, ``step``), so checkpoints move freely between fused and unfused runs.
See docs/fused.md.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .. import backends, reference
from ..reference.fused import modulated_grad, reference_adam_, reference_sgd_
from ..slices import ParamSlice
from torch.optim.optimizer import _get_scalar_dtype
from .selection import local

# group options each supported inner optimizer must have for the fused update to equal its step
_SGD_REFUSED = {"differentiable": True, "fused": True}
_ADAM_REFUSED = {"amsgrad": True, "differentiable": True, "fused": True, "capturable": True}


def inner_kind(optimizer: torch.optim.Optimizer) -> str:
    """``"sgd"`` or ``"adam"`` (Adam and AdamW) for a supported inner optimizer, else raise.
    Subclasses are refused: they may change the step this module reproduces."""
    t = type(optimizer)
    if t is torch.optim.SGD:
        return "sgd"
    if t in (torch.optim.Adam, torch.optim.AdamW):
        return "adam"
    raise ValueError(f"fused=True supports torch.optim.SGD, Adam and AdamW; got "
                     f"{t.__module__}.{t.__qualname__} (use fused=False)")


def check_groups(optimizer: torch.optim.Optimizer, kind: str) -> None:
    """Every group option the fused update does not reproduce is refused by name (read at each
    step: options can change between steps)."""
    refused = _SGD_REFUSED if kind == "sgd" else _ADAM_REFUSED
    name = type(optimizer).__name__
    for i, g in enumerate(optimizer.param_groups):
        for opt, bad in refused.items():
            if g.get(opt, False) == bad:
                raise ValueError(f"fused=True: {name} param group {i} has {opt}={bad!r}, which "
                                 f"the fused update does not support (use fused=False)")
        keys = ("lr", "weight_decay") + (("momentum", "dampening") if kind == "sgd"
                                         else ("betas", "eps"))
        for key in keys:
            vals = g[key] if key == "betas" else (g[key],)
            for v in vals:
                if isinstance(v, torch.Tensor):
                    raise ValueError(f"fused=True: {name} param group {i} has a tensor {key}; "
                                     f"the fused update takes Python numbers (use fused=False)")


def check_params(params, param_names, names) -> None:
    for m, (ps, pn) in enumerate(zip(params, param_names)):
        for e, n in zip(ps, pn):
            if isinstance(e, ParamSlice):
                raise ValueError(f"fused=True: parameter {n!r} of modality {names[m]!r} is a "
                                 f"ParamSlice; the fused update needs whole parameters "
                                 f"(use fused=False)")
            if e.is_complex():
                raise ValueError(f"fused=True: parameter {n!r} of modality {names[m]!r} is "
                                 f"complex; the fused update takes real tensors")


class FusedUpdate:
    """Runs the fused modulated update of one ``ModulatedOptimizer`` step."""

    def __init__(self, optimizer, params, param_names, names):
        self.optimizer = optimizer
        self.kind = inner_kind(optimizer)
        check_groups(optimizer, self.kind)
        check_params(params, param_names, names)
        self.params = params
        self.names = names
        self.group_of = {id(p): gi for gi, g in enumerate(optimizer.param_groups)
                         for p in g["params"]}

    def plan(self, grads, backend: str) -> list:
        """Every check of a fused step, nothing written: the group options (read at each step:
        they can change between steps), each gradient against its parameter, every backend
        resolved and every bucket formed. ``run`` then only computes."""
        opt = self.optimizer
        check_groups(opt, self.kind)
        self.group_of = {id(p): gi for gi, g in enumerate(opt.param_groups) for p in g["params"]}
        plan = []
        for m, (ps, gs) in enumerate(zip(self.params, grads)):
            buckets: dict = {}
            for i, (p, g) in enumerate(zip(ps, gs)):
                if g is None or g.numel() == 0:
                    continue
                lp = local(p)  # a DTensor's local shard (the same memory), else p
                if g.dtype != lp.dtype or g.shape != lp.shape:
                    raise ValueError(f"fused=True: the gradient of parameter {i} of modality "
                                     f"{self.names[m]!r} is {g.dtype} {tuple(g.shape)}, the "
                                     f"parameter {lp.dtype} {tuple(lp.shape)}")
                if id(p) not in self.group_of:
                    raise ValueError(f"fused=True: parameter {i} of modality {self.names[m]!r} "
                                     f"is in no param group of the inner optimizer")
                gi = self.group_of[id(p)]
                buckets.setdefault((p.device, p.dtype), []).append((i, gi, p, g))
            for (device, _), items in buckets.items():
                impl = backends.get(backend, device)
                plan.append((m, device, impl, impl.fused_update(self.kind, device), items))
        return plan

    @torch.no_grad()
    def step(self, grads, coeffs, *, noise: bool, noise_std: str, seed: int, step, offsets,
             backend: str, apply_to: str, stds=None, plan=None) -> None:
        """Modulate (in registers) and update every selected parameter that has a gradient,
        then run the inner optimizer's own step on every other parameter. ``plan``: what
        :meth:`plan` returned for these gradients (made here when not given).

        Sharded (FSDP2) parameters: ``grads`` are the local shards, ``offsets`` the shards'
        stream offsets and ``stds[m][i]`` the whole tensor's gathered float64 std (``None``
        for ordinary tensors); the kernels update the local shards of the parameter and of
        its optimizer state (DTensors in ``state``, as torch's own step keeps them)."""
        opt = self.optimizer
        if plan is None:
            plan = self.plan(grads, backend)
        if isinstance(step, torch.Tensor):
            step = int(step)  # the capturable counter is refused with fused=True; a CPU int here
        ok = torch.isfinite(coeffs).all()
        k_eff = torch.where(ok, coeffs.float(), torch.ones_like(coeffs, dtype=torch.float32))
        gate = ok.float()
        update_mode = apply_to == "update"
        done = set()
        for m, device, impl, kernel, items in plan:
            k_m = k_eff[m].to(device)
            gate_m = gate.to(device)
            k_grad = torch.ones_like(k_m) if update_mode else k_m
            u = k_m if update_mode else None
            sigma = None
            gs = [g if g.is_contiguous() else g.contiguous() for _, _, _, g in items]
            if noise:
                sigma = impl.sigmas(gs, k_grad, noise_std=noise_std, gate=gate_m)
                given = [None if stds is None else stds[m][i] for i, _, _, _ in items]
                if any(sd is not None for sd in given):
                    # shards: the whole tensor's std, gathered across the shard group (a
                    # stack of views, no index tensor uploaded)
                    sigma = torch.stack([
                        sigma[j] if sd is None else
                        reference.noise_sigma(sd.to(device), k_grad, noise_std) * gate_m
                        for j, sd in enumerate(given)])
            by_group: dict = {}
            for j, (i, gi, p, g) in enumerate(items):
                by_group.setdefault(gi, []).append((j, i, p))
            for gi, members in by_group.items():
                group = opt.param_groups[gi]
                idx = [j for j, _, _ in members]
                sig = None if sigma is None else (sigma if len(idx) == len(items)
                                                  else sigma[torch.tensor(idx, device=device)])
                self._bucket(kernel, group, [p for _, _, p in members], [gs[j] for j in idx],
                             [offsets[m][i] for _, i, _ in members], k_grad, sig, u, seed,
                             step, m)
                done.update(id(p) for _, _, p in members)
        self._inner_step_without(done)

    def _bucket(self, kernel, group, params, grads, offsets, k, sigma, u, seed, step, m):
        state = self.optimizer.state
        lps = [local(p) for p in params]  # the kernels write the local shards of DTensors
        work = [p if p.is_contiguous() else p.contiguous() for p in lps]
        if self.kind == "sgd":
            momentum = group["momentum"]
            bufs, ready = [], []
            if momentum != 0:
                for p in params:
                    buf = state[p].get("momentum_buffer")
                    ready.append(buf is not None)
                    if buf is None:
                        buf = torch.empty_like(p)
                        state[p]["momentum_buffer"] = buf
                    bufs.append(buf)
            lbs = [local(b) for b in bufs]
            wb = [b if b.is_contiguous() else b.contiguous() for b in lbs]
            hyper = dict(lr=float(group["lr"]), weight_decay=float(group["weight_decay"]),
                         momentum=float(momentum), dampening=float(group["dampening"]),
                         nesterov=bool(group["nesterov"]), maximize=bool(group["maximize"]))
            kernel(work, grads, wb, ready, offsets, k, sigma, u, **hyper, seed=seed, step=step,
                   modality=m)
            _copy_back(lbs, wb)
        else:
            avgs, sqs, steps = [], [], []
            for p in params:
                st = state[p]
                if len(st) == 0:
                    # torch's Adam: float64 under torch.set_default_dtype(torch.float64)
                    st["step"] = torch.tensor(0.0, dtype=_get_scalar_dtype())
                    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["step"] += 1  # a CPU tensor, as torch keeps it (non-capturable): no sync
                steps.append(float(st["step"]))
                avgs.append(local(st["exp_avg"]))
                sqs.append(local(st["exp_avg_sq"]))
            wa = [a if a.is_contiguous() else a.contiguous() for a in avgs]
            ws = [s if s.is_contiguous() else s.contiguous() for s in sqs]
            beta1, beta2 = group["betas"]
            hyper = dict(lr=float(group["lr"]), beta1=float(beta1), beta2=float(beta2),
                         eps=float(group["eps"]), weight_decay=float(group["weight_decay"]),
                         decoupled=bool(group.get("decoupled_weight_decay",
                                                  type(self.optimizer) is torch.optim.AdamW)),
                         maximize=bool(group["maximize"]))
            kernel(work, grads, wa, ws, steps, offsets, k, sigma, u, **hyper, seed=seed,
                   step=step, modality=m)
            _copy_back(avgs, wa)
            _copy_back(sqs, ws)
        _copy_back(lps, work)

    def _inner_step_without(self, done: set) -> None:
        """The inner optimizer's own step for every parameter not updated here: the fused ones'
        gradients are hidden for the call (torch's step skips parameters without one)."""
        hidden = []
        for g in self.optimizer.param_groups:
            for p in g["params"]:
                if id(p) in done and p.grad is not None:
                    hidden.append((p, p.grad))
                    p.grad = None
        try:
            self.optimizer.step()
        finally:
            for p, gr in hidden:
                p.grad = gr


def _copy_back(dst: Sequence[torch.Tensor], work: Sequence[torch.Tensor]) -> None:
    for d, w in zip(dst, work):
        if w is not d:
            d.copy_(w)


def has_step_pre_hooks(optimizer) -> bool:
    """Whether a step pre-hook (the inner optimizer's own or a global one) would run before the
    inner step: it must see the modulated gradients (e.g. clipping), so the step runs unfused."""
    from torch.optim.optimizer import _global_optimizer_pre_hooks  # noqa: PLC0415
    return bool(optimizer._optimizer_step_pre_hooks) or bool(_global_optimizer_pre_hooks)


def supported(optimizer) -> bool:
    """Whether ``fused=True`` accepts this inner optimizer as configured now."""
    try:
        check_groups(optimizer, inner_kind(optimizer))
    except ValueError:
        return False
    return True


__all__ = ["FusedUpdate", "inner_kind", "check_groups", "has_step_pre_hooks", "reference_sgd_", "reference_adam_",
           "modulated_grad", "supported"]
