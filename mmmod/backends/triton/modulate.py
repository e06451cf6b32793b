"""Launchers of ops ``modulate_``, ``modulate_.capturable`` and ``modulate_sigma_`` (and of the
per-tensor sigma the fused update uses, :func:`sigmas`): kernels/modulate_kernel.py and
kernels/stats_kernel.py over one modality's bucket.

OGM / MLB is one launch (``k * g`` over every tensor of the bucket, ``_scale_kernel``); OGM-GE
is three (chunk statistics, per-tensor sigma, noisy rescale), or the noisy rescale alone when
each tensor's sigma is given (``modulate_sigma_``: shards). Nothing here reads a device value
on the host.
"""
from __future__ import annotations

import torch

from ...reference.modulate import check_sigma
from ...reference.philox import check_step, seed_int64
from .launch import aligned, launch, on, tl_dtype, warps
from .table import flat_view

_MASK32 = 0xFFFFFFFF


def step_args(step, device):
    """(step as an int, None) or (0, a 0-d integer tensor on ``device`` the kernel reads).

    A tensor already on the kernels' device is read by the kernel (a captured graph sees
    the counter advance). A CPU tensor for a GPU bucket is read here: a plain host memory
    read, where a copy would be a blocking transfer per bucket and fail under capture."""
    if not isinstance(step, torch.Tensor):
        return int(step) & _MASK32, None
    check_step(step)  # the kernel keeps the low 32 bits of whatever integer dtype
    if step.device == device:
        return 0, step
    if step.device.type == "cpu":
        return int(step) & _MASK32, None
    return 0, step.to(device)  # another accelerator: a device-to-device copy


def _stats_and_sigma(be, meta, ts, k, gate, noise_std):
    """Chunk statistics then one program per tensor: sigma float32 [T] (non-finite -> 0, times
    the gate)."""
    K = be.modules
    device = ts[0].device
    part = torch.empty(2 * meta.n_stats_chunks, dtype=torch.float64, device=device)
    sigma = torch.empty(meta.num_tensors, dtype=torch.float32, device=device)
    launch(
        K.stats._stats_partial_kernel, (meta.n_stats_chunks,),
        meta.meta, meta.stats_map, part, BLOCK=be.block, DT=tl_dtype(ts[0].dtype),
        ALIGNED=aligned(ts), num_warps=warps(be.block))
    launch(
        K.stats._sigma_kernel, (meta.num_tensors,),
        meta.meta, part, k, gate, sigma, BLOCK=be.block, BLOCK_P=be.block_p,
        SCALED=noise_std == "scaled")
    return sigma


def modulate_bucket(be, tensors, offsets, k, gate, noise, noise_std, seed, step, modality):
    """``g <- k g (+ gate sigma n)`` in place over one bucket (the ``modulate_`` ops)."""
    if tensors and tensors[0].device.type == "cuda":
        with on(tensors[0].device):
            return _modulate(be, tensors, offsets, k, gate, noise, noise_std, seed, step,
                             modality)
    return _modulate(be, tensors, offsets, k, gate, noise, noise_std, seed, step, modality)


def _modulate(be, tensors, offsets, k, gate, noise, noise_std, seed, step, modality):
    pairs = [(g, int(o)) for g, o in zip(tensors, offsets) if g.numel() > 0]
    if not pairs:
        return
    ts = [g for g, _ in pairs]
    offs = [o for _, o in pairs]
    g0 = ts[0]
    device, dtype = g0.device, g0.dtype
    for g in ts:
        if g.device != device or g.dtype != dtype:
            raise ValueError("a bucket must hold tensors of one device and one dtype")
        if not g.is_contiguous():
            raise ValueError("bucket tensors must be contiguous")
    K = be.modules
    DT = tl_dtype(dtype)
    k = k.detach().to(device=device, dtype=torch.float32).reshape(1)
    if not noise:
        flat = flat_view(ts)
        if flat is not None:  # flat gradient buffer: one contiguous range, no table
            n = flat.numel()
            launch(
                K.modulate._scale_kernel, (-(-n // be.block),),
                flat, flat, k, flat, n, BLOCK=be.block, DT=DT, FLAT=True,
                ALIGNED=flat.data_ptr() % 16 == 0, num_warps=warps(be.block))
            return
        meta = be.meta_cache.get(ts, offs, be.block, be.block_c)
        launch(
            K.modulate._scale_kernel, (meta.n_stats_chunks,),
            meta.meta, meta.stats_map, k, g0, 0, BLOCK=be.block, DT=DT, FLAT=False,
            ALIGNED=aligned(ts), num_warps=warps(be.block))
        return
    if noise_std not in ("raw", "scaled"):
        raise ValueError(f"noise_std must be 'raw' or 'scaled', got {noise_std!r}")
    if gate is None:
        gate = torch.ones(1, dtype=torch.float32, device=device)
    gate = gate.detach().to(device=device, dtype=torch.float32).reshape(1)
    meta = be.meta_cache.get(ts, offs, be.block, be.block_c)
    sigma = _stats_and_sigma(be, meta, ts, k, gate, noise_std)
    seed = seed_int64(seed)  # the kernel argument stays int64 (same 64 bits)
    step, step_ptr = step_args(step, device)
    launch(
        K.modulate._modulate_noise_kernel, (meta.n_noise_chunks,), meta.meta, meta.noise_map,
        k, sigma, seed, step, step_ptr, int(modality), BLOCK_C=be.block_c, DT=DT,
        STEP_PTR=step_ptr is not None, ALIGNED=aligned(ts) and all(o % 4 == 0 for o in offs),
        num_warps=be.noise_warps)


def modulate_sigma_bucket(be, tensors, offsets, k, gate, sigma, seed, step, modality):
    """The noise kernel alone, fed the given sigma (finished on the device as the sigma
    kernel finishes its own: non-finite -> 0, times the gate). Every tensor keeps its table
    row, empty ones included (they own no chunk), so sigma is indexed by row as given: no
    gather."""
    check_sigma(tensors, offsets, sigma)
    offs = [int(o) for o in offsets]
    live = [g for g in tensors if g.numel() > 0]
    if not live:
        return
    device, dtype = tensors[0].device, tensors[0].dtype
    for g in tensors:
        if g.device != device or g.dtype != dtype:
            raise ValueError("a bucket must hold tensors of one device and one dtype")
        if not g.is_contiguous():
            raise ValueError("bucket tensors must be contiguous")
    if any(o < 0 for o in offs):
        raise ValueError(f"noise offset must be >= 0, got {min(offs)}")
    with on(device):
        K = be.modules
        k = k.detach().to(device=device, dtype=torch.float32).reshape(1)
        gate = (torch.ones((), dtype=torch.float32, device=device) if gate is None
                else gate.detach().to(device=device, dtype=torch.float32).reshape(()))
        sg = torch.where(torch.isfinite(sigma), sigma, torch.zeros_like(sigma)) * gate
        meta = be.meta_cache.get(tensors, offs, be.block, be.block_c)
        step, step_ptr = step_args(step, device)
        launch(
            K.modulate._modulate_noise_kernel, (meta.n_noise_chunks,), meta.meta,
            meta.noise_map, k, sg, seed_int64(seed), step, step_ptr, int(modality),
            BLOCK_C=be.block_c, DT=tl_dtype(dtype), STEP_PTR=step_ptr is not None,
            ALIGNED=aligned(live) and all(o % 4 == 0 for o, g in zip(offs, tensors)
                                          if g.numel() > 0),
            num_warps=be.noise_warps)


def sigmas(be, tensors, k, noise_std="raw", gate=None):
    """The per-tensor sigma the noisy modulation would use (float32 [T], for the fused update,
    tests and tools)."""
    ts = [g for g in tensors if g.numel() > 0]
    device = ts[0].device
    with on(device):
        k = k.detach().to(device=device, dtype=torch.float32).reshape(1)
        gate = (torch.ones(1, dtype=torch.float32, device=device) if gate is None
                else gate.detach().to(device=device, dtype=torch.float32).reshape(1))
        offs, run = [], 0  # each tensor's first element in the stream (only its size matters)
        for g in ts:
            offs.append(run)
            run += g.numel()
        meta = be.meta_cache.get(ts, offs, be.block, be.block_c)
        return _stats_and_sigma(be, meta, ts, k, gate, noise_std)


# -- the ops' signatures (mmmod/_ops) ----------------------------------------------------------
def modulate_(be, tensors, offsets, k, gate, noise, scaled, seed, step, modality):
    modulate_bucket(be, tensors, offsets, k, gate, noise, "scaled" if scaled else "raw", seed,
                    step, modality)


def modulate_capturable(be, tensors, offsets, k, gate, noise, scaled, seed, step, modality,
                        table=None, step_tensor=None):
    if table is not None:
        raise ValueError("mmmod.modulate_: the Triton kernels keep their own bucket tables "
                         "(table must be None)")
    modulate_bucket(be, tensors, offsets, k, gate, noise, "scaled" if scaled else "raw", seed,
                    step if step_tensor is None else step_tensor, modality)


def modulate_sigma_(be, tensors, offsets, k, gate, sigma, seed, step, modality, table=None,
                    step_tensor=None):
    if table is not None:
        raise ValueError("mmmod.modulate_sigma_: the Triton kernels keep their own bucket "
                         "tables (table must be None)")
    modulate_sigma_bucket(be, list(tensors), offsets, k, gate, sigma, seed,
                          step if step_tensor is None else step_tensor, modality)
