"""Bucket metadata for the multi-tensor kernels (host side, no Triton code).

A *bucket* is the gradients of one modality on one device with one dtype. The kernels see it
through one small int64 table, built on the host once per distinct set of gradient storages
and reused while the ``data_ptr`` tuple is unchanged (a new table after
``zero_grad(set_to_none=True)`` hands out new storages):

``meta[T, META_FIELDS]`` per tensor: data pointer, numel, first element in the modality's noise
stream (Philox offset), first statistics/scale chunk, first noise chunk.
``stats_map[n_stats_chunks]``: the tensor each statistics/scale chunk belongs to.
``noise_map[n_noise_chunks]``: the tensor each noise chunk belongs to.

All three live in one int64 buffer so one host-to-device copy moves them; on CUDA the copy
goes from pinned memory with ``non_blocking=True`` (no host sync), and the pinned source is
kept alive in the cache entry.

Statistics / noise-free scaling chunks cover ``BLOCK`` consecutive elements of one tensor.
Noise chunks are aligned to Philox counters: chunk j of a tensor with noise offset ``off``
covers counters ``off // 4 + j * BLOCK_C ... + BLOCK_C - 1``, i.e. the 4 * BLOCK_C stream
elements those counters produce (clipped to the tensor), so every Philox call yields four
normals that are all used (except at the two ends of a tensor).

The alternative, a flat view (all tensors back to back in one storage, as DDP's
``gradient_as_bucket_view``), is detected by :func:`flat_view`; the noise-free scaling then
runs over one contiguous range without a table. See docs/triton.md.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch

META_FIELDS = 5
F_PTR, F_NUMEL, F_OFFSET, F_SCHUNK, F_NCHUNK = range(META_FIELDS)
CACHE_SIZE = 256


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def noise_chunks(numel: int, offset: int, block_c: int) -> int:
    """Noise chunks of a tensor: its Philox counters off//4 .. (off+numel-1)//4 in BLOCK_C groups."""
    if numel == 0:
        return 0
    first, last = offset // 4, (offset + numel - 1) // 4
    return _cdiv(last - first + 1, block_c)


class BucketMeta:
    """The device table of one bucket (see the module docstring)."""

    def __init__(self, tensors: Sequence[torch.Tensor], offsets: Sequence[int], block: int,
                 block_c: int):
        device = tensors[0].device
        rows, smap, nmap = [], [], []
        for t, (g, off) in enumerate(zip(tensors, offsets)):
            n = g.numel()
            off = int(off)
            if off < 0:
                raise ValueError(f"noise offset must be >= 0, got {off}")
            ns, nn = _cdiv(n, block), noise_chunks(n, off, block_c)
            rows += [g.data_ptr(), n, off, len(smap), len(nmap)]
            smap += [t] * ns
            nmap += [t] * nn
        self.num_tensors = len(tensors)
        self.n_stats_chunks = len(smap)
        self.n_noise_chunks = len(nmap)
        self.block, self.block_c = block, block_c
        host = torch.tensor(rows + smap + nmap, dtype=torch.int64)
        if device.type == "cuda":
            host = host.pin_memory()
            self._host = host  # keep the pinned source alive while the async copy runs
            buf = host.to(device, non_blocking=True)
        else:
            self._host = None
            buf = host.to(device)
        t = self.num_tensors * META_FIELDS
        self.buffer = buf
        self.meta = buf[:t]
        self.stats_map = buf[t:t + self.n_stats_chunks]
        self.noise_map = buf[t + self.n_stats_chunks:]
        self.numels = [g.numel() for g in tensors]


class MetaCache:
    """LRU cache of :class:`BucketMeta`, keyed by the storages and stream offsets."""

    def __init__(self, size: int = CACHE_SIZE):
        self.size = size
        self._d: OrderedDict = OrderedDict()
        self.builds = 0  # number of tables built (tests check reuse)

    def get(self, tensors, offsets, block: int, block_c: int) -> BucketMeta:
        key = (tensors[0].device, tensors[0].dtype, block, block_c,
               tuple(g.data_ptr() for g in tensors), tuple(g.numel() for g in tensors),
               tuple(int(o) for o in offsets))
        hit = self._d.get(key)
        if hit is not None:
            self._d.move_to_end(key)
            return hit
        meta = BucketMeta(tensors, offsets, block, block_c)
        self.builds += 1
        self._d[key] = meta
        if len(self._d) > self.size:
            self._d.popitem(last=False)
        return meta

    def clear(self):
        self._d.clear()


def flat_view(tensors: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """A 1-D view over all tensors if they lie back to back in one storage, else None.

    This is the persistent flat gradient buffer case (each ``.grad`` a view into one bucket
    buffer): one launch can then walk a single contiguous range.
    """
    if not tensors:
        return None
    first = tensors[0]
    try:
        storage = first.untyped_storage()
    except RuntimeError:
        return None
    start = first.storage_offset()
    pos = start
    for g in tensors:
        if not g.is_contiguous() or g.storage_offset() != pos:
            return None
        if g.untyped_storage().data_ptr() != storage.data_ptr():
            return None
        pos += g.numel()
    return first.as_strided((pos - start,), (1,), start)


def make_flat_grads(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """Allocate one zeroed flat buffer and make each parameter's ``.grad`` a view into it.

    Autograd then accumulates into the views (as long as the grads are not set to None), so a
    bucket's gradients form one contiguous range (see :func:`flat_view`).
    """
    if not params:
        raise ValueError("no parameters")
    dtype, device = params[0].dtype, params[0].device
    total = sum(p.numel() for p in params)
    buf = torch.zeros(total, dtype=dtype, device=device)
    pos = 0
    for p in params:
        if p.dtype != dtype or p.device != device:
            raise ValueError("a flat gradient buffer needs one dtype and one device")
        p.grad = buf[pos:pos + p.numel()].view_as(p)
        pos += p.numel()
    return buf
