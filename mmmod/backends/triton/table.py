"""The multi-tensor tables of the Triton kernels (host side, no Triton code): one builder and
one cache for every launcher that hands many tensors to one launch (apex ``multi_tensor_apply``
style: a table of pointers and sizes plus a chunk -> tensor map).

Two layouts, one upload path and one cache (:class:`MetaCache`, owned by the backend object):
:class:`BucketMeta` (modulation, statistics, moments, the proximal correction) and
:class:`FusedTable` (the fused SGD / Adam update). Their word offsets are the ones the kernels
read (``kernels/utils.py`` holds :data:`META_FIELDS` and ``F_*`` as ``tl.constexpr``;
``kernels/fused_update_kernel.py`` reads the :data:`FUSED_FIELDS` words by position).

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

Lifetime of the device tables (:class:`MetaCache`, both layouts): LRU, bounded by entries and
by bytes. An entry built or used while the current stream is capturing a CUDA graph is
*pinned*: the graph holds its device pointers, so it is never evicted and ``clear()`` keeps it;
it is released by ``clear(force=True)`` once the graphs that used it are gone. A table used on a stream other than
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
#: int64 words per tensor of the fused update's table: gradient, parameter, state 1 and state 2
#: pointers, numel, stream offset, first chunk, flag (SGD: momentum buffer ready)
FUSED_FIELDS = 8
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


def _upload(table, words, device: torch.device, keep_host: bool) -> None:
    """Move the int64 ``words`` to ``device`` as ``table.buffer`` (module docstring: pinned
    source, non-blocking copy) and set what :class:`MetaCache` tracks of an entry."""
    host = torch.tensor(words, dtype=torch.int64)
    table._host = None
    if device.type == "cuda":
        host = host.pin_memory()
        buf = host.to(device, non_blocking=True)
        if keep_host:  # a captured memcpy node re-reads the source at every replay
            table._host = host
    else:
        buf = host.to(device)
    table.buffer = buf
    table.nbytes = buf.numel() * buf.element_size()
    table.alloc_stream = current_stream(device)
    table.pinned = False  # set by MetaCache: used under graph capture, never evicted


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
        _upload(self, rows + smap + nmap, device, keep_host)
        t = self.num_tensors * META_FIELDS
        buf = self.buffer
        self.meta = buf[:t]
        self.stats_map = buf[t:t + self.n_stats_chunks]
        self.noise_map = buf[t + self.n_stats_chunks:]


def fused_words(grads, params, states1, states2, offsets, flags, block_c: int):
    """The :class:`FusedTable` rows (``FUSED_FIELDS`` words per tensor) and chunk map (chunk ->
    tensor, the tensor's noise chunks). A state may be absent (``None``: pointer 0, never
    dereferenced); an empty tensor keeps its row and owns no chunk."""
    rows, cmap = [], []
    for t, (g, p, s1, s2, off, fl) in enumerate(zip(grads, params, states1, states2, offsets,
                                                    flags)):
        n = g.numel()
        rows += [g.data_ptr(), p.data_ptr(), 0 if s1 is None else s1.data_ptr(),
                 0 if s2 is None else s2.data_ptr(), n, int(off), len(cmap), int(bool(fl))]
        cmap += [t] * noise_chunks(n, int(off), block_c)
    return rows, cmap


class FusedTable:
    """The device table of one fused-update bucket: ``table`` (``FUSED_FIELDS`` int64 words
    per tensor, see :func:`fused_words`) and ``chunk_map`` (``n_chunks`` words), one buffer."""

    def __init__(self, rows, cmap, num_tensors: int, device: torch.device, *,
                 keep_host: bool = False):
        _upload(self, rows + cmap, device, keep_host)
        self.num_tensors = num_tensors
        self.n_chunks = len(cmap)
        self.table = self.buffer
        self.chunk_map = self.buffer[FUSED_FIELDS * num_tensors:]


class MetaCache:
    """LRU cache of the device tables (:class:`BucketMeta`, :class:`FusedTable`), keyed by
    the storages, sizes, stream offsets (and flags) they describe.

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
        self._flags: dict = {}

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
        """The :class:`BucketMeta` of ``tensors`` (built once per storages, sizes, offsets)."""
        device = tensors[0].device
        key = ("bucket", device, tensors[0].dtype, block, block_c,
               tuple(g.data_ptr() for g in tensors), tuple(g.numel() for g in tensors),
               tuple(int(o) for o in offsets))
        return self._lookup(key, device, lambda keep_host: BucketMeta(
            tensors, offsets, block, block_c, keep_host=keep_host))

    def fused(self, grads, params, states1, states2, offsets, flags, block_c: int) -> FusedTable:
        """The :class:`FusedTable` of one fused-update bucket, reused while every word of it
        (storages, sizes, offsets, flags) stays put: every step after the first with
        ``set_to_none=False`` gradients uploads nothing."""
        device = params[0].device
        rows, cmap = fused_words(grads, params, states1, states2, offsets, flags, block_c)
        key = ("fused", device, block_c, tuple(rows))
        return self._lookup(key, device, lambda keep_host: FusedTable(
            rows, cmap, len(params), device, keep_host=keep_host))

    def flags(self, values, device: torch.device) -> torch.Tensor:
        """A small int32 device tensor of ``values`` (per-tensor flags that depend on the shapes
        only), built once per device and values and kept for the cache's lifetime."""
        key = (device, tuple(int(v) for v in values))
        hit = self._flags.get(key)
        if hit is None:
            hit = torch.tensor(key[1], dtype=torch.int32, device=device)
            self._flags[key] = hit
        return hit

    def _lookup(self, key, device, build):
        """The entry under ``key``, built by ``build(keep_host)`` when missing; pins it under
        graph capture, records the using stream, evicts to the bounds."""
        under_capture = self.capturing(device)
        meta = self._d.get(key)
        if meta is not None:
            self._d.move_to_end(key)
        else:
            meta = build(under_capture)
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
            self._flags.clear()
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
