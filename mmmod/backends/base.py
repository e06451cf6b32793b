"""The interface every compute backend implements.

A *bucket* is the selected gradients of one modality on one device with one dtype, all
contiguous (the functional layer guarantees it). ``k`` and ``gate`` arrive as 0-d float32
tensors on that device so no backend ever needs a host value: ``gate`` is 1 or 0 and
multiplies the noise, which lets a step with non-finite scores be skipped without a sync.
``offsets[i]`` is the first element of tensor i in the modality's Philox stream.
"""
from __future__ import annotations

from typing import Sequence

import torch


class Backend:
    name = "abstract"
    #: whether ``modulate_bucket_`` takes ``step`` as a 0-d device tensor without reading it on
    #: the host (what a CUDA-graph-captured step needs; see ``ModulatedOptimizer(capturable=)``)
    device_step = True
    #: coefficient rules (``Method.native``) this backend evaluates in its own kernels; every
    #: other method's torch rule runs on the device instead (``functional.coefficients``)
    native_rules: frozenset = frozenset({"ogm", "mlb"})

    def available(self) -> tuple[bool, str]:
        """(live, why not) on this machine."""
        raise NotImplementedError

    def supports(self, device: torch.device) -> bool:
        raise NotImplementedError

    def scores(self, logits: Sequence[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def coefficients(self, scores: torch.Tensor, rule: str, alpha: float,
                     beta_max: float) -> torch.Tensor:
        """Evaluate the native ``rule`` (one of :attr:`native_rules`) on the device."""
        raise NotImplementedError

    def modulate_bucket_(self, tensors: Sequence[torch.Tensor], offsets: Sequence[int],
                         k: torch.Tensor, gate: torch.Tensor, *, noise: bool, noise_std: str,
                         seed: int, step: int, modality: int) -> None:
        raise NotImplementedError

    def modulate_sigma_bucket_(self, tensors: Sequence[torch.Tensor], offsets: Sequence[int],
                               k: torch.Tensor, gate: torch.Tensor, sigma: torch.Tensor, *,
                               seed: int, step: int, modality: int) -> None:
        """The noisy rescale ``g <- k g + gate sigma[i] n`` with each tensor's noise scale
        given (``mmmod::modulate_sigma_``): ``sigma`` is float32 ``[T]`` on the bucket's device,
        before the gate (``reference.noise_sigma`` of the stds), so no statistics pass runs.
        The bits of this backend's ``modulate_bucket_`` wherever its statistics would have
        found the same sigma (sharded tensors, whose std comes from a collective)."""
        raise NotImplementedError

    def bucket_moments(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """float64 ``(count, mean, M2)`` of every tensor as rows ``[T, 3]`` on their device
        (``(0, 0, 0)`` for an empty tensor): ``mmmod::_bucket_moments``, one dtype and device
        per call, any layout (read in logical order). The compiled extensions' kernels are the
        op's own; the reference and Triton override this."""
        return torch.ops.mmmod._bucket_moments(list(tensors))
