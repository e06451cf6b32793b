// CUDA implementation of the fused modulated update (ops mmmod::fused_sgd_ / fused_adam_,
// defined in mmmod/_ops/__init__.py; the definition is mmmod/reference/fused.py): torch glue
// compiled by the host compiler with c10/ATen headers only; the kernels are behind the plain
// launchers of fused_update_api.h (fused_update.cu).
//
// Every argument is checked (list lengths, device, dtype, shape, contiguity, k / sigma /
// update_scale, Adam's step counts) before the table is built or anything is launched, so a bad
// call writes nothing. No host sync: the table (pointers, sizes, stream offsets, flags, and
// Adam's per-tensor bias corrections, from the host-side step counts; the common table,
// multi_tensor_table.h) is staged in pinned host memory and copied with non_blocking=true on the
// current stream, or found in the uploader's cache; k, sigma and update_scale stay
// device tensors read by the kernel. The upload cannot be captured in a CUDA graph (the pinned
// staging block is recycled once the copy ran), so a call under capture is refused.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <optional>
#include <vector>

#include "cuda/cuda_api.h"
#include "cuda/cuda_glue.h"
#include "cuda/fused_update_api.h"
#include "cuda/multi_tensor_table.h"
#include "common/ops.h"

namespace mmmod {
namespace fused_cuda {
namespace {

void check_rc(int rc, const char* op, const char* what) {
  check_launch(rc, (std::string("mmmod.") + op).c_str(), what);
}

bool has_elements(at::TensorList params) {
  for (const auto& p : params) {
    if (p.numel() > 0) return true;
  }
  return false;
}

using FusedBuilder = mt::TableBuilder<fused::kDepth, fused::kExtra>;

// One tensor position's entry: its pointers (0 for a state the step has none of), size, stream
// offset, flag and Adam's two doubles (bit for bit).
void add_entry(FusedBuilder& b, const at::Tensor& p, const at::Tensor& g, const at::Tensor* s1,
               const at::Tensor* s2, int64_t offset, int64_t flag, double neg_step_size,
               double bc2_sqrt) {
  b.add({p.data_ptr(), g.const_data_ptr(), s1 != nullptr ? s1->data_ptr() : nullptr,
         s2 != nullptr ? s2->data_ptr() : nullptr},
        p.numel(),
        {offset, flag, mt::double_as_word(neg_step_size), mt::double_as_word(bc2_sqrt)});
}

// What both launchers take besides their scalars: the uploaded table and the device pointers of
// k, sigma and update_scale (sigma's contiguous copy held here), seed, step, modality, stream.
struct Launch {
  mt::DeviceTable table;
  at::Tensor sigma;
  int dtype = 0;
  const float* k = nullptr;
  const float* sigma_ptr = nullptr;
  const float* update_scale = nullptr;
  uint64_t seed = 0;
  uint32_t step = 0, modality = 0;
  void* stream = nullptr;
};

Launch prepare(const char* op, const FusedBuilder& builder, at::TensorList params,
               const at::Tensor& k, const std::optional<at::Tensor>& sigma,
               const std::optional<at::Tensor>& update_scale, int64_t seed, int64_t step,
               int64_t modality, const at::Device& device) {
  Launch l;
  l.table = mt::upload(builder, device, op);
  l.sigma = sigma.has_value() ? sigma->contiguous() : at::Tensor();  // a device copy at most
  l.dtype = cuda_dtype_code(params[0].scalar_type());
  l.k = k.const_data_ptr<float>();
  l.sigma_ptr = l.sigma.defined() ? l.sigma.const_data_ptr<float>() : nullptr;
  l.update_scale = update_scale.has_value() ? update_scale->const_data_ptr<float>() : nullptr;
  l.seed = static_cast<uint64_t>(seed);
  l.step = static_cast<uint32_t>(step);
  l.modality = static_cast<uint32_t>(modality);
  l.stream = cuda_current_stream(device);
  return l;
}

}  // namespace

void fused_sgd_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                    const c10::List<bool>& buffer_ready, at::IntArrayRef offsets,
                    const at::Tensor& k, const std::optional<at::Tensor>& sigma,
                    const std::optional<at::Tensor>& update_scale, double lr, double weight_decay,
                    double momentum, double dampening, bool nesterov, bool maximize, int64_t seed,
                    int64_t step, int64_t modality) {
  constexpr const char* op = "fused_sgd_";
  const bool use_momentum = momentum != 0.0;
  check_fused_sgd_inputs(params, grads, momentum_buffers, buffer_ready.size(), use_momentum,
                         offsets, k, sigma, update_scale, c10::DeviceType::CUDA);
  if (params.empty()) return;
  const at::Device device = params[0].device();
  c10::DeviceGuard guard(device);
  FusedBuilder builder(MMMOD_FUSED_CHUNK);
  for (size_t i = 0; i < params.size(); ++i) {
    add_entry(builder, params[i], grads[i], use_momentum ? &momentum_buffers[i] : nullptr,
              nullptr, offsets[i], use_momentum && buffer_ready.get(i) ? 1 : 0, 0.0, 0.0);
  }
  if (!has_elements(params)) return;
  const Launch l = prepare(op, builder, params, k, sigma, update_scale, seed, step, modality, device);
  MmmodSgdScalars s;
  std::memset(&s, 0, sizeof(s));
  // the Python floats torch's _multi_tensor_sgd passes its foreach ops
  s.neg_lr = -lr;
  s.weight_decay = weight_decay;
  s.momentum = momentum;
  s.one_minus_dampening = 1.0 - dampening;
  s.maximize = maximize;
  s.decay = weight_decay != 0.0;
  s.use_momentum = use_momentum;
  s.nesterov = nesterov;
  check_rc(mmmod_cuda_fused_sgd(l.table.words.const_data_ptr(), l.table.ntensors, l.table.nchunks,
                                l.dtype, l.k, l.sigma_ptr, l.update_scale, s, l.seed, l.step,
                                l.modality, l.stream),
           op, "launch");
}

void fused_adam_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                     at::TensorList exp_avg_sqs, at::ArrayRef<double> steps,
                     at::IntArrayRef offsets, const at::Tensor& k,
                     const std::optional<at::Tensor>& sigma,
                     const std::optional<at::Tensor>& update_scale, double lr, double beta1,
                     double beta2, double eps, double weight_decay, bool decoupled, bool maximize,
                     int64_t seed, int64_t step, int64_t modality) {
  constexpr const char* op = "fused_adam_";
  check_fused_adam_inputs(params, grads, exp_avgs, exp_avg_sqs, steps, offsets, k, sigma,
                          update_scale, c10::DeviceType::CUDA);
  if (params.empty()) return;
  const at::Device device = params[0].device();
  c10::DeviceGuard guard(device);
  FusedBuilder builder(MMMOD_FUSED_CHUNK);
  for (size_t i = 0; i < params.size(); ++i) {
    // _multi_tensor_adam's Python float arithmetic (beta ** t is C's pow, as here)
    const double bc1 = 1.0 - std::pow(beta1, steps[i]);
    const double bc2 = 1.0 - std::pow(beta2, steps[i]);
    add_entry(builder, params[i], grads[i], &exp_avgs[i], &exp_avg_sqs[i], offsets[i], 0,
              (lr / bc1) * -1.0, std::pow(bc2, 0.5));
  }
  if (!has_elements(params)) return;
  const Launch l = prepare(op, builder, params, k, sigma, update_scale, seed, step, modality, device);
  MmmodAdamScalars s;
  std::memset(&s, 0, sizeof(s));
  s.weight_decay = weight_decay;
  s.one_minus_beta1 = 1.0 - beta1;
  s.beta2 = beta2;
  s.one_minus_beta2 = 1.0 - beta2;
  s.eps = eps;
  s.decay_mul = 1.0 - lr * weight_decay;
  s.maximize = maximize;
  s.decay = weight_decay != 0.0;
  s.decoupled = decoupled;
  check_rc(mmmod_cuda_fused_adam(l.table.words.const_data_ptr(), l.table.ntensors, l.table.nchunks,
                                 l.dtype, l.k, l.sigma_ptr, l.update_scale, s, l.seed, l.step,
                                 l.modality, l.stream),
           op, "launch");
}

}  // namespace fused_cuda
}  // namespace mmmod

TORCH_LIBRARY_IMPL(mmmod, CUDA, m) {
  m.impl("fused_sgd_", &mmmod::fused_cuda::fused_sgd_cuda);
  m.impl("fused_adam_", &mmmod::fused_cuda::fused_adam_cuda);
}
