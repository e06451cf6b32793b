"""``backend="cpu"`` and ``backend="cuda"``: the compiled C++/CUDA kernels of the mmmod ops.

Their kernels are the ops of mmmod/_ops as the dispatcher calls them (``torch.ops.mmmod``):
it picks the CPU or CUDA kernel the extension registered from the tensors' device (the backend
is live only while that extension is loaded; an op the binary has no kernel for resolves to
its reference, with a warning). Nothing here
reads a device value on the host: ``k`` and ``gate`` stay 0-d device tensors, seed/modality
are passed as integers, the step as an integer or (``cuda``) a 0-d device counter.
:meth:`available` says why a backend is not live (extension not built, stale, no CUDA) and how
to build it.

``cuda`` is CUDA-graph capturable: each bucket's metadata table (pointers, sizes, stream
offsets) is uploaded once by ``mmmod::bucket_table`` and kept on the device in
:class:`TableCache`, and ``modulate_.capturable`` reads the Philox step from the device
counter, so a captured step launches kernels only and each replay draws fresh noise.
"""
from __future__ import annotations

from collections import OrderedDict

import torch

from .. import _ext, _ops
from ..reference.modulate import check_sigma
from ..reference.native_rules import rule_of
from ..reference.philox import check_step, seed_int64
from .base import Backend


class TableCache:
    """LRU cache of device bucket tables, keyed by device, data pointers, sizes and offsets.

    A table only describes where a bucket's data lives, so it stays valid for as long as the
    tensors do not move: gradients that persist across steps (``zero_grad(set_to_none=False)``,
    the static buffers of a CUDA graph) hit the cache every step. The cache owns the tables, so
    a captured graph's table lives as long as the entry (``size`` buckets are kept)."""

    def __init__(self, build, size: int = 256):
        self.build = build  # the bucket_table kernel
        self.size = size
        self._d: OrderedDict = OrderedDict()
        self.builds = 0  # tables uploaded (tests check reuse)

    def get(self, tensors, offsets) -> torch.Tensor:
        key = (tensors[0].device, tuple(t.data_ptr() for t in tensors),
               tuple(t.numel() for t in tensors), tuple(offsets))
        hit = self._d.get(key)
        if hit is not None:
            self._d.move_to_end(key)
            return hit
        table = self.build(tensors, list(offsets))
        self.builds += 1
        self._d[key] = table
        if len(self._d) > self.size:
            self._d.popitem(last=False)
        return table

    def clear(self):
        self._d.clear()


class _ExtensionBackend(Backend):
    device_type = "cpu"
    priority = 30  # "auto" prefers the compiled kernels of the device

    def op_kernel(self, op, device):
        """The op as the dispatcher calls it, where this extension registered a kernel."""
        if torch.device(device).type == self.device_type and \
                _ops.has_kernel(op, self.device_type.upper()):
            return _ops.overload(op)
        return None

    def available(self):
        mod, why = _ext.load(self.name)
        return mod is not None, why

    def supports(self, device):
        return torch.device(device).type == self.device_type

    def scores(self, logits, labels):
        return self._kernel("scores", labels.device)(list(logits), labels)

    def coefficients(self, scores, method, alpha, beta_max):
        if scores.dim() != 1 or scores.shape[0] < 2:
            raise ValueError(f"scores must be a 1-D tensor of M >= 2 modalities, got shape "
                             f"{tuple(scores.shape)}")
        rule = rule_of(method)  # ValueError naming an unknown method
        return self._kernel("coefficients", scores.device)(scores, int(rule), float(alpha),
                                                           float(beta_max))

    def modulate_bucket_(self, tensors, offsets, k, gate, *, noise, noise_std, seed, step, modality):
        tensors = list(tensors)
        if not tensors:
            return
        step = self._host_step(step)
        self._kernel("modulate_", tensors[0].device)(
                                  tensors, [int(o) for o in offsets], k, gate, bool(noise),
                                  noise_std == "scaled", seed_int64(seed), int(step) & 0xFFFFFFFF,
                                  int(modality) & 0xFFFFFFFF)

    def modulate_sigma_bucket_(self, tensors, offsets, k, gate, sigma, *, seed, step, modality):
        tensors = list(tensors)
        step = self._host_step(step)
        device = tensors[0].device if tensors else sigma.device
        self._kernel("modulate_sigma_", device)(
            tensors, [int(o) for o in offsets], k, gate, sigma, seed_int64(seed),
            int(step) & 0xFFFFFFFF, int(modality) & 0xFFFFFFFF)

    def _host_step(self, step):
        """The step as an int: a CPU counter is read (a plain memory read, not a device sync);
        a device counter is refused (this op takes the step as an integer)."""
        if isinstance(step, torch.Tensor):
            check_step(step)
            if step.device.type != "cpu":
                raise RuntimeError(f"mmmod backend {self.name!r} takes the step as an integer; a "
                                   f"step counter on {step.device} (capturable=True) needs "
                                   f"backend 'triton' or 'torch' (or 'cuda' for CUDA data)")
            return int(step)
        return step


class CpuBackend(_ExtensionBackend):
    name = "cpu"
    device_type = "cpu"
    devices = ("cpu",)

    @property
    def modulate_all(self):
        """``mmmod._C.modulate_all_cpu`` (csrc/cpu/modulate_all_cpu.cpp), when the binary has it."""
        return getattr(_ext.load("cpu")[0], "modulate_all_cpu", None)


class CudaBackend(_ExtensionBackend):
    device_step = True  # modulate_.capturable reads the step from the device counter
    name = "cuda"
    device_type = "cuda"
    devices = ("cuda",)

    def __init__(self):
        self.tables = TableCache(lambda tensors, offsets: self._kernel(
            "bucket_table", tensors[0].device)(tensors, offsets))

    def modulate_bucket_(self, tensors, offsets, k, gate, *, noise, noise_std, seed, step, modality):
        tensors = list(tensors)
        if not tensors:
            return
        offsets = [int(o) for o in offsets]
        if len(offsets) != len(tensors):
            raise ValueError(f"mmmod.modulate_: {len(tensors)} tensors but {len(offsets)} offsets")
        table, step, step_tensor = self._launch_args(tensors, offsets, step)
        self._kernel("modulate_.capturable", tensors[0].device)(
            tensors, offsets, k, gate, bool(noise), noise_std == "scaled", seed_int64(seed),
            int(step) & 0xFFFFFFFF, int(modality) & 0xFFFFFFFF, table, step_tensor)

    def _launch_args(self, tensors, offsets, step):
        """(cached device table, int step, device step tensor or None) of one launch: a step
        counter tensor is read by the kernel on the tensors' device (the int is then unused)."""
        step_tensor = None
        if isinstance(step, torch.Tensor):
            check_step(step)
            device = tensors[0].device
            step_tensor = step if step.device == device else step.to(device)
            step = 0
        return self.tables.get(tensors, offsets), step, step_tensor

    def modulate_sigma_bucket_(self, tensors, offsets, k, gate, sigma, *, seed, step, modality):
        # as modulate_bucket_: the cached device table and a device step counter, so a
        # captured step (sharded OGM-GE under a CUDA graph) launches the noise kernel only
        tensors = list(tensors)
        offsets = [int(o) for o in offsets]
        if len(offsets) != len(tensors):
            raise ValueError(f"mmmod.modulate_sigma_: {len(tensors)} tensors but {len(offsets)} "
                             f"offsets")
        check_sigma(tensors, offsets, sigma)
        if not any(t.numel() for t in tensors):
            return  # nothing to launch: no table to build or upload
        table, step, step_tensor = self._launch_args(tensors, offsets, step)
        self._kernel("modulate_sigma_", tensors[0].device)(
            tensors, offsets, k, gate, sigma, seed_int64(seed), int(step) & 0xFFFFFFFF,
            int(modality) & 0xFFFFFFFF, table, step_tensor)
