"""What a ModulatedOptimizer shares across data-parallel ranks: at construction one small
collective (rank 0's seed, and a check that every rank resolved the same backend), at each
step the all-reduce of the M score sums."""
from __future__ import annotations

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
