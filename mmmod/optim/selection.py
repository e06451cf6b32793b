"""Which tensors a ModulatedOptimizer modulates: each modality's parameters, filtered, checked
against the inner optimizer, and their gradients at step time."""
from __future__ import annotations

import sys
import warnings
from typing import Any, Callable

import torch

from ..slices import ParamSlice


def select(modalities: list[tuple[Any, Any]], keep: Callable, param_filter,
           optimized: set[int]) -> tuple[list[list], list[list[str]]]:
    """Per modality the selected entries (tensors or ParamSlices) and their names.

    A tensor belongs to one modality only (disjoint slices of one parameter excepted) and must
    be in the inner optimizer (else it would never be updated) -- except a frozen one
    (``requires_grad=False``) left out of the optimizer, which is skipped: nothing trains it.
    A modality with no trainable tensor at all (frozen, or given as ``[]``) is kept with no
    tensor: its scores are observed and its coefficient computed, but nothing of it is
    modulated (one warning). A modality that has trainable tensors must select at least one."""
    owner: dict[int, tuple[Any, Any]] = {}  # id(param) -> (modality, entry)
    params, names, untrained = [], [], []
    for name, src in modalities:
        named = expand(name, src)
        chosen, chosen_names, seen = [], [], set()
        trainable = []  # (name, tensor) of the entries an optimizer step can change
        for pname, e in named:
            p = e.param if isinstance(e, ParamSlice) else e
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"modality {name!r}: entry {pname!r} is a {type(e).__name__}, "
                                f"not a parameter")
            if id(p) not in optimized and not p.requires_grad:
                continue  # frozen and not optimized: never updated, so never modulated
            trainable.append((pname, p))
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
        if not chosen and trainable:
            raise ValueError(nothing_selected(name, param_filter, trainable))
        if not chosen:
            untrained.append(name)
        params.append(chosen)
        names.append(chosen_names)
    if len(untrained) == len(params):
        raise ValueError(f"no modality has a trainable parameter in the inner optimizer "
                         f"(modalities {[n for n, _ in modalities]}): nothing to modulate")
    if untrained:
        warnings.warn(f"modalities {untrained} have no trainable parameter (frozen or empty): "
                      f"their scores are observed and their coefficients computed, but none of "
                      f"their gradients is modulated", stacklevel=3)
    return params, names


def nothing_selected(name, param_filter, trainable: list[tuple[str, torch.Tensor]]) -> str:
    """The error for a filter that keeps none of a modality's trainable tensors, with the
    filter that would select them."""
    dims = sorted({p.dim() for _, p in trainable})
    msg = (f"modality {name!r}: param_filter {param_filter!r} selects none of its "
           f"{len(trainable)} trainable tensors (they have {'/'.join(map(str, dims))} dims, e.g. "
           f"{trainable[0][0]!r})")
    if param_filter in ("conv", "matrix"):
        what = "4-D conv weights, as the official OGM-GE code" if param_filter == "conv" \
            else "tensors of 2+ dims"
        better = "'matrix' (weights of 2+ dims) or 'all'" if max(dims) >= 2 else "'all'"
        msg += (f"; '{param_filter}' keeps {what}: for an encoder without such tensors (an MLP, "
                f"a transformer) pass param_filter={better}")
    return msg


def expand(name, src) -> list[tuple[str, Any]]:
    """(name, tensor or ParamSlice) entries of one modality, modules expanded."""
    if isinstance(src, torch.nn.Module):
        return list(src.named_parameters())
    if isinstance(src, (torch.Tensor, ParamSlice)):
        src = [src]
    try:
        src = list(src)
    except TypeError:
        raise TypeError(f"modality {name!r}: expected a module, a parameter or an iterable of "
                        f"them, got {type(src).__name__}") from None
    out = []
    for i, e in enumerate(src):
        if isinstance(e, torch.nn.Module):
            out += [(f"{name}[{i}].{n}", p) for n, p in e.named_parameters()]
        elif isinstance(e, ParamSlice):
            out.append((f"{name}[{i}][{e.start}:{e.stop} along dim {e.dim}]", e))
        else:
            out.append((f"{name}[{i}]", e))
    return out


def sharded_kind(p: torch.Tensor) -> str:
    """'' for an ordinary tensor, else what kind of sharded parameter it is. Looks only at
    modules already imported: a DTensor or FlatParameter cannot exist before its module is."""
    dt = sys.modules.get("torch.distributed.tensor")
    if dt is not None and isinstance(p, getattr(dt, "DTensor", ())):
        return "a DTensor (FSDP2 / tensor parallel)"
    fp = sys.modules.get("torch.distributed.fsdp._flat_param")
    if fp is not None and isinstance(p, getattr(fp, "FlatParameter", ())):
        return "an FSDP FlatParameter"
    return ""


def param_of(e) -> torch.Tensor:
    """The (detached) tensor a selected entry updates in place; for a sharded parameter the
    DTensor itself (its ``shape`` is the unsharded one)."""
    return e.view(e.param.detach()) if isinstance(e, ParamSlice) else e.detach()


def local(t: torch.Tensor | None) -> torch.Tensor | None:
    """This rank's part of ``t``: the local shard of a DTensor (the same memory, so in-place
    changes reach the DTensor), any other tensor itself."""
    if t is None:
        return None
    dt = sys.modules.get("torch.distributed.tensor")
    if dt is not None and isinstance(t, getattr(dt, "DTensor", ())):
        with torch.no_grad():
            return t.to_local()
    return t


def local_param_of(e) -> torch.Tensor:
    """The local memory a selected entry updates in place (a shard's, for a DTensor; a slice
    of a DTensor is taken along an unsharded dim, so it is the same slice of the shard)."""
    if isinstance(e, ParamSlice):
        return e.view(local(e.param.detach()))
    return local(e.detach())


def param_tensors(params) -> list[list[torch.Tensor]]:
    """The local tensors the selected entries update, per modality (element-wise rules)."""
    return [[local_param_of(e) for e in ps] for ps in params]


def grad_of(e) -> torch.Tensor | None:
    """The local gradient of a selected entry (a DTensor gradient's shard), or ``None``."""
    if isinstance(e, ParamSlice):
        g = local(e.param.grad)
        return None if g is None else e.view(g)
    return local(e.grad)


def devices(params) -> list[torch.device]:
    """The distinct devices of the selected parameters, in first-seen order."""
    out: list[torch.device] = []
    for ps in params:
        for e in ps:
            d = local_param_of(e).device
            if d not in out:
                out.append(d)
    return out
