"""``backend="triton"``: fused Triton kernels (``mmmod.kernels``, the repository's kernels/),
see docs/triton.md.

This package declares the backend (:class:`TritonBackend`: devices, priority, why it is not
available, a kernel per op) and holds one launcher file per op (Liger-Kernel style), each
calling the @triton.jit code of kernels/:

==================  ================================================================
``scores.py``       op ``scores``: one launch for all M modalities + an epilogue
``coefficients.py`` op ``coefficients``; the fused scores + coefficients
``modulate.py``     ops ``modulate_`` (and ``.capturable``), ``modulate_sigma_``; sigmas
``moments.py``      op ``_bucket_moments`` (sharded OGM-GE's statistics)
``proximal.py``     op ``proximal_`` (InfoReg)
``fused_update.py`` ops ``fused_sgd_`` / ``fused_adam_``
``combine.py``      ops ``_pair_moments`` / ``combine_`` (MMPareto's combine)
``table.py``        the one multi-tensor table builder and its cache (owned by the backend)
``launch.py``       the one launch point (FMA contraction off, the hook tools/aot.py records)
``kernels.py``      imports ``mmmod.kernels`` on first use (importing this never needs Triton)
==================  ================================================================

Nothing here reads a device value on the host. On CPU the kernels run only under
``TRITON_INTERPRET=1`` (tests).
"""
from __future__ import annotations

import functools
import os

import torch

from ... import _ops
from ..base import Backend
from ..registry import forget_kernels
from . import coefficients, combine, fused_update, moments, modulate, proximal, scores
from .modulate import step_args


def _cuda_ops_unclaimed(backend) -> bool:
    """Whether the mmmod ops need a CUDA implementation from Triton: a CUDA device and Triton
    are there but the CUDA extension is not loaded (``_ext.load`` caches its answer, so the
    extension cannot appear later in this process)."""
    if not torch.cuda.is_available() or not backend.available()[0]:
        return False
    from ... import _ext
    return _ext.load("cuda")[0] is None


class TritonBackend(Backend):
    name = "triton"
    devices = ("cuda",)  # and the CPU under TRITON_INTERPRET=1 (tests): see supports()
    priority = 20  # after the compiled CUDA extension

    #: elements per statistics / scaling program
    block = 4096
    #: Philox counters per noise program (4 * block_c elements) and its warps: 8 elements per
    #: thread; 16 per thread (1024 counters on 8 warps, or 512 on 8) spills registers on
    #: sm_80/sm_90 (tests/kernels/test_triton_aot.py, docs/triton.md)
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
        bind = functools.partial
        return {
            "scores": bind(scores.scores, self),
            "coefficients": bind(coefficients.coefficients, self),
            "modulate_": bind(modulate.modulate_, self),
            "modulate_.capturable": bind(modulate.modulate_capturable, self),
            "modulate_sigma_": bind(modulate.modulate_sigma_, self),
            "_bucket_moments": bind(moments.bucket_moments, self),
            "proximal_": bind(proximal.proximal_, self),
            "fused_sgd_": bind(fused_update.fused_sgd_, self),
            "fused_adam_": bind(fused_update.fused_adam_, self),
            "_pair_moments": bind(combine.pair_moments, self),
            "combine_": bind(combine.combine_, self),
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

    # -- what the launchers share: the kernel modules and the table cache ---------------------
    @property
    def modules(self):
        """The kernel modules (:class:`~mmmod.backends.triton.kernels.Kernels`), imported on
        first use."""
        if self._k is None:
            from .kernels import Kernels
            self._k = Kernels()
        return self._k

    @property
    def meta_cache(self):
        """This backend's cache of device tables (:class:`~mmmod.backends.triton.table.MetaCache`),
        shared by every launcher."""
        if self._cache is None:
            from .table import MetaCache
            self._cache = MetaCache()
        return self._cache

    # -- calls beyond the ops ----------------------------------------------------------------
    def scores_and_coefficients(self, logits, labels, method, alpha, beta_max=2.0):
        """Scores [M] and coefficients [M] in one launch plus one epilogue (no host sync)."""
        return coefficients.scores_and_coefficients(self, logits, labels, method, alpha,
                                                    beta_max)

    def sigmas(self, tensors, k, *, noise_std="raw", gate=None):
        """The per-tensor sigma the noisy modulation would use (float32 [T], for tests/tools)."""
        return modulate.sigmas(self, tensors, k, noise_std, gate)

    _step_args = staticmethod(step_args)
