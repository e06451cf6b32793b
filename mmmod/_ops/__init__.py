"""The mmmod operators (``torch.ops.mmmod``), each defined here once, when mmmod is imported.

Each op is one :func:`define` line: its schema, its reference (mmmod/reference/ops.py, the
default ``CompositeExplicitAutograd`` kernel, whether or not a compiled extension is built) and
its fake (:mod:`mmmod._ops.fakes`). The compiled extensions add device kernels over these
definitions with ``TORCH_LIBRARY_IMPL(mmmod, CPU|CUDA, m)`` (csrc/); :mod:`mmmod._ext` imports
this package before it loads a binary. Backends reach the kernels through
``mmmod.backends.kernel(op, backend, device)``.

No op reads a device value on the host: ``k`` and ``gate`` arrive as 0-d device tensors,
seed/step/modality as integers (the step as a 0-d device counter in ``modulate_.capturable``).
The ops whose names start with ``_`` are private: ``_bucket_std`` and ``_philox_normal_`` exist
for the test suite and tools, ``_bucket_moments`` for sharded OGM-GE's statistics.
"""
from __future__ import annotations

from ..reference import ops as ref
from ..reference.native_rules import NativeRule, rule_of
from .fakes import CUDA_CHUNK, FAKES, table_words
from .library import (LIB, NAMESPACE, OPS, OpDef, define, has_kernel, overload, register_kernel,
                      register_kernels)

# s_m = sum_i softmax(logits[m])[i, labels[i]] as float32 [M]; NaN for out-of-range labels
define('scores',
       'scores(Tensor[] logits, Tensor labels) -> Tensor',
       ref.scores, FAKES['scores'])
# k [M] float32 from scores [M] by a native rule, given as its code (int(NativeRule.OGM), the
# values csrc/common/native_rules.h mirrors); NaN if any score is NaN
define('coefficients',
       'coefficients(Tensor scores, int rule, float alpha, float beta_max) -> Tensor',
       ref.coefficients, FAKES['coefficients'])
# in place: g <- k g (+ gate sigma n) for one modality's bucket (mmmod.reference.modulate)
define('modulate_',
       "modulate_(Tensor(a!)[] tensors, int[] offsets, Tensor k, Tensor gate, bool noise, "
       "bool scaled, int seed, int step, int modality) -> ()",
       ref.modulate_, FAKES['modulate_'])
# the CUDA-graph capturable form of modulate_: `table` is the bucket's device metadata table
# from bucket_table (uploaded once, reused), `step_tensor` a 0-d integer counter whose value
# mod 2^32 replaces `step`, read by the kernel; with neither given it is modulate_
define('modulate_.capturable',
       "modulate_.capturable(Tensor(a!)[] tensors, int[] offsets, Tensor k, Tensor gate, "
       "bool noise, bool scaled, int seed, int step, int modality, Tensor? table=None, "
       "Tensor? step_tensor=None) -> ()",
       ref.modulate_capturable, FAKES['modulate_.capturable'])
# in place: g <- k g + gate sigma[i] n with each tensor's noise scale given (float32 [T] on
# the tensors' device, before the gate; non-finite: no noise), no statistics pass: sharded
# OGM-GE, whose stds come from a collective (reference.noise_sigma makes sigma of them).
# `table` (CUDA: from bucket_table) and `step_tensor` (a 0-d integer counter replacing
# `step`) as in modulate_.capturable
define('modulate_sigma_',
       "modulate_sigma_(Tensor(a!)[] tensors, int[] offsets, Tensor k, Tensor gate, "
       "Tensor sigma, int seed, int step, int modality, Tensor? table=None, "
       "Tensor? step_tensor=None) -> ()",
       ref.modulate_sigma_, FAKES['modulate_sigma_'])
# the device metadata table (int64 words) of a bucket for modulate_.capturable; CUDA only
define('bucket_table',
       'bucket_table(Tensor[] tensors, int[] offsets) -> Tensor',
       None, FAKES['bucket_table'])
# (tests) unbiased float64 std of each tensor (0 below two elements), deterministic
define('_bucket_std',
       '_bucket_std(Tensor[] tensors) -> Tensor',
       ref.bucket_std, FAKES['_bucket_std'])
# float64 (count, mean, M2) of each tensor as rows [T, 3] ((0, 0, 0) when empty), on the
# tensors' device: the per-shard moments sharded OGM-GE gathers and merges (optim/sharding.py)
define('_bucket_moments',
       '_bucket_moments(Tensor[] tensors) -> Tensor',
       ref.bucket_moments, FAKES['_bucket_moments'])
# (tests) fill a float32 tensor with the Philox noise of stream elements offset ..
define('_philox_normal_',
       '_philox_normal_(Tensor(a!) out, int seed, int step, int modality, int offset) -> ()',
       ref.philox_normal_, FAKES['_philox_normal_'])
# torch.optim.SGD's step on params with the modulated gradient; momentum_buffers is empty when
# momentum is 0, buffer_ready[i] False makes buffer i start as the gradient (torch's first step)
define("fused_sgd_",
       "fused_sgd_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, "
       "bool[] buffer_ready, int[] offsets, Tensor k, Tensor? sigma, Tensor? update_scale, "
       "float lr, float weight_decay, float momentum, float dampening, bool nesterov, "
       "bool maximize, int seed, int step, int modality) -> ()",
       ref.fused_sgd_, FAKES["fused_sgd_"])
# torch.optim.Adam / AdamW (decoupled) step; steps[i] is tensor i's step count after this step's
# increment (the caller advances state["step"])
define("fused_adam_",
       "fused_adam_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
       "Tensor(c!)[] exp_avg_sqs, float[] steps, int[] offsets, Tensor k, Tensor? sigma, "
       "Tensor? update_scale, float lr, float beta1, float beta2, float eps, "
       "float weight_decay, bool decoupled, bool maximize, int seed, int step, "
       "int modality) -> ()",
       ref.fused_adam_, FAKES["fused_adam_"])
# InfoReg's proximal correction, in place on grads; returns the Fisher increment (float64, 0-d,
# on beta's device): mmmod/reference/proximal.py
define("proximal_",
       "proximal_(Tensor(a!)[] grads, Tensor[] params, Tensor[] snapshots, Tensor beta) -> Tensor",
       ref.proximal_, FAKES["proximal_"])

# MMPareto's combine (mmmod/reference/combine.py, docs/semantics.md section 11), two passes
# over each (fused, summed) gradient pair of a modality. _pair_moments: float64 [T, 3] rows
# (|a|^2, |b|^2, a.b) of a = fused_scale g_mm, b = g_sum - a, summed in a fixed order (thread
# and GPU independent; sharded runs all-reduce these rows); one call may cover several
# modalities (the rows are per tensor). combine_: per modality (groups[m] consecutive tensors),
# from its rows (in registration order) its weights (w_mm, w_m) (returned, float64 [M, 2]) and
# each tensor's factors, then in place g_sum <- c_fused (fused_scale g_mm) + c_summed g_sum;
# gamma is MMPareto's alpha. moments None: the kernel takes _pair_moments' rows itself (one
# call for both passes where no collective sits between them)
define("_pair_moments",
       "_pair_moments(Tensor[] fused, Tensor[] summed, Tensor? fused_scale=None) -> Tensor",
       ref.pair_moments, FAKES["_pair_moments"])
define("combine_",
       "combine_(Tensor(a!)[] summed, Tensor[] fused, Tensor? moments, int[] groups, "
       "float gamma, Tensor? fused_scale=None) -> Tensor",
       ref.combine_, FAKES["combine_"])


#: op name -> schema, every op of the namespace
SCHEMAS = {name: op.schema for name, op in OPS.items()}

__all__ = ["CUDA_CHUNK", "LIB", "NAMESPACE", "NativeRule", "OPS", "OpDef", "SCHEMAS", "define",
           "has_kernel", "overload", "register_kernel", "register_kernels", "rule_of", "table_words"]
