"""What a ModulatedOptimizer shares across data-parallel ranks: at construction one small
collective (rank 0's seed, and a check that every rank resolved the same backend), at each
step the all-reduce of the M score sums."""
from __future__ import annotations

import numbers
import zlib
from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist

from .. import backends

_U64 = (1 << 64) - 1


def group(process_group):
    """The group whose ranks share one global batch, or None when not distributed."""
    if process_group is not None:
        return process_group
    if dist.is_available() and dist.is_initialized():
        return dist.group.WORLD
    return None


def world(process_group) -> int:
    g = group(process_group)
    return 1 if g is None else dist.get_world_size(g)


def collective_device(g) -> torch.device:
    if dist.get_backend(g) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _backend_mask(resolved: list[str]) -> int:
    return sum(1 << backends.BACKENDS.index(name) for name in set(resolved))


def _backend_names(mask: int) -> list[str]:
    return [n for i, n in enumerate(backends.BACKENDS) if mask >> i & 1]


def agree(process_group, seed: int, resolved: list[str]) -> int:
    """Rank 0's seed (every rank must draw the same noise), after checking that every rank
    resolved ``backend`` to the same kernels (different kernels round differently, so the
    replicas would drift apart). One all-gather of two int64 per rank, at construction only;
    every rank sees the same table, so all of them raise together (no hang)."""
    g = group(process_group)
    if g is None or dist.get_world_size(g) == 1:
        return seed
    signed = seed - (1 << 64) if seed >= 1 << 63 else seed  # the same 64 bits as an int64
    mine = torch.tensor([signed, _backend_mask(resolved)], dtype=torch.int64,
                        device=collective_device(g))
    table = [torch.empty_like(mine) for _ in range(dist.get_world_size(g))]
    dist.all_gather(table, mine, group=g)
    rows = [t.tolist() for t in table]
    masks = [r[1] for r in rows]
    if len(set(masks)) > 1:
        per_rank = ", ".join(f"rank {r}: {_backend_names(mk)}" for r, mk in enumerate(masks))
        raise RuntimeError(f"data-parallel ranks resolved the mmmod backend differently "
                           f"({per_rank}); every rank must run the same kernels to stay "
                           f"bit-identical: pass the same explicit backend= on every rank, or "
                           f"make the same backends available everywhere")
    return rows[0][0] & _U64


def all_gather_rows(t: torch.Tensor, g) -> torch.Tensor:
    """Every rank's ``t`` stacked in rank order, ``[W, *t.shape]`` (one collective into a flat
    buffer, the layout every backend accepts; asynchronous, waited on through its handle)."""
    flat = torch.empty(dist.get_world_size(g) * t.numel(), dtype=t.dtype, device=t.device)
    dist.all_gather_into_tensor(flat, t.contiguous().view(-1), group=g, async_op=True).wait()
    return flat.view((dist.get_world_size(g),) + tuple(t.shape))


def all_reduce_scores(s: torch.Tensor, process_group) -> torch.Tensor:
    """The global batch's M score sums: one small all-gather of every rank's sums, added in
    rank order on every rank. The sum is then ``((s_0 + s_1) + s_2) + ...`` whatever algorithm
    the backend's all-reduce would pick, the same bits a single process gets by observing the
    ranks' batches one after another (``W * M`` floats gathered, ``W - 1`` tiny adds). On NCCL
    ``wait()`` only makes the current stream wait, no host sync; on gloo it blocks until the
    sums have arrived."""
    g = group(process_group)
    if g is None or dist.get_world_size(g) == 1:
        return s
    table = all_gather_rows(s, g)
    total = table[0].clone()
    for r in range(1, table.shape[0]):
        total += table[r]
    return total


def global_scores(score_sum, samples: int, mean: bool, process_group, num_modalities: int,
                  device) -> tuple[torch.Tensor, torch.Tensor]:
    """(the step's score sums over the global batch, what the method's rule reads: the sums,
    or per-sample means when ``mean``). The sample count rides in the same all-reduce as the
    sums; a rule that needs no scores gets zeros when nothing was observed."""
    if score_sum is None:
        zeros = torch.zeros(num_modalities, dtype=torch.float32, device=device)
        return zeros, zeros
    if not mean:
        s = all_reduce_scores(score_sum, process_group)
        return s, s
    count = torch.full((1,), float(samples), dtype=score_sum.dtype, device=score_sum.device)
    both = all_reduce_scores(torch.cat([score_sum, count]), process_group)
    return both[:num_modalities], both[:num_modalities] / both[num_modalities]


def _numbers(value) -> tuple[list[float], object] | None:
    """(the numbers of a per-epoch input, a rebuild function), or None for a value that is not
    a number, a sequence of numbers or a mapping to numbers."""
    def real(v):
        return isinstance(v, numbers.Real) and not isinstance(v, bool) or (
            isinstance(v, torch.Tensor) and v.numel() == 1)
    if real(value):
        return [float(value)], lambda xs: xs[0]
    if isinstance(value, Mapping) and all(real(v) for v in value.values()):
        keys = list(value)
        return [float(value[k]) for k in keys], lambda xs: dict(zip(keys, xs))
    if isinstance(value, Sequence) and not isinstance(value, str) and all(real(v) for v in value):
        return [float(v) for v in value], list
    return None


def agree_epoch_inputs(process_group, epoch: int, inputs: dict, names) -> dict:
    """The per-epoch inputs every rank feeds the method (e.g. MSLR's ``val_acc``): each rank's
    numbers are gathered and, where ranks differ (each validated its own shard), replaced on
    every rank by their mean in rank order -- the global accuracy when the shards are of equal
    size -- so the replicas cannot drift apart. Ranks that pass different keys or numbers of
    values, or are at different epochs, are refused on every rank together (every rank sees the
    same table: no hang).
    Two small all-gathers per ``set_epoch`` call that passes inputs."""
    g = group(process_group)
    if g is None or dist.get_world_size(g) == 1:
        return inputs
    keys = sorted(inputs)
    flat, rebuild, layout = [], {}, []
    for k in keys:
        got = _numbers(inputs[k])
        if got is None:
            raise TypeError(f"set_epoch({k}=...) under data parallelism must be a number, a "
                            f"sequence of numbers or a mapping to numbers (gathered across "
                            f"ranks), got {type(inputs[k]).__name__}")
        xs, rebuild[k] = got
        layout.append((k, len(xs)))
        flat += xs
    device = collective_device(g)
    world_size = dist.get_world_size(g)
    # header: a hash of the keys and sizes, the count of numbers, the epoch (all must agree)
    sig = zlib.crc32(repr(layout).encode())  # the same on every rank (str hash() is not)
    head = torch.tensor([sig, len(flat), epoch], dtype=torch.int64, device=device)
    heads = [torch.empty_like(head) for _ in range(world_size)]
    dist.all_gather(heads, head, group=g)
    rows = [h.tolist() for h in heads]
    if any(r != rows[0] for r in rows):
        raise ValueError(f"set_epoch: the ranks passed different epochs or per-epoch inputs "
                         f"(this rank: epoch {epoch}, inputs {layout}); every rank must set the "
                         f"same epoch with the same keys, one value per modality {list(names)}")
    if not flat:
        return inputs
    mine = torch.tensor(flat, dtype=torch.float64, device=device)
    table = [torch.empty_like(mine) for _ in range(world_size)]
    dist.all_gather(table, mine, group=g)
    values = table[0].clone()
    if any(not torch.equal(t, table[0]) for t in table[1:]):
        for t in table[1:]:
            values += t
        values /= world_size
    out, pos, vals = dict(inputs), 0, values.tolist()
    for k, n in layout:
        out[k] = rebuild[k](vals[pos:pos + n])
        pos += n
    return out
