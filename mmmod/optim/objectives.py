"""``ModulatedOptimizer.backward(losses)``: several objectives, each encoder's per-objective
gradients from two backward passes (docs/multi_objective.md).

``losses`` maps every modality name to that modality's unimodal loss and exactly one other key
(e.g. ``"multimodal"``) to the fused objective. For a method that combines per-objective
gradients (``Method.combines_objectives``):

1. ``torch.autograd.grad(L_fused, selected tensors, retain_graph=True)`` gives each selected
   (encoder) tensor's fused-objective gradient ``g_mm``, kept here (summed over the calls of
   one step: gradient accumulation); nothing is written to ``.grad``;
2. ``(L_fused + sum_m L_m).backward()`` leaves every ``.grad`` with the summed loss's gradient
   ``g_sum`` (DDP all-reduces it as for any backward).

On encoder m the unimodal gradient is ``g_sum - g_mm`` (the unimodal losses reach disjoint
encoders, checked here from the autograd graph), so the authors' three retained passes plus
the summed one become two. ``step()`` then hands ``(g_mm, g_sum)`` to the method's
``combine_``. Any other method gets one backward of the summed loss.

Sharded parameters (FSDP2, DTensor leaves): ``autograd.grad`` would reach FSDP2's unsharded
parameters, whose gradient nothing reduce-scatters, so both passes are real ``.backward()``
calls (:meth:`ObjectiveGradients._backward_sharded`): the fused objective first, whose
reduce-scattered shards are kept, then the unimodal losses' sum accumulated onto them.

Every check (keys, scalar losses, devices, each unimodal objective's reach from a walk of the
graph) runs before the first pass, the fused objective's reach (from its gradients) between the
two (on the sharded path every gradient is set aside for the first pass and put back on a
refusal); the kept gradients are updated only once both passes succeeded, so a failing call
leaves every gradient and kept gradient as it was.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.distributed as dist

from ..slices import ParamSlice
from . import distributed, selection


#: autograd nodes that stand for a whole compiled graph (torch.compile's AOTAutograd): every
#: output's graph runs through the same node, so which inputs one loss reaches is not visible
OPAQUE_NODES = ("CompiledFunctionBackward",)


def _reached_leaves(loss: torch.Tensor) -> tuple[set[int], bool]:
    """(ids of the leaf tensors, i.e. ``AccumulateGrad`` variables, the loss's graph reaches;
    whether the walk went through a compiled graph's node, which hides what it reaches)."""
    out: set[int] = set()
    seen: set[int] = set()
    opaque = False
    stack = [loss.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or id(fn) in seen:
            continue
        seen.add(id(fn))
        opaque = opaque or type(fn).__name__ in OPAQUE_NODES
        var = getattr(fn, "variable", None)
        if var is not None:
            out.add(id(var))
        stack.extend(nxt for nxt, _ in fn.next_functions)
    return out, opaque


class ObjectiveGradients:
    """The fused objective's gradients of the selected tensors, kept between ``backward`` and
    ``step`` (one tensor per selected tensor, released at ``step``/``zero_grad``). ``method``:
    the method's ``MethodTraits`` (its ``name`` and ``combines_objectives``)."""

    def __init__(self, names: Sequence, params: Sequence[Sequence], param_names, method) -> None:
        self.names = list(names)
        self.param_names = param_names
        self.combines = method.combines_objectives
        self.method_name = method.name
        if self.combines:
            for m, (ps, pn) in enumerate(zip(params, param_names)):
                for e, n in zip(ps, pn):
                    if isinstance(e, ParamSlice):
                        raise ValueError(f"method {method.name!r} combines per-objective "
                                         f"gradients of whole tensors; parameter {n!r} of "
                                         f"modality {names[m]!r} is a ParamSlice")
        self.leaves = [[e for e in ps] for ps in params]  # the autograd leaves themselves
        # FSDP2 / DTensor leaves: the two passes are real backward calls (their gradients are
        # reduce-scattered shards, already averaged over the ranks)
        self.sharded = any(selection.sharded_kind(e) for ps in params for e in ps
                           if not isinstance(e, ParamSlice))
        #: per modality, the indices of the tensors the last ``pairs`` kept (those with a .grad)
        self.kept: list[list[int]] = []
        self.fused: list[list[torch.Tensor | None]] | None = None
        self.fused_scale: torch.Tensor | None = None
        self.scaler = None

    def clear(self) -> None:
        self.fused, self.fused_scale, self.scaler = None, None, None

    @property
    def pending(self) -> bool:
        return self.fused is not None

    # ---- checks -------------------------------------------------------------------------------
    def _split(self, losses: Any, device: torch.device):
        if not isinstance(losses, Mapping):
            raise TypeError(f"backward() takes a mapping objective name -> scalar loss, e.g. "
                            f"{{'multimodal': L, {self.names[0]!r}: L_0, ...}}; got "
                            f"{type(losses).__name__}")
        missing = [n for n in self.names if n not in losses]
        if missing:
            raise KeyError(f"backward() is missing the objective of modality {missing[0]!r} "
                           f"(objectives: one per modality {self.names} plus the fused one)")
        extra = [k for k in losses if k not in self.names]
        if len(extra) != 1:
            raise KeyError(f"backward() needs exactly one objective besides the modalities' "
                           f"{self.names}: the fused (multimodal) one; got "
                           f"{'none' if not extra else extra}")
        fused_key = extra[0]
        for key in [fused_key] + self.names:
            loss = losses[key]
            if not isinstance(loss, torch.Tensor):
                raise TypeError(f"backward(): objective {key!r} must be a tensor, got "
                                f"{type(loss).__name__}")
            if loss.numel() != 1:
                raise ValueError(f"backward(): objective {key!r} must be a scalar loss, got "
                                 f"shape {tuple(loss.shape)}")
            if not loss.dtype.is_floating_point:
                raise TypeError(f"backward(): objective {key!r} must be floating point, got "
                                f"{loss.dtype}")
            if loss.device != device:
                raise ValueError(f"backward(): objective {key!r} is on {loss.device}, the "
                                 f"selected parameters on {device}")
            if loss.grad_fn is None:
                raise ValueError(f"backward(): objective {key!r} does not depend on any tensor "
                                 f"that requires grad (no graph to backpropagate)")
        return fused_key

    def _check_graph(self, losses, fused_key) -> None:
        """Each unimodal objective reaches its own encoder and no other (its gradient on an
        encoder is taken as that encoder's own objective's). The fused objective's reach is
        checked from its gradients. Through a compiled graph (torch.compile) the walk cannot
        tell which inputs one output reaches: the check is skipped for that objective."""
        own = [{id(t) for t in ts} for ts in self.leaves]
        for m, name in enumerate(self.names):
            reached, opaque = _reached_leaves(losses[name])
            if opaque:
                continue
            if not own[m] & reached:
                raise ValueError(f"backward(): objective {name!r} reaches no selected tensor "
                                 f"of its own modality's encoder")
            for j, other in enumerate(self.names):
                if j != m and own[j] & reached:
                    raise ValueError(f"backward(): objective {name!r} reaches selected tensors "
                                     f"of modality {other!r}; each unimodal objective must reach "
                                     f"its own encoder only (its gradient there would be taken "
                                     f"for {other!r}'s own)")

    # ---- the passes ---------------------------------------------------------------------------
    def backward(self, losses: Mapping, device: torch.device, *, scaler=None,
                 retain_graph: bool = False, others: Sequence = ()) -> None:
        """``others``: the optimizer's other parameters; the sharded path sets their gradients
        aside during the first pass so that a refusal after it leaves them as they were."""
        fused_key = self._split(losses, device)
        if scaler is not None and not (hasattr(scaler, "scale") and hasattr(scaler, "unscale_")):
            raise TypeError(f"backward(): scaler must be a torch.amp.GradScaler, got "
                            f"{type(scaler).__name__}")
        if scaler is not None and not scaler.is_enabled():
            scaler = None  # a disabled scaler scales nothing
        if self.combines and self.fused is not None and scaler is not self.scaler:
            raise ValueError("backward(): every call of one step must pass the same scaler "
                             "(or none)")
        if self.combines and not self.sharded:
            self._check_graph(losses, fused_key)
        scaled = {k: (scaler.scale(v) if scaler is not None else v).reshape(())
                  for k, v in losses.items()}
        total = scaled[fused_key]
        for name in self.names:
            total = total + scaled[name]
        if not self.combines:
            total.backward(retain_graph=retain_graph)
            return
        if self.sharded:
            new = self._backward_sharded(scaled, fused_key, others, retain_graph)
            self._keep(new, scaler)
            return
        leaves = [t for ts in self.leaves for t in ts]
        wants = [t.requires_grad for t in leaves]
        got = torch.autograd.grad(scaled[fused_key], [t for t, w in zip(leaves, wants) if w],
                                  retain_graph=True, allow_unused=True)
        it = iter(got)
        flat = [next(it) if w else None for w in wants]
        new, k = [], 0
        for ts in self.leaves:
            new.append(flat[k:k + len(ts)])
            k += len(ts)
        for m, row in enumerate(new):
            if all(g is None for g in row):
                raise ValueError(f"backward(): the fused objective {fused_key!r} reaches no "
                                 f"selected tensor of modality {self.names[m]!r}")
        total.backward(retain_graph=retain_graph)
        self._keep(new, scaler)

    def _keep(self, new, scaler) -> None:
        """Both passes done: keep the fused objective's gradients (summed over the step's
        calls)."""
        if self.fused is None:
            self.fused = [[None if g is None else g.detach() for g in row] for row in new]
        else:
            for row, add in zip(self.fused, new):
                for i, g in enumerate(add):
                    if g is not None:
                        row[i] = g.detach() if row[i] is None else row[i].add_(g)
        if scaler is not None:
            self.scaler = scaler
            # the scale is a device tensor: no sync (a power of two, so 1/scale is exact)
            self.fused_scale = scaler._scale.double().reciprocal()

    def _backward_sharded(self, scaled, fused_key, others, retain_graph: bool):
        """The two passes as ``.backward()`` calls, for sharded (FSDP2) leaves; returns the
        fused objective's local gradient shards per modality (``None`` where it gave none).

        Every gradient the optimizer holds is set aside (a reference, no copy), the fused
        objective is backpropagated (FSDP2 reduce-scatters its shards into the fresh
        ``.grad``), each modality's reach is checked (a refusal puts every gradient back), then
        every ``.grad`` becomes ``held + g_mm``: a selected tensor's ``g_mm`` is kept and
        ``.grad`` gets a copy (one clone per selected local shard, where the second pass would
        otherwise allocate ``.grad``; the kept ``g_mm`` shards are the method's snapshot
        memory, as the kept ``autograd.grad`` results are unsharded). Last the
        unimodal losses' sum is backpropagated, accumulating onto ``.grad``: ``g_sum = held +
        g_mm + g_uni``, each term reduce-scattered (averaged over the ranks) by FSDP2.

        Not checked here, unlike the unsharded path: that each unimodal objective reaches its
        own encoder only (FSDP2's graph holds its unsharded parameters, not the selected
        DTensor leaves)."""
        selected = [t for ts in self.leaves for t in ts]
        ids = {id(t) for t in selected}
        everything = selected + [p for p in dict.fromkeys(others) if id(p) not in ids]
        held = [t.grad for t in everything]
        for t in everything:
            t.grad = None
        try:
            scaled[fused_key].backward(retain_graph=True)
            fresh = [t.grad for t in everything]
            for m, ts in enumerate(self.leaves):
                if all(t.grad is None for t in ts):
                    raise ValueError(f"backward(): the fused objective {fused_key!r} reaches no "
                                     f"selected tensor of modality {self.names[m]!r} (no "
                                     f"reduce-scattered gradient after its backward; under "
                                     f"FSDP2, set_requires_gradient_sync(False) defers it: "
                                     f"keep gradient sync on for opt.backward)")
        except BaseException:
            for t, h in zip(everything, held):
                t.grad = h
            raise
        new, k = [], 0
        for ts in self.leaves:
            new.append([None if g is None else selection.local(g).detach()
                        for g in fresh[k:k + len(ts)]])
            k += len(ts)
        for j, (t, h, g) in enumerate(zip(everything, held, fresh)):
            if g is None:
                t.grad = h
            elif j < len(selected):
                t.grad = g.clone() if h is None else h.add_(g)
            else:
                t.grad = g if h is None else h.add_(g)
        unimodal = scaled[self.names[0]]
        for name in self.names[1:]:
            unimodal = unimodal + scaled[name]
        unimodal.backward(retain_graph=retain_graph)
        return new

    # ---- at step --------------------------------------------------------------------------------
    def pairs(self, grads, process_group, optimizer_id: int):
        """(fused, summed) per modality for the combine: the kept fused gradients (zeros where
        the fused objective gave none) beside the ``.grad`` tensors, tensors without a
        ``.grad`` left out; under data parallelism the fused gradients are averaged over the
        ranks first (DDP averaged the summed ones). Raises before any write."""
        if self.fused is None:
            raise RuntimeError(f"method {self.method_name!r} combines per-objective gradients: "
                               f"compute them with opt.backward({{'multimodal': L, "
                               f"{self.names[0]!r}: L_0, ...}}) instead of loss.backward() "
                               f"before step()")
        if self.scaler is not None:
            self._check_unscaled(optimizer_id)
        fused, summed, self.kept = [], [], []
        for m, (row, gs) in enumerate(zip(self.fused, grads)):
            a_row, s_row, kept = [], [], []
            for i, (a, g) in enumerate(zip(row, gs)):
                if g is None:
                    continue
                if a is None:
                    a = row[i] = torch.zeros_like(g)
                a_row.append(a)
                s_row.append(g)
                kept.append(i)
            self.kept.append(kept)
            if not s_row:
                raise RuntimeError(f"modality {self.names[m]!r}: no selected tensor has a "
                                   f"gradient to combine")
            fused.append(a_row)
            summed.append(s_row)
        self._average(process_group)
        return fused, summed

    def _average(self, process_group) -> None:
        g = distributed.group(process_group)
        if g is None or dist.get_world_size(g) == 1 or self.sharded:
            return  # sharded: FSDP2's reduce-scatter averaged them
        world = dist.get_world_size(g)
        by_dtype: dict = {}
        for row in self.fused:
            for t in row:
                if t is not None:
                    by_dtype.setdefault(t.dtype, []).append(t)
        for ts in by_dtype.values():  # one all-reduce per dtype
            flat = torch.cat([t.reshape(-1) for t in ts]).div_(world)
            dist.all_reduce(flat, group=g)
            k = 0
            for t in ts:
                t.copy_(flat[k:k + t.numel()].view_as(t))
                k += t.numel()

    def _check_unscaled(self, optimizer_id: int) -> None:
        """With ``scaler=``, ``.grad`` must have been unscaled (``scaler.step(opt)`` or
        ``scaler.unscale_(opt)``) while the kept gradients are brought to the same units by
        ``fused_scale``: stepping without unscaling would mix units. Host metadata only (the
        scaler's per-optimizer stage; skipped if a torch version keeps it elsewhere)."""
        states = getattr(self.scaler, "_per_optimizer_states", None)
        if states is None or not self.scaler.is_enabled():
            return
        stage = states[optimizer_id]["stage"] if optimizer_id in states else None
        if stage is None or getattr(stage, "name", "") == "READY":
            raise RuntimeError("backward() got scaler=, but step() runs on scaled gradients: "
                               "step through scaler.step(opt) (or call scaler.unscale_(opt) "
                               "first)")
