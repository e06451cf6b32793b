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
goes from pinned memory with ``non_blocking=True`` (no host sync). The pinned source is dropped
right after the copy is enqueued: torch's copy records the copy's stream on the pinned block
(``CachingHostAllocator_recordEvent`` in aten's Copy.cu) and its caching host allocator recycles
a freed block only after an event on that stream has completed (ATen/core/CachingHostAllocator.h),
so the source lives exactly until the copy is done. A table built while a CUDA graph is being
captured keeps its source: the captured memcpy node reads it again at every replay.

Lifetime of the device tables (:class:`MetaCache`): LRU, bounded by entries and by bytes. An
entry built or used while the current stream is capturing a CUDA graph is *pinned*: the graph
holds its device pointers, so it is never evicted and ``clear()`` keeps it; it is released by
``clear(force=True)`` once the graphs that used it are gone. A table used on a stream other than
the one it was allocated on is ``record_stream``-ed on that stream, so the caching allocator
does not hand its memory out while kernels there may still read it.

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
CACHE_BYTES = 64 << 20  # device table bytes kept by the LRU (unpinned entries)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def noise_chunks(numel: int, offset: int, block_c: int) -> int:
    """Noise chunks of a tensor: its Philox counters off//4 .. (off+numel-1)//4 in BLOCK_C groups."""
    if numel == 0:
        return 0
    first, last = offset // 4, (offset + numel - 1) // 4
    return _cdiv(last - first + 1, block_c)


def capturing(device: torch.device) -> bool:
    """Whether the current stream of ``device`` is capturing a CUDA graph (False off CUDA)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def current_stream(device: torch.device):
    """The current stream of a CUDA ``device`` (None elsewhere: nothing to track)."""
    return torch.cuda.current_stream(device) if device.type == "cuda" else None


class BucketMeta:
    """The device table of one bucket (see the module docstring)."""

    def __init__(self, tensors: Sequence[torch.Tensor], offsets: Sequence[int], block: int,
                 block_c: int, *, keep_host: bool = False):
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
        self._host = None
        if device.type == "cuda":
            host = host.pin_memory()
            buf = host.to(device, non_blocking=True)
            if keep_host:  # a captured memcpy node re-reads the source at every replay
                self._host = host
        else:
            buf = host.to(device)
        t = self.num_tensors * META_FIELDS
        self.buffer = buf
        self.nbytes = buf.numel() * buf.element_size()
        self.alloc_stream = current_stream(device)
        self.pinned = False  # set by MetaCache: used under graph capture, never evicted
        self.meta = buf[:t]
        self.stats_map = buf[t:t + self.n_stats_chunks]
        self.noise_map = buf[t + self.n_stats_chunks:]


class MetaCache:
    """LRU cache of :class:`BucketMeta`, keyed by the storages and stream offsets.

    Bounded by ``size`` entries and ``max_bytes`` bytes of device tables; pinned entries (built
    or used under CUDA graph capture) are never evicted and count towards neither bound, since
    nothing can be done about them until ``clear(force=True)``. ``capturing`` and ``stream``
    are the hooks that read the capture state and the current stream (replaceable in tests).
    """

    def __init__(self, size: int = CACHE_SIZE, max_bytes: int = CACHE_BYTES):
        self.size = size
        self.max_bytes = max_bytes
        self._d: OrderedDict = OrderedDict()
        self.builds = 0  # number of tables built (tests check reuse)
        self.capturing = capturing
        self.stream = current_stream
        self._count = 0   # unpinned entries
        self._nbytes = 0  # their device bytes

    @property
    def nbytes(self) -> int:
        """Bytes of device tables held by evictable (not pinned) entries."""
        return self._nbytes

    @property
    def pinned_entries(self) -> int:
        return len(self._d) - self._count

    def __len__(self) -> int:
        return len(self._d)

    def get(self, tensors, offsets, block: int, block_c: int) -> BucketMeta:
        device = tensors[0].device
        key = (device, tensors[0].dtype, block, block_c,
               tuple(g.data_ptr() for g in tensors), tuple(g.numel() for g in tensors),
               tuple(int(o) for o in offsets))
        under_capture = self.capturing(device)
        meta = self._d.get(key)
        if meta is not None:
            self._d.move_to_end(key)
        else:
            meta = BucketMeta(tensors, offsets, block, block_c, keep_host=under_capture)
            self.builds += 1
            self._d[key] = meta
            self._count += 1
            self._nbytes += meta.nbytes
        if under_capture and not meta.pinned:
            meta.pinned = True
            self._count -= 1
            self._nbytes -= meta.nbytes
        stream = self.stream(device)
        if stream is not None and stream != meta.alloc_stream:
            # kernels on this stream read the table: keep its memory from being reused before
            # they are done, even if the entry is evicted meanwhile
            meta.buffer.record_stream(stream)
        if self._count > self.size or self._nbytes > self.max_bytes:
            self._evict(keep=key)
        return meta

    def _evict(self, keep):
        """Drop least recently used unpinned entries until both bounds hold (never ``keep``,
        the entry being returned, even if it alone exceeds the byte bound)."""
        for key in list(self._d):
            if self._count <= self.size and self._nbytes <= self.max_bytes:
                break
            m = self._d[key]
            if m.pinned or key == keep:
                continue
            del self._d[key]
            self._count -= 1
            self._nbytes -= m.nbytes

    def clear(self, force: bool = False):
        """Drop every entry not pinned by a graph capture; with ``force=True`` drop them all.

        ``force=True`` is only safe once no CUDA graph captured with these tables will be
        replayed again (delete the graphs first)."""
        if force:
            self._d.clear()
        else:
            for key in [k for k, m in self._d.items() if not m.pinned]:
                del self._d[key]
        self._count, self._nbytes = 0, 0


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
