// Shared declarations of the mmmod torch ops (C++ side only; never included by .cu files).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <string>

namespace mmmod {

// Elements per chunk of the statistics and modulation passes. Fixed (never derived from the
// number of threads or SMs), so per-tensor statistics are combined in the same order
// everywhere and results do not depend on the thread count.
// (The CUDA kernels' chunk is MMMOD_CUDA_CHUNK in cuda_api.h.) Reported by build_info().
constexpr int64_t kChunkCpu = 1 << 14;

int method_code(const std::string& method);

// Metadata checks shared by every device implementation of modulate_.
void check_bucket(at::TensorList tensors, at::IntArrayRef offsets, const at::Tensor& k,
                  const at::Tensor& gate);
void check_scores_inputs(at::TensorList logits, const at::Tensor& labels);
// A step counter tensor of modulate_.capturable: 0-d, integer, on `device`.
void check_step_tensor(const at::Tensor& step, const at::Device& device);

}  // namespace mmmod
