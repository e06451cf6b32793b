"""The mmmod operators (``torch.ops.mmmod``): defined here, once, when mmmod is imported.

Each op has one schema, a fake (meta) implementation for torch.compile and
``torch.library.opcheck``, and the plain-torch reference (:mod:`mmmod.reference`) as its
default (``CompositeExplicitAutograd``) implementation, whether or not the C++ extension is
built. The compiled extensions only add device kernels over these definitions
(``TORCH_LIBRARY_IMPL(mmmod, CPU|CUDA, m)`` in csrc/cpu_kernels.cpp and csrc/cuda_ops.cpp), so
loading them never re-defines an op; :mod:`mmmod._ext` imports this module before it loads a
binary.

No op reads a device value on the host: ``k`` and ``gate`` arrive as 0-d device tensors,
seed/step/modality as integers (the step as a 0-d device counter in ``modulate_.capturable``).
The ops whose names start with ``_`` are private: ``_bucket_std`` and ``_philox_normal_`` exist
for the test suite and tools, ``_bucket_moments`` for sharded OGM-GE's statistics.
"""
from __future__ import annotations

import torch

from . import reference

NAMESPACE = "mmmod"

#: op name -> schema (the whole public surface, plus the private test ops)
SCHEMAS = {
    # s_m = sum_i softmax(logits[m])[i, labels[i]] as float32 [M]; NaN for out-of-range labels
    "scores": "scores(Tensor[] logits, Tensor labels) -> Tensor",
    # k [M] float32 from scores [M] (method: ogm, ogm_ge, mlb, none); NaN if any score is NaN
    "coefficients": "coefficients(Tensor scores, str method, float alpha, float beta_max) -> Tensor",
    # in place: g <- k g (+ gate sigma n) for one modality's bucket (mmmod.reference.modulate)
    "modulate_": ("modulate_(Tensor(a!)[] tensors, int[] offsets, Tensor k, Tensor gate, "
                  "bool noise, bool scaled, int seed, int step, int modality) -> ()"),
    # the CUDA-graph capturable form of modulate_: `table` is the bucket's device metadata table
    # from bucket_table (uploaded once, reused), `step_tensor` a 0-d integer counter whose value
    # mod 2^32 replaces `step`, read by the kernel; with neither given it is modulate_
    "modulate_.capturable": (
        "modulate_.capturable(Tensor(a!)[] tensors, int[] offsets, Tensor k, Tensor gate, "
        "bool noise, bool scaled, int seed, int step, int modality, Tensor? table=None, "
        "Tensor? step_tensor=None) -> ()"),
    # in place: g <- k g + gate sigma[i] n with each tensor's noise scale given (float32 [T] on
    # the tensors' device, before the gate; non-finite: no noise), no statistics pass: sharded
    # OGM-GE, whose stds come from a collective (reference.noise_sigma makes sigma of them).
    # `table` (CUDA: from bucket_table) and `step_tensor` (a 0-d integer counter replacing
    # `step`) as in modulate_.capturable
    "modulate_sigma_": (
        "modulate_sigma_(Tensor(a!)[] tensors, int[] offsets, Tensor k, Tensor gate, "
        "Tensor sigma, int seed, int step, int modality, Tensor? table=None, "
        "Tensor? step_tensor=None) -> ()"),
    # the device metadata table (int64 words) of a bucket for modulate_.capturable; CUDA only
    "bucket_table": "bucket_table(Tensor[] tensors, int[] offsets) -> Tensor",
    # (tests) unbiased float64 std of each tensor (0 below two elements), deterministic
    "_bucket_std": "_bucket_std(Tensor[] tensors) -> Tensor",
    # float64 (count, mean, M2) of each tensor as rows [T, 3] ((0, 0, 0) when empty), on the
    # tensors' device: the per-shard moments sharded OGM-GE gathers and merges (optim/sharding.py)
    "_bucket_moments": "_bucket_moments(Tensor[] tensors) -> Tensor",
    # (tests) fill a float32 tensor with the Philox noise of stream elements offset ..
    "_philox_normal_": ("_philox_normal_(Tensor(a!) out, int seed, int step, int modality, "
                        "int offset) -> ()"),
}

#: elements per chunk of the CUDA kernels' bucket table (MMMOD_CUDA_CHUNK in csrc/cuda_api.h);
#: the fake of bucket_table sizes its output with it
CUDA_CHUNK = 1 << 16


def table_words(ntensors: int, nchunks: int) -> int:
    """int64 words of a bucket table (csrc/cuda_api.h: 2-word header, 5 per tensor, 2 per chunk)."""
    return 2 + 5 * ntensors + 2 * nchunks


def _defined() -> bool:
    """Whether the schemas are registered already (a reload of this module must not re-define)."""
    try:
        torch.ops.mmmod.scores.default  # noqa: B018
    except (AttributeError, RuntimeError):
        return False
    return True


# ---- the reference as the default implementation ----------------------------------------------
def _scores_ref(logits, labels):
    out = reference.scores(logits, labels)
    return out.to(labels.device) if len(logits) == 0 else out


def _coefficients_ref(scores, method, alpha, beta_max):
    return reference.coefficients(scores, method, alpha, beta_max)


def _modulate_ref(tensors, offsets, k, gate, noise, scaled, seed, step, modality):
    reference.modulate_bucket_(tensors, offsets, k, gate, noise=noise,
                               noise_std="scaled" if scaled else "raw", seed=seed, step=step,
                               modality=modality)


def _modulate_capturable_ref(tensors, offsets, k, gate, noise, scaled, seed, step, modality,
                             table=None, step_tensor=None):
    # the table only says where the tensors live: the reference walks the tensors themselves
    _modulate_ref(tensors, offsets, k, gate, noise, scaled, seed,
                  step if step_tensor is None else step_tensor, modality)


def _modulate_sigma_ref(tensors, offsets, k, gate, sigma, seed, step, modality, table=None,
                        step_tensor=None):
    reference.modulate_sigma_bucket_(tensors, offsets, k, gate, sigma, seed=seed,
                                     step=step if step_tensor is None else step_tensor,
                                     modality=modality)


def _bucket_std_ref(tensors):
    out = [reference.tensor_std(t) for t in tensors]
    if not out:
        return torch.zeros(0, dtype=torch.float64)
    return torch.stack([s.to(out[0].device) for s in out])


#: the dtypes _bucket_moments reads (every kernel converts them to float64 exactly)
MOMENT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_moments_inputs(tensors) -> None:
    """Metadata checks of ``_bucket_moments`` (the same as the C++ kernels', same messages):
    floating dtypes it reads, one dtype and one device. Reads no device value."""
    for i, t in enumerate(tensors):
        if t.dtype not in MOMENT_DTYPES:
            raise TypeError(f"mmmod._bucket_moments: tensor {i} is {t.dtype}; expected float32, "
                            f"float16, bfloat16 or float64")
        t0 = tensors[0]
        if t.dtype != t0.dtype or t.device != t0.device:
            raise ValueError(f"mmmod._bucket_moments: a bucket holds one dtype and device; "
                             f"tensor {i} is {t.dtype} on {t.device}, tensor 0 is {t0.dtype} on "
                             f"{t0.device}")


def _bucket_moments_ref(tensors):
    """Per tensor, in float64: count, mean, and M2 = the sum of squared deviations from that
    mean (two passes over a float64 copy), stacked ``[T, 3]``."""
    check_moments_inputs(tensors)
    device = tensors[0].device if tensors else torch.device("cpu")
    rows = []
    for t in tensors:
        if t.numel() == 0:
            rows.append(torch.zeros(3, dtype=torch.float64, device=device))
            continue
        x = t.detach().reshape(-1).double()
        mean = x.mean()
        rows.append(torch.stack([torch.full((), x.numel(), dtype=torch.float64, device=device),
                                 mean, (x - mean).square().sum()]))
    if not rows:
        return torch.zeros((0, 3), dtype=torch.float64, device=device)
    return torch.stack(rows)


def _philox_normal_ref(out, seed, step, modality, offset):
    out.copy_(reference.philox_normal(seed, step, modality, offset, out.numel(), out.device)
              .view(out.shape))


# ---- fakes (shapes and dtypes only) -----------------------------------------------------------
def _scores_fake(logits, labels):
    return labels.new_empty((len(logits),), dtype=torch.float32)


def _coefficients_fake(scores, method, alpha, beta_max):
    torch._check(scores.dim() == 1, lambda: "scores must be 1-D")
    return scores.new_empty(scores.shape, dtype=torch.float32)


def _modulate_fake(tensors, offsets, k, gate, noise, scaled, seed, step, modality):
    return None


def _modulate_capturable_fake(tensors, offsets, k, gate, noise, scaled, seed, step, modality,
                              table=None, step_tensor=None):
    return None


def _modulate_sigma_fake(tensors, offsets, k, gate, sigma, seed, step, modality, table=None,
                         step_tensor=None):
    torch._check_type(sigma.dtype == torch.float32,
                      lambda: f"mmmod.modulate_sigma_: sigma must be float32, got {sigma.dtype}")
    torch._check_value(sigma.dim() == 1 and sigma.shape[0] == len(tensors),
                       lambda: f"mmmod.modulate_sigma_: sigma must have shape [{len(tensors)}] "
                               f"(one per tensor), got {tuple(sigma.shape)}")
    torch._check_value(not tensors or sigma.device == tensors[0].device,
                       lambda: f"mmmod.modulate_sigma_: sigma is on {sigma.device} but the "
                               f"tensors are on {tensors[0].device}")
    return None


def _bucket_table_fake(tensors, offsets):
    torch._check(len(tensors) == len(offsets), lambda: "one offset per tensor")
    torch._check(len(tensors) > 0, lambda: "no tensors")
    nchunks = sum((t.numel() + CUDA_CHUNK - 1) // CUDA_CHUNK for t in tensors)
    return tensors[0].new_empty((table_words(len(tensors), nchunks),), dtype=torch.int64)


def _bucket_std_fake(tensors):
    return torch.empty((len(tensors),), dtype=torch.float64,
                       device=tensors[0].device if tensors else "cpu")


def _bucket_moments_fake(tensors):
    check_moments_inputs(tensors)
    return torch.empty((len(tensors), 3), dtype=torch.float64,
                       device=tensors[0].device if tensors else "cpu")


def _philox_normal_fake(out, seed, step, modality, offset):
    return None


_IMPLS = {
    "scores": (_scores_ref, _scores_fake),
    "coefficients": (_coefficients_ref, _coefficients_fake),
    "modulate_": (_modulate_ref, _modulate_fake),
    "modulate_.capturable": (_modulate_capturable_ref, _modulate_capturable_fake),
    "modulate_sigma_": (_modulate_sigma_ref, _modulate_sigma_fake),
    "bucket_table": (None, _bucket_table_fake),  # CUDA only: no default implementation
    "_bucket_std": (_bucket_std_ref, _bucket_std_fake),
    "_bucket_moments": (_bucket_moments_ref, _bucket_moments_fake),
    "_philox_normal_": (_philox_normal_ref, _philox_normal_fake),
}

# FRAGMENT: the namespace is shared with the extensions' TORCH_LIBRARY_IMPL blocks; this library
# object lives as long as the module (dropping it would remove what it registered)
_lib = torch.library.Library(NAMESPACE, "FRAGMENT")
if not _defined():
    for _name, _schema in SCHEMAS.items():
        _lib.define(_schema)
    for _name, (_ref, _fake) in _IMPLS.items():
        if _ref is not None:
            _lib.impl(_name, _ref, "CompositeExplicitAutograd")
        torch.library.register_fake(f"{NAMESPACE}::{_name}", _fake, lib=_lib)


def register_kernels(dispatch_key: str, kernels: dict) -> None:
    """Register Python kernels (op name -> function with the op's signature) for a dispatch key
    of the ops defined here: the Triton backend's kernels as the ``CUDA`` implementation when
    the CUDA extension is not loaded (``mmmod.backends.triton_backend``)."""
    for name, fn in kernels.items():
        if name not in SCHEMAS:
            raise ValueError(f"mmmod defines no op {name!r}")
        _lib.impl(name, fn, dispatch_key)


# InfoReg's proximal op lives in its own module; imported here so it is defined whenever these are
from . import ops_proximal as _ops_proximal  # noqa: E402,F401
