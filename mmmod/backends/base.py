"""The interface every compute backend implements: the op as the unit.

A backend declares the device types it runs on (:attr:`Backend.devices`), its
:attr:`Backend.priority` for ``backend="auto"``, why it is unavailable (:meth:`available`) and
a kernel per op (:meth:`op_kernel`: a function with the op's schema signature, see
mmmod/_ops). Callers never call a kernel directly: ``mmmod.backends.kernel(op, backend,
device)`` resolves it, falling back to the op's reference (with one warning) where a backend
has no kernel for an op.

The bucket-level methods below (what the functional layer and the optimizer call) are written
once, over those kernels; a backend overrides one only to add what its kernels need around the
call (the CUDA extension's cached device tables, for instance).

A *bucket* is the selected gradients of one modality on one device with one dtype, all
contiguous (the functional layer guarantees it). ``k`` and ``gate`` arrive as 0-d float32
tensors on that device so no backend ever needs a host value: ``gate`` is 1 or 0 and
multiplies the noise, which lets a step with non-finite scores be skipped without a sync.
``offsets[i]`` is the first element of tensor i in the modality's Philox stream.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..reference.modulate import noise_sigma
from ..reference.native_rules import MODULATING, rule_of
from ..reference.philox import seed_int64
from .registry import kernel

_MASK32 = 0xFFFFFFFF


class Backend:
    name = "abstract"
    #: device types this backend runs on (``"auto"`` considers it for these)
    devices: tuple = ()
    #: ``"auto"`` picks, among the live backends of the data's device type, the one of highest
    #: priority above 0; a backend of priority 0 or less is used only when named
    priority: int = 0
    #: whether ``modulate_bucket_`` takes ``step`` as a 0-d device tensor without reading it on
    #: the host (what a CUDA-graph-captured step needs; see ``ModulatedOptimizer(capturable=)``)
    device_step = True
    #: coefficient rules (``Method.native``) this backend evaluates in its own kernels; every
    #: other method's torch rule runs on the device instead (``functional.coefficients``)
    native_rules: frozenset = frozenset(r.label for r in MODULATING)
    #: op name -> kernel (a function with the op's signature), for backends made of Python
    #: kernels; :meth:`op_kernel` may compute the answer instead
    kernels: dict = {}
    #: a whole-call fast path of ``functional.modulate_`` for CPU data (every modality in one
    #: call, declining what it does not handle), or None
    modulate_all = None

    def available(self) -> tuple[bool, str]:
        """(live, why not) on this machine."""
        return True, ""

    def supports(self, device: torch.device) -> bool:
        return torch.device(device).type in self.devices

    def op_kernel(self, op: str, device: torch.device) -> Callable | None:
        """This backend's kernel of ``op`` for data on ``device``, or None (the resolver then
        runs the op's reference, with one warning)."""
        return self.kernels.get(op)

    def _kernel(self, op: str, device) -> Callable:
        return kernel(op, self, device)  # the one route to a kernel (its fallback and warning)

    # ---- bucket-level calls, over the kernels ----------------------------------------------
    def scores(self, logits: Sequence[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        return self._kernel("scores", labels.device)(list(logits), labels)

    def coefficients(self, scores: torch.Tensor, rule: str, alpha: float,
                     beta_max: float) -> torch.Tensor:
        """Evaluate the native ``rule`` (one of :attr:`native_rules`) on the device."""
        return self._kernel("coefficients", scores.device)(scores, int(rule_of(rule)), float(alpha),
                                                           float(beta_max))

    def modulate_bucket_(self, tensors: Sequence[torch.Tensor], offsets: Sequence[int],
                         k: torch.Tensor, gate: torch.Tensor, *, noise: bool, noise_std: str,
                         seed: int, step: int, modality: int) -> None:
        tensors = list(tensors)
        if not tensors:
            return
        args = (tensors, [int(o) for o in offsets], k, gate, bool(noise), noise_std == "scaled",
                seed_int64(seed))
        if isinstance(step, torch.Tensor):  # a device counter: the capturable overload reads it
            self._kernel("modulate_.capturable", tensors[0].device)(
                *args, 0, int(modality) & _MASK32, None, step)
        else:
            self._kernel("modulate_", tensors[0].device)(*args, int(step) & _MASK32,
                                                         int(modality) & _MASK32)

    def modulate_sigma_bucket_(self, tensors: Sequence[torch.Tensor], offsets: Sequence[int],
                               k: torch.Tensor, gate: torch.Tensor, sigma: torch.Tensor, *,
                               seed: int, step: int, modality: int) -> None:
        """The noisy rescale ``g <- k g + gate sigma[i] n`` with each tensor's noise scale
        given (``mmmod::modulate_sigma_``): ``sigma`` is float32 ``[T]`` on the bucket's device,
        before the gate (``reference.noise_sigma`` of the stds), so no statistics pass runs.
        The bits of this backend's ``modulate_bucket_`` wherever its statistics would have
        found the same sigma (sharded tensors, whose std comes from a collective)."""
        tensors = list(tensors)
        device = tensors[0].device if tensors else sigma.device
        args = (tensors, [int(o) for o in offsets], k, gate, sigma, seed_int64(seed))
        run = self._kernel("modulate_sigma_", device)
        if isinstance(step, torch.Tensor):
            run(*args, 0, int(modality) & _MASK32, None, step)
        else:
            run(*args, int(step) & _MASK32, int(modality) & _MASK32)

    def bucket_moments(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """float64 ``(count, mean, M2)`` of every tensor as rows ``[T, 3]`` on their device
        (``(0, 0, 0)`` for an empty tensor): ``mmmod::_bucket_moments``, one dtype and device
        per call, any layout (read in logical order)."""
        tensors = list(tensors)
        device = tensors[0].device if tensors else torch.device("cpu")
        return self._kernel("_bucket_moments", device)(tensors)

    def sigmas(self, tensors: Sequence[torch.Tensor], k: torch.Tensor, *, noise_std: str = "raw",
               gate: torch.Tensor | None = None) -> torch.Tensor:
        """float32 ``[T]`` noise scale per tensor, exactly as this backend's unfused modulation
        computes it (non-finite -> 0, times the gate): the fused update's statistics pass."""
        tensors = list(tensors)
        std = self._kernel("_bucket_std", tensors[0].device)(tensors).to(k.device)
        sigma = noise_sigma(std, k, noise_std)
        return sigma if gate is None else sigma * gate

    def proximal_(self, grads, params, snapshots, beta) -> torch.Tensor:
        """InfoReg's proximal correction of one modality on one device (``mmmod::proximal_``)."""
        return self._kernel("proximal_", beta.device)(grads, params, snapshots, beta)

    def fused_update(self, kind: str, device: torch.device) -> Callable:
        """The fused modulated update (``"sgd"`` or ``"adam"``) of one bucket on ``device``,
        called as ``fn(*tensors, **hyper, seed=, step=, modality=)`` (mmmod/optim/fused.py):
        the hyperparameters in the op's schema order."""
        fn = self._kernel("fused_sgd_" if kind == "sgd" else "fused_adam_", device)

        def run(*tensors, seed, step, modality, **hyper):
            fn(*tensors, *hyper.values(), seed_int64(seed), int(step) & _MASK32,
               int(modality) & _MASK32)
        return run
