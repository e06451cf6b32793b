"""``backend="cpu"`` and ``backend="cuda"``: the compiled C++/CUDA ops (``torch.ops.mmmod``).

Both call the same registered ops; the dispatcher picks the CPU or CUDA kernels from the
tensors' device. Nothing here reads a device value on the host: ``k`` and ``gate`` stay 0-d
device tensors, seed/step/modality are passed as integers. :meth:`available` says why a backend
is not live (extension not built, stale, no CUDA) and how to build it.
"""
from __future__ import annotations

import torch

from .. import _ext
from ..reference.coefficients import METHODS
from .base import Backend

_U64 = (1 << 64) - 1


def _seed64(seed: int) -> int:
    """The reference's ``seed & (2**64 - 1)`` as the signed int64 the op schema carries."""
    s = int(seed) & _U64
    return s - (1 << 64) if s >= (1 << 63) else s


class _ExtensionBackend(Backend):
    device_type = "cpu"

    def available(self):
        mod, why = _ext.load(self.name)
        return mod is not None, why

    def supports(self, device):
        return torch.device(device).type == self.device_type

    def scores(self, logits, labels):
        return torch.ops.mmmod.scores(list(logits), labels)

    def coefficients(self, scores, method, alpha, beta_max):
        if scores.dim() != 1 or scores.shape[0] < 2:
            raise ValueError(f"scores must be a 1-D tensor of M >= 2 modalities, got shape "
                             f"{tuple(scores.shape)}")
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
        return torch.ops.mmmod.coefficients(scores, method, float(alpha), float(beta_max))

    def modulate_bucket_(self, tensors, offsets, k, gate, *, noise, noise_std, seed, step, modality):
        tensors = list(tensors)
        if not tensors:
            return
        if isinstance(step, torch.Tensor):
            if step.device.type != "cpu":
                raise RuntimeError(f"mmmod backend {self.name!r} takes the step as an integer; a "
                                   f"step counter on {step.device} (capturable=True) needs "
                                   f"backend 'triton' or 'torch'")
            step = int(step)  # a CPU tensor: a plain memory read, not a device sync
        torch.ops.mmmod.modulate_(tensors, [int(o) for o in offsets], k, gate, bool(noise),
                                  noise_std == "scaled", _seed64(seed), int(step) & 0xFFFFFFFF,
                                  int(modality) & 0xFFFFFFFF)


class CpuBackend(_ExtensionBackend):
    name = "cpu"
    device_type = "cpu"


class CudaBackend(_ExtensionBackend):
    device_step = False  # the op schema carries the step as an int (see modulate_bucket_)
    name = "cuda"
    device_type = "cuda"
