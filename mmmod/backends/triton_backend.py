"""``backend="triton"``: fused Triton kernels (``mmmod.kernels``), see docs/triton.md.

Per step and modality bucket: OGM / MLB is one launch (``k * g`` over every tensor of the
bucket); OGM-GE is three (chunk statistics, per-tensor sigma, noisy rescale), or the noisy
rescale alone when each tensor's sigma is given (``modulate_sigma_bucket_``: shards); the
moments of a shard bucket (``bucket_moments``) are the chunk statistics plus a merge. Scores
are one launch for all M modalities plus a one-program epilogue that can also evaluate the
coefficient rule (:meth:`TritonBackend.scores_and_coefficients`). Nothing here reads a device
value on the host. On CPU the kernels run only under ``TRITON_INTERPRET=1`` (tests).

Every launch goes through ``mmmod.kernels.launch`` (kernels/launch.py), the one place that sets
the launch options (``enable_fp_fusion=False``: each multiply and add rounds as in the
reference) and that ``tools/aot.py`` hooks to record the exact launches it then compiles ahead
of time.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
from pathlib import Path

import torch

from .. import _ops
from ..reference.moments import check_moments_inputs
from ..reference.modulate import check_sigma
from ..reference.philox import check_step, seed_int64
from ..reference.proximal import check_inputs as check_proximal_inputs
from .base import Backend
from .registry import forget_kernels

_METHOD_CODE = {"ogm": 1, "ogm_ge": 1, "mlb": 2, "none": 0}
_MASK32 = 0xFFFFFFFF

_launch_fn = None


def _launch(kernel, grid, *args, **kwargs):
    """Every launch goes through ``mmmod.kernels.launch`` (the launch options, and the hook
    ``tools/aot.py`` records launches with)."""
    global _launch_fn
    if _launch_fn is None:
        _load_kernels()
        _launch_fn = importlib.import_module("mmmod.kernels.launch").launch
    _launch_fn(kernel, grid, *args, **kwargs)


def _load_kernels():
    """``mmmod.kernels`` (installed, or mapped from the checkout's kernels/ when not installed)."""
    try:
        return importlib.import_module("mmmod.kernels")
    except ImportError:
        root = Path(__file__).resolve().parents[2] / "kernels"
        init = root / "__init__.py"
        if not init.is_file():
            raise
        spec = importlib.util.spec_from_file_location("mmmod.kernels", init,
                                                      submodule_search_locations=[str(root)])
        mod = importlib.util.module_from_spec(spec)
        sys.modules["mmmod.kernels"] = mod
        try:
            spec.loader.exec_module(mod)
        except BaseException:
            sys.modules.pop("mmmod.kernels", None)
            raise
        return mod


class _Kernels:
    """The kernel modules, imported on first use (so importing this file never needs Triton)."""

    def __init__(self):
        _load_kernels()
        imp = importlib.import_module
        self.bucket = imp("mmmod.kernels.bucket")
        self.score = imp("mmmod.kernels.score_kernel")
        self.stats = imp("mmmod.kernels.stats_kernel")
        self.modulate = imp("mmmod.kernels.modulate_kernel")
        self.utils = imp("mmmod.kernels.utils")


def _on(device: torch.device):
    """Launch on the tensors' GPU (Triton launches on the current device)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _warps(elements: int) -> int:
    return 8 if elements >= 4096 else 4


def _aligned(tensors) -> bool:
    """Whether every data pointer is 16-byte aligned: the kernels' ``ALIGNED`` variant then
    reads and writes full chunks with 16-byte vector accesses (a pointer read from the int64
    table carries no alignment the compiler could see). The noise kernel additionally needs
    every stream offset to be a multiple of 4 (its chunks follow Philox counters)."""
    return all(g.data_ptr() % 16 == 0 for g in tensors)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _cuda_ops_unclaimed(backend) -> bool:
    """Whether the mmmod ops need a CUDA implementation from Triton: a CUDA device and Triton
    are there but the CUDA extension is not loaded (``_ext.load`` caches its answer, so the
    extension cannot appear later in this process)."""
    if not torch.cuda.is_available() or not backend.available()[0]:
        return False
    from .. import _ext
    return _ext.load("cuda")[0] is None


class TritonBackend(Backend):
    name = "triton"
    devices = ("cuda",)  # and the CPU under TRITON_INTERPRET=1 (tests): see supports()
    priority = 20  # after the compiled CUDA extension

    #: elements per statistics / scaling program
    block = 4096
    #: Philox counters per noise program (4 * block_c elements) and its warps: 8 elements per
    #: thread; 16 per thread (1024 counters on 8 warps, or 512 on 8) spills registers on
    #: sm_80/sm_90 (tests/test_triton_aot.py, docs/triton.md)
    block_c = 256
    noise_warps = 4
    #: columns per step of the online log-sum-exp, and rows per scores program (upper bounds)
    score_block_c = 2048
    score_rows = 16
    #: partials per step of the fixed-order combines
    block_p = 256

    def __init__(self):
        self._k = None
        self._cache = None
        #: device types whose implementation of the mmmod ops are these kernels (CUDA when the
        #: CUDA extension is not loaded): calls on such data go through ``torch.ops.mmmod``,
        #: opaque ops that torch.compile traces without a graph break; elsewhere (the CPU
        #: interpreter, or next to the CUDA extension) the kernels are launched directly
        self.op_device_types = frozenset()
        if _cuda_ops_unclaimed(self):
            self.register_op_kernels("cuda")

    def _op_kernels(self) -> dict:
        """op name -> this backend's kernel of it (a function with the op's signature)."""
        return {
            "scores": self._op_scores,
            "coefficients": self._op_coefficients,
            "modulate_": self._op_modulate,
            "modulate_.capturable": self._op_modulate_capturable,
            "modulate_sigma_": self._op_modulate_sigma,
            "_bucket_moments": self._op_bucket_moments,
            "proximal_": self._op_proximal,
            "fused_sgd_": self._op_fused_sgd,
            "fused_adam_": self._op_fused_adam,
        }

    def register_op_kernels(self, device_type: str) -> None:
        """Make these kernels the ``device_type`` implementation of the mmmod ops."""
        _ops.register_kernels(device_type.upper(), self._op_kernels())
        self.op_device_types = self.op_device_types | {device_type}
        forget_kernels()  # resolved kernels of this device type now go through the dispatcher

    def op_kernel(self, op, device):
        """Through the dispatcher (an opaque op torch.compile traces without a graph break)
        where these kernels are the device type's implementation; the launcher itself
        elsewhere (the CPU interpreter, or next to the CUDA extension)."""
        fn = self._op_kernels().get(op)
        if fn is not None and torch.device(device).type in self.op_device_types:
            return _ops.overload(op)
        return fn

    # -- availability ---------------------------------------------------------------------
    def available(self):
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401
        except Exception as e:  # ImportError or a broken install
            return False, f"triton cannot be imported ({type(e).__name__}: {e})"
        return True, ""

    def supports(self, device):
        device = torch.device(device)
        if device.type == "cuda":
            return True
        if device.type == "cpu":
            return os.environ.get("TRITON_INTERPRET", "0") == "1"
        return False

    @property
    def modules(self) -> _Kernels:
        if self._k is None:
            self._k = _Kernels()
            self._cache = self._k.bucket.MetaCache()
        return self._k

    @property
    def meta_cache(self):
        self.modules
        return self._cache

    # -- scores and coefficients -----------------------------------------------------------
    def _launch_scores(self, logits, labels, method_code, alpha, beta_max, want_k):
        K = self.modules
        M = len(logits)
        device = labels.device
        B = labels.shape[0]
        scores = torch.empty(M, dtype=torch.float32, device=device)
        k = torch.empty(M, dtype=torch.float32, device=device) if want_k else scores
        zs = tuple(z.detach() for z in logits)
        max_c = max(z.shape[1] for z in zs)
        block_c = min(_next_pow2(max_c), self.score_block_c)
        rows = max(1, min(self.score_rows, _next_pow2(B), 4096 // block_c))
        n_blocks = -(-B // rows)
        partial = torch.empty(max(M * n_blocks, 1), dtype=torch.float32, device=device)
        if n_blocks > 0:
            _launch(
                K.score._scores_partial_kernel, (n_blocks,),
                zs, tuple(z.stride(0) for z in zs), tuple(z.stride(1) for z in zs),
                tuple(z.shape[1] for z in zs), labels, labels.stride(0), partial, B, n_blocks,
                M=M, ROWS=rows, BLOCK_C=block_c)
        _launch(
            K.score._finish_kernel, (1,),
            partial, n_blocks, scores, k, float(alpha), float(beta_max),
            M=M, M_P2=max(2, _next_pow2(M)), BLOCK_P=self.block_p,
            METHOD=method_code if want_k else 0, WRITE_SCORES=True)
        return scores, k

    def _scores_kernel(self, logits, labels):
        with _on(labels.device):
            scores, _ = self._launch_scores(logits, labels, 0, 0.0, 0.0, want_k=False)
        return scores

    @staticmethod
    def _check_coeff_args(M, method):
        if M < 2:
            raise ValueError(f"scores must be a 1-D tensor of M >= 2 modalities, got M = {M}")
        if method not in _METHOD_CODE:
            from ..reference.coefficients import METHODS
            raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")

    def _coefficients_kernel(self, scores, method, alpha, beta_max):
        if scores.dim() != 1:
            raise ValueError(f"scores must be a 1-D tensor of M >= 2 modalities, got shape "
                             f"{tuple(scores.shape)}")
        M = scores.shape[0]
        self._check_coeff_args(M, method)
        if method == "none":
            return torch.ones(M, dtype=torch.float32, device=scores.device)
        s = scores.detach().float().contiguous()
        k = torch.empty(M, dtype=torch.float32, device=s.device)
        with _on(s.device):
            _launch(
                self.modules.score._finish_kernel, (1,),
                s, 1, k, k, float(alpha), float(beta_max), M=M, M_P2=_next_pow2(M), BLOCK_P=2,
                METHOD=_METHOD_CODE[method], WRITE_SCORES=False)
        return k

    def scores_and_coefficients(self, logits, labels, method, alpha, beta_max=2.0):
        """Scores [M] and coefficients [M] in one launch plus one epilogue (no host sync)."""
        logits = list(logits)
        self._check_coeff_args(len(logits), method)
        if method == "none":
            s = self.scores(logits, labels)
            return s, torch.ones_like(s)
        with _on(labels.device):
            return self._launch_scores(logits, labels, _METHOD_CODE[method], alpha, beta_max,
                                       want_k=True)

    # -- modulation ------------------------------------------------------------------------
    def _modulate_kernels(self, tensors, offsets, k, gate, noise, noise_std, seed, step,
                          modality):
        if tensors and tensors[0].device.type == "cuda":
            with _on(tensors[0].device):
                return self._modulate(tensors, offsets, k, gate, noise, noise_std, seed, step,
                                      modality)
        return self._modulate(tensors, offsets, k, gate, noise, noise_std, seed, step, modality)

    def _modulate(self, tensors, offsets, k, gate, noise, noise_std, seed, step, modality):
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
        K = self.modules
        DT = K.utils.tl_dtype(dtype)
        k = k.detach().to(device=device, dtype=torch.float32).reshape(1)
        if not noise:
            flat = K.bucket.flat_view(ts)
            if flat is not None:  # flat gradient buffer: one contiguous range, no table
                n = flat.numel()
                _launch(
                    K.modulate._scale_kernel, (-(-n // self.block),),
                    flat, flat, k, flat, n, BLOCK=self.block, DT=DT, FLAT=True,
                    ALIGNED=flat.data_ptr() % 16 == 0, num_warps=_warps(self.block))
                return
            meta = self._cache.get(ts, offs, self.block, self.block_c)
            _launch(
                K.modulate._scale_kernel, (meta.n_stats_chunks,),
                meta.meta, meta.stats_map, k, g0, 0, BLOCK=self.block, DT=DT, FLAT=False,
                ALIGNED=_aligned(ts), num_warps=_warps(self.block))
            return
        if noise_std not in ("raw", "scaled"):
            raise ValueError(f"noise_std must be 'raw' or 'scaled', got {noise_std!r}")
        if gate is None:
            gate = torch.ones(1, dtype=torch.float32, device=device)
        gate = gate.detach().to(device=device, dtype=torch.float32).reshape(1)
        meta = self._cache.get(ts, offs, self.block, self.block_c)
        part = torch.empty(2 * meta.n_stats_chunks, dtype=torch.float64, device=device)
        sigma = torch.empty(meta.num_tensors, dtype=torch.float32, device=device)
        aligned = _aligned(ts)
        _launch(
            K.stats._stats_partial_kernel, (meta.n_stats_chunks,),
            meta.meta, meta.stats_map, part, BLOCK=self.block, DT=DT, ALIGNED=aligned,
            num_warps=_warps(self.block))
        _launch(
            K.stats._sigma_kernel, (meta.num_tensors,),
            meta.meta, part, k, gate, sigma, BLOCK=self.block, BLOCK_P=self.block_p,
            SCALED=noise_std == "scaled")
        seed = seed_int64(seed)  # the kernel argument stays int64 (same 64 bits)
        step, step_ptr = self._step_args(step, device)
        _launch(
            K.modulate._modulate_noise_kernel, (meta.n_noise_chunks,), meta.meta, meta.noise_map,
            k, sigma, seed, step, step_ptr, int(modality), BLOCK_C=self.block_c, DT=DT,
            STEP_PTR=step_ptr is not None, ALIGNED=aligned and all(o % 4 == 0 for o in offs),
            num_warps=self.noise_warps)

    def _modulate_sigma_kernel(self, tensors, offsets, k, gate, sigma, seed, step, modality):
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
        with _on(device):
            K = self.modules
            k = k.detach().to(device=device, dtype=torch.float32).reshape(1)
            gate = (torch.ones((), dtype=torch.float32, device=device) if gate is None
                    else gate.detach().to(device=device, dtype=torch.float32).reshape(()))
            sg = torch.where(torch.isfinite(sigma), sigma, torch.zeros_like(sigma)) * gate
            meta = self._cache.get(tensors, offs, self.block, self.block_c)
            step, step_ptr = self._step_args(step, device)
            _launch(
                K.modulate._modulate_noise_kernel, (meta.n_noise_chunks,), meta.meta,
                meta.noise_map, k, sg, seed_int64(seed), step, step_ptr, int(modality),
                BLOCK_C=self.block_c, DT=K.utils.tl_dtype(dtype), STEP_PTR=step_ptr is not None,
                ALIGNED=_aligned(live) and all(o % 4 == 0 for o, g in zip(offs, tensors)
                                               if g.numel() > 0),
                num_warps=self.noise_warps)

    # -- per-tensor moments (sharded OGM-GE's statistics) ---------------------------------------
    def _bucket_moments_kernel(self, tensors):
        """The statistics kernel's chunk partials, then one program per tensor combining them
        in the sigma kernel's fixed order (``_moments_kernel``): two launches, no atomics, the
        same bits on every run. Every tensor keeps its table row (an empty one owns no chunk
        and gets ``(0, 0, 0)``); a non-contiguous tensor is read through a contiguous copy."""
        check_moments_inputs(tensors)
        if not tensors:
            return torch.zeros((0, 3), dtype=torch.float64)
        device = tensors[0].device
        out = torch.zeros((len(tensors), 3), dtype=torch.float64, device=device)
        ts = [g.detach().contiguous() for g in tensors]
        live = [g for g in ts if g.numel() > 0]
        if not live:
            return out
        with _on(device):
            K = self.modules
            meta = self._cache.get(ts, [0] * len(ts), self.block, self.block_c)
            part = torch.empty(2 * meta.n_stats_chunks, dtype=torch.float64, device=device)
            _launch(
                K.stats._stats_partial_kernel, (meta.n_stats_chunks,),
                meta.meta, meta.stats_map, part, BLOCK=self.block,
                DT=K.utils.tl_dtype(ts[0].dtype), ALIGNED=_aligned(live),
                num_warps=_warps(self.block))
            _launch(
                K.stats._moments_kernel, (meta.num_tensors,),
                meta.meta, part, out, BLOCK=self.block, BLOCK_P=self.block_p)
        return out

    # -- the kernels of the mmmod ops (signatures of mmmod/_ops) --------------------------------
    def _op_scores(self, logits, labels):
        return self._scores_kernel(list(logits), labels)

    def _op_coefficients(self, scores, method, alpha, beta_max):
        return self._coefficients_kernel(scores, _ops.rule_of(method).label, alpha, beta_max)

    def _op_modulate(self, tensors, offsets, k, gate, noise, scaled, seed, step, modality):
        self._modulate_kernels(tensors, offsets, k, gate, noise, "scaled" if scaled else "raw",
                               seed, step, modality)

    def _op_modulate_capturable(self, tensors, offsets, k, gate, noise, scaled, seed, step,
                                modality, table=None, step_tensor=None):
        if table is not None:
            raise ValueError("mmmod.modulate_: the Triton kernels keep their own bucket tables "
                             "(table must be None)")
        self._modulate_kernels(tensors, offsets, k, gate, noise, "scaled" if scaled else "raw",
                               seed, step if step_tensor is None else step_tensor, modality)

    def _op_modulate_sigma(self, tensors, offsets, k, gate, sigma, seed, step, modality,
                           table=None, step_tensor=None):
        if table is not None:
            raise ValueError("mmmod.modulate_sigma_: the Triton kernels keep their own bucket "
                             "tables (table must be None)")
        self._modulate_sigma_kernel(list(tensors), offsets, k, gate, sigma, seed,
                                    step if step_tensor is None else step_tensor, modality)

    def _op_bucket_moments(self, tensors):
        return self._bucket_moments_kernel(list(tensors))

    def _op_proximal(self, grads, params, snapshots, beta):
        check_proximal_inputs(grads, params, snapshots, beta)
        _load_kernels()
        from mmmod.kernels import proximal_kernel
        return proximal_kernel.proximal_(grads, params, snapshots, beta)

    def _op_fused_sgd(self, params, grads, momentum_buffers, buffer_ready, offsets, k, sigma,
                      update_scale, lr, weight_decay, momentum, dampening, nesterov, maximize,
                      seed, step, modality):
        _load_kernels()
        from mmmod.kernels import fused_update_kernel as fk
        fk.sgd_(params, grads, momentum_buffers, buffer_ready, offsets, k, sigma, update_scale,
                lr=lr, weight_decay=weight_decay, momentum=momentum, dampening=dampening,
                nesterov=nesterov, maximize=maximize, seed=seed, step=step, modality=modality)

    def _op_fused_adam(self, params, grads, exp_avgs, exp_avg_sqs, steps, offsets, k, sigma,
                       update_scale, lr, beta1, beta2, eps, weight_decay, decoupled, maximize,
                       seed, step, modality):
        _load_kernels()
        from mmmod.kernels import fused_update_kernel as fk
        fk.adam_(params, grads, exp_avgs, exp_avg_sqs, steps, offsets, k, sigma, update_scale,
                 lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                 decoupled=decoupled, maximize=maximize, seed=seed, step=step, modality=modality)

    @staticmethod
    def _step_args(step, device):
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

    def sigmas(self, tensors, k, *, noise_std="raw", gate=None):
        """The per-tensor sigma the noisy modulation would use (float32 [T], for tests/tools)."""
        ts = [g for g in tensors if g.numel() > 0]
        with _on(ts[0].device):
            return self._sigmas(ts, k, noise_std, gate)

    def _sigmas(self, ts, k, noise_std, gate):
        K = self.modules
        device = ts[0].device
        k = k.detach().to(device=device, dtype=torch.float32).reshape(1)
        gate = (torch.ones(1, dtype=torch.float32, device=device) if gate is None
                else gate.detach().to(device=device, dtype=torch.float32).reshape(1))
        offs, run = [], 0  # each tensor's first element in the stream (only its size matters)
        for g in ts:
            offs.append(run)
            run += g.numel()
        meta = self._cache.get(ts, offs, self.block, self.block_c)
        part = torch.empty(2 * meta.n_stats_chunks, dtype=torch.float64, device=device)
        sigma = torch.empty(meta.num_tensors, dtype=torch.float32, device=device)
        DT = K.utils.tl_dtype(ts[0].dtype)
        _launch(
            K.stats._stats_partial_kernel, (meta.n_stats_chunks,),
            meta.meta, meta.stats_map, part, BLOCK=self.block, DT=DT, ALIGNED=_aligned(ts),
            num_warps=_warps(self.block))
        _launch(
            K.stats._sigma_kernel, (meta.num_tensors,),
            meta.meta, part, k, gate, sigma, BLOCK=self.block, BLOCK_P=self.block_p,
            SCALED=noise_std == "scaled")
        return sigma
