// Metadata checks of MMPareto's combine ops (_pair_moments, combine_), shared by their device
// kernels (combine_cpu.cpp) and defined in combine_checks.cpp; they mirror
// check_pair_inputs / check_moments / check_groups in mmmod/reference/combine.py, messages included.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <optional>

namespace mmmod {

// One fused gradient per summed one; each pair of one shape, one dtype (f32/f16/bf16/f64) and
// one device; fused_scale (when given) a one-element float64 tensor on that device.
void check_pair_inputs(const char* op, at::TensorList fused, at::TensorList summed,
                       const std::optional<at::Tensor>& fused_scale);
// combine_'s moments: float64 [n, 3] on the gradients' device.
void check_combine_moments(const char* op, at::TensorList summed, const at::Tensor& moments);
// combine_'s groups: each modality's number of consecutive tensors (each >= 1), adding up to n.
void check_combine_groups(const char* op, at::TensorList summed, at::IntArrayRef groups);

}  // namespace mmmod
