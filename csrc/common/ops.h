// Shared declarations of the mmmod torch ops (C++ side only; never included by .cu files).
//
// The mmmod operators are defined in Python (mmmod/_ops/__init__.py: schemas, fake
// implementations and the plain-torch reference as the default implementation), so they exist
// whether or not this extension is built. The binaries only add device kernels with
// TORCH_LIBRARY_IMPL(mmmod, ...) (cpu/*.cpp, cuda/*.cpp) and must never define an op again:
// mmmod._ext defines the ops before it loads a binary, and refuses a stale one without loading it.
//
// Conventions every kernel follows: no op reads a device value on the host (k and gate arrive
// as 0-d device tensors, seed/step/modality as integers, or the step as a 0-d device counter
// in modulate_.capturable); the metadata checks shared by the CPU and CUDA kernels live in
// checks.cpp.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <string>

namespace mmmod {

// The coefficients op's `rule` as a NativeRule code (common/native_rules.h); a ValueError
// listing the codes for any other value.
int checked_rule(int64_t rule);

// Metadata checks shared by every device implementation of modulate_.
void check_bucket(at::TensorList tensors, at::IntArrayRef offsets, const at::Tensor& k,
                  const at::Tensor& gate);
void check_scores_inputs(at::TensorList logits, const at::Tensor& labels);
// The CPU kernel of modulate_ (csrc/cpu/cpu_kernels.cpp) on one checked bucket (one dtype,
// contiguous CPU tensors, offsets >= 0) with k and the gate as values; also run by
// mmmod._C.modulate_all_cpu (csrc/cpu/modulate_all_cpu.cpp).
namespace cpu {
void modulate_values_cpu(at::TensorList tensors, at::IntArrayRef offsets, float k, float gate,
                         bool noise, bool scaled, int64_t seed, int64_t step, int64_t modality);
}  // namespace cpu
void check_proximal_inputs(at::TensorList grads, at::TensorList params, at::TensorList snapshots,
                           const at::Tensor& beta);
// A step counter tensor of modulate_.capturable: 0-d, integer, on `device`.
void check_step_tensor(const at::Tensor& step, const at::Device& device);
// modulate_sigma_'s sigma: float32 [T], on the tensors' device.
void check_sigma(at::TensorList tensors, const at::Tensor& sigma);
// _bucket_moments' tensors: one floating dtype (f32/f16/bf16/f64) and one device.
void check_moments_inputs(at::TensorList tensors);
// fused_sgd_ / fused_adam_ buckets on a device of type `device_type` (CPU or CUDA): every
// list as long as params, contiguous tensors like their param, one dtype (f32/f16/bf16/f64),
// one-element float32 k and update_scale, float32 sigma [T], offsets >= 0, Adam step counts >= 1.
void check_fused_sgd_inputs(at::TensorList params, at::TensorList grads,
                            at::TensorList momentum_buffers, size_t buffer_ready_flags,
                            bool use_momentum, at::IntArrayRef offsets, const at::Tensor& k,
                            const std::optional<at::Tensor>& sigma,
                            const std::optional<at::Tensor>& update_scale,
                            c10::DeviceType device_type);
void check_fused_adam_inputs(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                             at::TensorList exp_avg_sqs, at::ArrayRef<double> steps,
                             at::IntArrayRef offsets, const at::Tensor& k,
                             const std::optional<at::Tensor>& sigma,
                             const std::optional<at::Tensor>& update_scale,
                             c10::DeviceType device_type);

}  // namespace mmmod
