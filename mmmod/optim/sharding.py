"""Sharded parameters (FSDP2 ``fully_shard``, DTensor): what each rank modulates, and the
whole-tensor statistics (OGM-GE's std, InfoReg's Fisher trace) across shards.

Every method scales gradients element-wise, which is exact on each rank's shard. Four things
are per whole tensor and need more than the shard:

- **The noise position.** Element ``e`` of a modality's selected tensors (unsharded, in
  registration order) draws Philox output ``e % 4`` of counter ``e // 4``. A rank holding a
  shard draws exactly its part of that stream: its shard's stream offset is the tensor's
  offset plus the shard's first element in the unsharded tensor's flat order. Under FSDP2's
  ``Shard(0)`` (and any placement whose local block is one contiguous range of the flat
  tensor, e.g. ``(Replicate(), Shard(0))`` of hybrid sharding) that is
  ``first_local_row * row_numel``; other layouts are refused with the parameter's name.
- **OGM-GE's sigma**, the std of the whole tensor's gradient. Each rank computes per local
  shard ``(count, mean, M2)`` in float64 (``mmmod::_bucket_moments``: one fused statistics
  pass per (device, dtype) bucket of shards, on every backend's device), the ranks holding the
  shards of a tensor exchange them in **one all-gather per shard group per step** for every
  sharded tensor of every modality (``24 * T`` bytes per rank for T sharded tensors), and every
  rank merges the table in the same fixed order (Chan et al.'s pairwise update, rank 0 first),
  so the std has the same bits on every rank. No host sync: the collective is asynchronous and
  waited on through its handle, and everything else stays on the device.
- **A method's whole-tensor statistic** (``Method.whole_tensor_stats``: InfoReg's Fisher trace,
  a mean of squared gradients over each whole tensor): the method computes a float64 partial
  sum per local shard and :meth:`ShardPlan.sum_over_shards` adds the shards' partial sums, one
  all-gather per shard group per step, in rank order (the same bits on every rank).
- **MMPareto's pair moments** (``|a|^2, |b|^2, a.b`` per tensor, float64): each rank's rows
  from its shards, summed by :meth:`ShardPlan.sum_rows_over_shards` (one all-gather of the
  ``[T, 3]`` rows per shard group per step, added in rank order) before the weights.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .. import backends
from ..reference.moments import bucket_moments
from ..slices import ParamSlice
from . import distributed
from .selection import sharded_kind


@dataclass(frozen=True)
class Shard:
    """Where this rank's part of one selected (sharded) entry lies."""
    group: Any          # the process group holding the entry's other shards
    start: int          # first element of the local part in the entry's unsharded flat order
    local_numel: int
    global_numel: int


def _dtensor_module():
    return sys.modules.get("torch.distributed.tensor")


def _is_dtensor(t) -> bool:
    dt = _dtensor_module()
    return dt is not None and isinstance(t, getattr(dt, "DTensor", ()))


def global_shape(e) -> tuple[int, ...]:
    """The unsharded shape of a selected entry (a DTensor's ``shape`` is already global)."""
    p = e.param if isinstance(e, ParamSlice) else e
    shape = list(p.shape)
    if isinstance(e, ParamSlice):
        shape[e.dim] = e.stop - e.start
    return tuple(shape)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _locate(e, pname: str, name: str, need_range: bool = True) -> Shard | None:
    """The local block of a DTensor entry as a contiguous range of its flat unsharded order
    (``None`` when every rank holds the whole tensor), or a ValueError naming the parameter
    when the layout has no such range. ``need_range=False`` (a method that only adds per-shard
    sums): any single ``Shard(d)`` layout, ``start`` then meaningless (0)."""
    from torch.distributed.tensor import Replicate, Shard as ShardPlacement
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    p = e.param if isinstance(e, ParamSlice) else e
    placements = tuple(p.placements)
    sharded = [i for i, pl in enumerate(placements) if not isinstance(pl, Replicate)]
    who = f"parameter {pname!r} of modality {name!r}"
    if not sharded:
        return None  # replicated everywhere: the local tensor is the whole tensor
    if len(sharded) != 1 or type(placements[sharded[0]]) is not ShardPlacement:
        raise ValueError(f"{who} has DTensor placements {placements}: whole-tensor statistics "
                         f"on sharded parameters need exactly one Shard(d) placement (the rest "
                         f"Replicate), as FSDP2's fully_shard makes (Shard(0), or "
                         f"(Replicate(), Shard(0)) for hybrid sharding)")
    mesh_dim = sharded[0]
    shard_dim = placements[mesh_dim].dim
    local_shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, placements)
    local_shape, offset = list(local_shape), list(offset)
    full = list(p.shape)
    if isinstance(e, ParamSlice):
        if e.dim == shard_dim:
            raise ValueError(f"{who} is a slice along dim {e.dim}, the dim its DTensor is "
                             f"sharded on; slice along another dim (or do not shard it)")
        full[e.dim] = local_shape[e.dim] = e.stop - e.start
        offset[e.dim] = 0
    if not need_range:
        return Shard(p.device_mesh.get_group(mesh_dim), 0, _numel(local_shape), _numel(full))
    # contiguous in the flat order iff every dim before the sharded one holds one index
    # locally and every dim after it is whole
    if any(local_shape[d] != 1 and full[d] != 1 for d in range(shard_dim)) or any(
            local_shape[d] != full[d] for d in range(shard_dim + 1, len(full))):
        raise ValueError(f"{who}: its local shard (shape {tuple(local_shape)} of "
                         f"{tuple(full)}, sharded on dim {shard_dim}) is not one contiguous "
                         f"range of the flattened tensor, so it cannot draw its part of the "
                         f"noise stream; shard it on its first dim (FSDP2's default)")
    stride, start = 1, 0
    for d in reversed(range(len(full))):
        start += offset[d] * stride
        stride *= full[d]
    return Shard(p.device_mesh.get_group(mesh_dim), start, _numel(local_shape), _numel(full))


class ShardPlan:
    """Per selected entry: ``None`` (an ordinary tensor, or a sharded one whose method needs
    nothing per whole tensor) or its :class:`Shard`; and every entry's stream offset (the
    local part's, for a shard)."""

    def __init__(self, shards: list[list[Shard | None]], offsets: list[list[int]]):
        self.shards = shards
        self.offsets = offsets
        groups: dict[Any, list[tuple[int, int]]] = {}
        for m, row in enumerate(shards):
            for i, s in enumerate(row):
                if s is not None:
                    groups.setdefault(s.group, []).append((m, i))
        #: (group, [(modality, tensor index)]) in first-seen order: one collective each
        self.groups = list(groups.items())
        self._index: dict[tuple, torch.Tensor] = {}  # row layouts of global_stds (cached)

    @property
    def needs_stds(self) -> bool:
        return bool(self.groups)

    #: some selected entry is a located shard (the plan has collectives to make)
    located = needs_stds

    @torch.no_grad()
    def sum_over_shards(self, partial: Sequence[Sequence[torch.Tensor | None]]
                        ) -> list[list[torch.Tensor | None]]:
        """The whole-tensor sum of every sharded entry from each shard's partial sum.

        ``partial[m][i]``: a 0-d float64 tensor (this rank's shard's part; ``None`` counts as
        0) for every located shard. One all-gather of a ``[T]`` float64 row per shard group,
        added in rank order on every rank (the same bits everywhere, whatever algorithm an
        all-reduce would pick); ``None`` for entries that are not shards."""
        out: list[list[torch.Tensor | None]] = [[None] * len(row) for row in self.shards]
        for group, members in self.groups:
            dev = distributed.collective_device(group)
            row = torch.stack([torch.zeros((), dtype=torch.float64, device=dev)
                               if partial[m][i] is None
                               else partial[m][i].to(dev, torch.float64) for m, i in members])
            table = distributed.all_gather_rows(row, group)
            total = table[0].clone()
            for r in range(1, table.shape[0]):
                total += table[r]
            for t, (m, i) in enumerate(members):
                p = partial[m][i]
                out[m][i] = total[t].to(dev if p is None else p.device, non_blocking=True)
        return out

    @torch.no_grad()
    def sum_rows_over_shards(self, rows: Sequence[torch.Tensor], index: Sequence[Sequence[int]]
                             ) -> list[torch.Tensor]:
        """Per modality, the whole tensors' rows (MMPareto's float64 ``(|a|^2, |b|^2, a.b)``
        moments) from each shard's row.

        ``rows[m]``: ``[k, c]`` float64, one row per tensor of modality m in ``index[m]`` (the
        entry indices, in order; an entry left out counts as a zero row). Rows of located
        shards are replaced by their sum over the shard group: one all-gather of a ``[T, c]``
        table per shard group, added in rank order (the same bits on every rank); rows of
        entries every rank holds whole stay as they are. Returns new tensors."""
        out = [r.clone() for r in rows]
        pos = [{i: j for j, i in enumerate(idx)} for idx in index]
        width = next((r.shape[1] for r in rows if r.dim() == 2), 3)
        for group, members in self.groups:
            dev = distributed.collective_device(group)
            zero = torch.zeros(width, dtype=torch.float64, device=dev)
            mine = torch.stack([rows[m][pos[m][i]].to(dev) if i in pos[m] else zero
                                for m, i in members])
            table = distributed.all_gather_rows(mine, group)
            total = table[0].clone()
            for r in range(1, table.shape[0]):
                total += table[r]
            for t, (m, i) in enumerate(members):
                if i in pos[m]:
                    out[m][pos[m][i]] = total[t].to(out[m].device, non_blocking=True)
        return out

    @torch.no_grad()
    def global_stds(self, grads: Sequence[Sequence[torch.Tensor | None]], backend: str = "auto"
                    ) -> list[list[torch.Tensor | None]]:
        """The unbiased float64 std of every sharded entry's whole gradient (0-d, on the
        gradient's device; ``None`` for ordinary entries, computed by the backend as usual).

        ``grads`` are the local gradients (``selection.grad_of``). Per shard group, the local
        shards' ``(count, mean, M2)`` come from one ``mmmod::_bucket_moments`` call per
        (device, dtype) bucket of them (``backend``'s kernel, the fused statistics pass:
        one read of each shard), then one all-gather of the ``[T, 3]`` float64 table; every
        rank merges it in rank order (:func:`merged_std`), so all of them hold the same bits.
        A shard without a gradient counts as empty; a non-finite value anywhere in a tensor
        makes its std non-finite (no noise), as for an unsharded tensor."""
        out: list[list[torch.Tensor | None]] = [[None] * len(row) for row in self.shards]
        for gi, (group, members) in enumerate(self.groups):
            dev = distributed.collective_device(group)
            buckets: dict[tuple, list[int]] = {}  # (device, dtype) -> member positions
            for t, (m, i) in enumerate(members):
                g = grads[m][i]
                if g is not None:
                    buckets.setdefault((g.device, g.dtype), []).append(t)
            parts, order = [], []
            for (gdev, _), ts in buckets.items():
                shards = [grads[members[t][0]][members[t][1]].detach() for t in ts]
                if gdev.type == "cuda" and torch.cuda.is_current_stream_capturing():
                    # the CUDA extension uploads its table from pinned memory, which a graph
                    # cannot capture; the reference is plain device ops (a host query, no sync)
                    rows = bucket_moments(shards)
                else:
                    rows = backends.kernel("_bucket_moments", backend, gdev)(shards)
                parts.append(rows.to(dev))  # a no-op unless gloo gathers CUDA shards' rows
                order += ts
            missing = len(members) - len(order)  # no gradient on this rank: empty shards
            if missing:
                parts.append(torch.zeros((missing, 3), dtype=torch.float64, device=dev))
                have = set(order)
                order += [t for t in range(len(members)) if t not in have]
            mine = torch.cat(parts) if len(parts) > 1 else parts[0]
            if order != list(range(len(members))):  # back to the members' (the table's) order
                mine = mine[self._inverse(gi, order, dev)]
            std = merged_std(distributed.all_gather_rows(mine.contiguous(), group))
            for t, (m, i) in enumerate(members):
                g = grads[m][i]
                if g is not None:
                    out[m][i] = std[t].to(g.device, non_blocking=True)
        return out

    def _inverse(self, gi: int, order: list[int], dev: torch.device) -> torch.Tensor:
        """Index putting rows stacked in ``order`` back in member order (uploaded once per
        layout and cached: the layout is the shards' devices and dtypes, fixed across steps)."""
        key = (gi, dev, tuple(order))
        idx = self._index.get(key)
        if idx is None:
            inv = [0] * len(order)
            for pos, t in enumerate(order):
                inv[t] = pos
            idx = torch.tensor(inv, dtype=torch.int64, device=dev)
            self._index[key] = idx
        return idx


def merged_std(table: torch.Tensor) -> torch.Tensor:
    """Unbiased std per column from per-shard ``(count, mean, M2)`` rows ``[W, T, 3]``
    (float64), merged shard 0 first (Chan, Golub and LeVeque's pairwise update): ``[T]``,
    0 where fewer than two elements."""
    n, mean, m2 = table[0].unbind(-1)
    for r in range(1, table.shape[0]):
        nb, mb, m2b = table[r].unbind(-1)
        tot = n + nb
        w = torch.where(tot > 0, nb / tot.clamp_min(1), torch.zeros_like(tot))
        delta = mb - mean
        mean = mean + delta * w
        m2 = m2 + m2b + delta * delta * n * w
        n = tot
    return torch.where(n >= 2, (m2 / (n - 1).clamp_min(1)).sqrt(), torch.zeros_like(m2))


def plan(names, params, param_names, method, noise_rng: str) -> ShardPlan:
    """Check every selected entry against ``method`` (its ``MethodTraits``: ``name``,
    ``shard_safe``, ``noise``, ``whole_tensor_stats``) and lay out the noise stream.

    Refused, with the modality and parameter named: sharded entries of a method that is not
    ``shard_safe``; for a noise method or one with ``whole_tensor_stats``, an FSDP1
    ``FlatParameter`` (it flattens many tensors into one, so no per-tensor statistic exists);
    for a noise method, ``noise_rng="torch"`` on a shard (each rank's
    torch generator cannot draw its slice of one stream), and layouts whose local shard is not
    one contiguous range (see :func:`_locate`). Slices of a DTensor along its sharded dim are
    refused for every method (the slice's rows live on other ranks)."""
    shards, offsets = [], []
    for name, ps, pnames in zip(names, params, param_names):
        row, offs, run = [], [], 0
        for e, pname in zip(ps, pnames):
            p = e.param if isinstance(e, ParamSlice) else e
            kind = sharded_kind(p)
            s = None
            if kind and not method.shard_safe:
                raise ValueError(
                    f"parameter {pname!r} of modality {name!r} is {kind}: method "
                    f"{method.name!r} needs a statistic of each whole tensor that mmmod does "
                    f"not gather across shards yet; use DDP for it, or another method "
                    f"(every other registered method is exact under sharding)")
            whole = method.noise or method.whole_tensor_stats
            if kind and whole and not _is_dtensor(p):
                raise ValueError(
                    f"parameter {pname!r} of modality {name!r} is {kind}: method "
                    f"{method.name!r} needs a statistic of each tensor's own gradient, which "
                    f"a flattened FSDP1 parameter mixes with others; shard with FSDP2 "
                    f"(fully_shard) instead")
            if kind and method.noise:
                if noise_rng != "philox":
                    raise ValueError(
                        f"parameter {pname!r} of modality {name!r} is {kind}: "
                        f"noise_rng={noise_rng!r} draws from each rank's own generator and "
                        f"cannot give a shard its part of one stream; use noise_rng='philox'")
            if _is_dtensor(p) and (whole or isinstance(e, ParamSlice)):
                s = _locate(e, pname, name, need_range=method.noise)
                if not whole:
                    s = None  # located only to refuse a slice along the sharded dim
            row.append(s)
            offs.append(run + (0 if s is None else s.start))
            run += _numel(global_shape(e))
        shards.append(row)
        offsets.append(offs)
    return ShardPlan(shards, offsets)
