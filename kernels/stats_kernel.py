"""Per-tensor statistics of a bucket: the noise scale sigma of every tensor, on the device.

``_stats_partial_kernel``: grid = the bucket's statistics chunks (BLOCK elements of one tensor
each, found through the metadata table). Each program loads its chunk once (16-byte vector
loads for a full chunk when ``ALIGNED``: the host checked every data pointer), converts to
float64 and writes ``(sum, M2)`` of the chunk, with M2 the sum of squared deviations from the
chunk's own mean (corrected two-pass in registers: no cancellation, no overflow of float32
squares).

``_sigma_kernel``: one program per tensor. It combines the tensor's chunk partials in a fixed
order (blocked vector sums in float64: first the total sum -> mean, then
``M2 = sum_c M2_c + n_c (mean_c - mean)^2``, the exact parallel-axis identity), takes the
unbiased std (0 below two elements), optionally scales it by |k| (``noise_std="scaled"``),
adds 1e-8 in float64, rounds to float32, zeroes a non-finite sigma and multiplies by the gate:
``sigma = float32(std64 + 1e-8) * gate`` exactly as the reference. Same bits on every run.

``_moments_kernel``: the same per-tensor combine (``_tensor_moments``), written as float64
``(count, mean, M2)`` rows: the ``_bucket_moments`` op, whose rows sharded OGM-GE gathers
across the ranks holding a tensor's shards (mmmod/optim/sharding.py).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .utils import F_NUMEL, F_PTR, F_SCHUNK, META_FIELDS


@triton.jit
def _stats_partial_kernel(meta, stats_map, part, BLOCK: tl.constexpr, DT: tl.constexpr,
                          ALIGNED: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(stats_map + pid)
    row = meta + t * META_FIELDS
    ptr = tl.load(row + F_PTR).to(tl.pointer_type(DT))
    n = tl.load(row + F_NUMEL)
    j = pid - tl.load(row + F_SCHUNK)
    start = j * BLOCK
    idx = start + tl.arange(0, BLOCK).to(tl.int64)
    msk = idx < n
    if ALIGNED:
        # the host checked every data pointer is 16-byte aligned; start is a multiple of BLOCK,
        # so a full chunk is read with 16-byte vector loads (the mask idx < n, n read from the
        # table, would force one scalar access per element); only a tensor's last, partial
        # chunk takes the masked path
        ptr = tl.multiple_of(ptr, 16)
        if start + BLOCK <= n:
            x = tl.load(ptr + idx).to(tl.float64)
        else:
            x = tl.load(ptr + idx, mask=msk, other=0.0).to(tl.float64)
    else:
        x = tl.load(ptr + idx, mask=msk, other=0.0).to(tl.float64)
    cnt = tl.minimum(n - start, BLOCK).to(tl.float64)
    s = tl.sum(x, axis=0)
    mean = s / cnt
    d = tl.where(msk, x - mean, 0.0)
    sd = tl.sum(d, axis=0)
    m2 = tl.sum(d * d, axis=0) - sd * sd / cnt
    m2 = tl.where(m2 < 0.0, 0.0, m2)
    tl.store(part + 2 * pid, s)
    tl.store(part + 2 * pid + 1, m2)


@triton.jit
def _tensor_moments(meta, part, t, BLOCK: tl.constexpr, BLOCK_P: tl.constexpr):
    """(count, mean, M2) of tensor ``t`` in float64 from its chunk partials, combined in a
    fixed order: the total sum -> mean, then ``M2 = sum_c M2_c + n_c (mean_c - mean)^2``."""
    row = meta + t * META_FIELDS
    n = tl.load(row + F_NUMEL)
    c_first = tl.load(row + F_SCHUNK)
    n_chunks = (n + BLOCK - 1) // BLOCK
    pj = tl.arange(0, BLOCK_P).to(tl.int64)
    acc = tl.zeros([BLOCK_P], tl.float64)
    for b0 in range(0, n_chunks, BLOCK_P):
        cj = b0 + pj
        acc += tl.load(part + 2 * (c_first + cj), mask=cj < n_chunks, other=0.0)
    nf = n.to(tl.float64)
    mean = tl.sum(acc, axis=0) / tl.maximum(nf, 1.0)  # an empty tensor: 0, not 0 / 0
    acc2 = tl.zeros([BLOCK_P], tl.float64)
    for b0 in range(0, n_chunks, BLOCK_P):
        cj = b0 + pj
        cm = cj < n_chunks
        sc = tl.load(part + 2 * (c_first + cj), mask=cm, other=0.0)
        m2c = tl.load(part + 2 * (c_first + cj) + 1, mask=cm, other=0.0)
        cnt = tl.minimum(n - cj * BLOCK, BLOCK).to(tl.float64)
        cnt = tl.where(cm, cnt, 1.0)
        dm = sc / cnt - mean
        acc2 += tl.where(cm, m2c + cnt * dm * dm, 0.0)
    m2 = tl.sum(acc2, axis=0)
    return n, nf, mean, m2


@triton.jit
def _sigma_kernel(meta, part, k_ptr, gate_ptr, sigma_out, BLOCK: tl.constexpr,
                  BLOCK_P: tl.constexpr, SCALED: tl.constexpr):
    t = tl.program_id(0)
    n, nf, mean, m2 = _tensor_moments(meta, part, t, BLOCK, BLOCK_P)
    var = m2 / tl.maximum(nf - 1.0, 1.0)
    std = tl.where(n < 2, 0.0, tl.sqrt(var))
    if SCALED:
        k = tl.load(k_ptr).to(tl.float64)
        std = std * tl.abs(k)
    sigma = (std + 1e-8).to(tl.float32)
    sigma = tl.where(tl.abs(sigma) < float("inf"), sigma, 0.0)  # NaN/inf -> no noise
    gate = tl.load(gate_ptr)
    tl.store(sigma_out + t, sigma * gate)


@triton.jit
def _moments_kernel(meta, part, out, BLOCK: tl.constexpr, BLOCK_P: tl.constexpr):
    """One program per tensor: its float64 ``(count, mean, M2)`` row, ``(0, 0, 0)`` for an
    empty tensor (it owns no chunk)."""
    t = tl.program_id(0)
    n, nf, mean, m2 = _tensor_moments(meta, part, t, BLOCK, BLOCK_P)
    tl.store(out + 3 * t, nf)
    tl.store(out + 3 * t + 1, mean)
    tl.store(out + 3 * t + 2, m2)
