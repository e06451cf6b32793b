// CUDA implementation of the fused modulated update (ops mmmod::fused_sgd_ / fused_adam_,
// defined in mmmod/ops_fused.py; the definition is mmmod/optim/fused.py's reference): torch glue
// compiled by the host compiler with c10/ATen headers only; the kernels are behind the plain
// launchers of fused_update_api.h (fused_update.cu).
//
// Every argument is checked (list lengths, device, dtype, shape, contiguity, k / sigma /
// update_scale, Adam's step counts) before the table is built or anything is launched, so a bad
// call writes nothing. No host sync: the table (pointers, sizes, stream offsets, flags, and
// Adam's per-tensor bias corrections, from the host-side step counts) is staged in pinned host
// memory and copied with non_blocking=true on the current stream; k, sigma and update_scale stay
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

#include "cuda_api.h"
#include "fused_update_api.h"

namespace mmmod {
namespace fused_cuda {
namespace {

void* current_stream(const at::Device& device) {
  return c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(device).native_handle();
}

void check_rc(int rc, const char* op, const char* what) {
  TORCH_CHECK(rc == 0, "mmmod.", op, ": CUDA ", what, " failed: ", mmmod_cuda_error_string(rc));
}

int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return MMMOD_F32;
    case at::kHalf: return MMMOD_F16;
    case at::kBFloat16: return MMMOD_BF16;
    case at::kDouble: return MMMOD_F64;
    default: return -1;
  }
}

// xs[i] must be a contiguous tensor like params[i] (device, dtype, shape)
void check_like(const char* op, const char* what, at::TensorList params, at::TensorList xs) {
  TORCH_CHECK_VALUE(xs.size() == params.size(), "mmmod.", op, ": ", params.size(), " params but ",
                    xs.size(), " ", what);
  for (size_t i = 0; i < xs.size(); ++i) {
    const at::Tensor& x = xs[i];
    const at::Tensor& p = params[i];
    TORCH_CHECK_VALUE(x.device() == p.device() && x.scalar_type() == p.scalar_type() &&
                          x.sizes() == p.sizes() && x.is_contiguous(),
                      "mmmod.", op, ": ", what, " ", i, " must be a contiguous ", p.scalar_type(),
                      " tensor of shape ", p.sizes(), " on ", p.device(), ", like param ", i,
                      "; got ", x.scalar_type(), " ", x.sizes(), " on ", x.device(),
                      x.is_contiguous() ? "" : " (not contiguous)");
  }
}

// One element, float32, on the bucket's device.
void check_scalar_tensor(const char* op, const char* what, const at::Tensor& t,
                         const at::Device& device) {
  TORCH_CHECK_VALUE(t.numel() == 1 && t.scalar_type() == at::kFloat && t.device() == device,
                    "mmmod.", op, ": ", what, " must be a one-element float32 tensor on ", device,
                    "; got ", t.scalar_type(), " ", t.sizes(), " on ", t.device());
}

// The checks every fused op makes; returns false for an empty bucket (nothing to do).
bool check_common(const char* op, at::TensorList params, at::TensorList grads,
                  at::IntArrayRef offsets, const at::Tensor& k,
                  const std::optional<at::Tensor>& sigma,
                  const std::optional<at::Tensor>& update_scale) {
  TORCH_CHECK_VALUE(offsets.size() == params.size(), "mmmod.", op, ": ", params.size(),
                    " params but ", offsets.size(), " offsets");
  TORCH_CHECK_VALUE(grads.size() == params.size(), "mmmod.", op, ": ", params.size(),
                    " params but ", grads.size(), " grads");
  if (params.empty()) return false;
  const at::Device device = params[0].device();
  const at::ScalarType dtype = params[0].scalar_type();
  TORCH_CHECK_VALUE(device.is_cuda(), "mmmod.", op, ": param 0 is on ", device,
                    "; the CUDA kernel takes CUDA tensors");
  TORCH_CHECK_TYPE(dtype_code(dtype) >= 0, "mmmod.", op, ": param 0 has dtype ", dtype,
                   "; expected float32, float16, bfloat16 or float64");
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK_VALUE(p.device() == device && p.scalar_type() == dtype && p.is_contiguous(),
                      "mmmod.", op, ": param ", i, " must be a contiguous ", dtype,
                      " tensor on ", device, ", like param 0; got ", p.scalar_type(), " on ",
                      p.device(), p.is_contiguous() ? "" : " (not contiguous)");
    TORCH_CHECK_VALUE(offsets[i] >= 0, "mmmod.", op, ": offset ", i, " is ", offsets[i],
                      "; stream offsets are >= 0");
  }
  check_like(op, "grads", params, grads);
  check_scalar_tensor(op, "k", k, device);
  if (sigma.has_value()) {
    TORCH_CHECK_VALUE(sigma->scalar_type() == at::kFloat && sigma->device() == device &&
                          sigma->is_contiguous() &&
                          sigma->numel() == static_cast<int64_t>(params.size()),
                      "mmmod.", op, ": sigma must be a contiguous float32 tensor on ", device,
                      " with one value per param (", params.size(), "); got ",
                      sigma->scalar_type(), " ", sigma->sizes(), " on ", sigma->device());
  }
  if (update_scale.has_value()) check_scalar_tensor(op, "update_scale", *update_scale, device);
  return true;
}

bool has_elements(at::TensorList params) {
  for (const auto& p : params) {
    if (p.numel() > 0) return true;
  }
  return false;
}

int64_t chunks_of(int64_t numel) { return (numel + MMMOD_FUSED_CHUNK - 1) / MMMOD_FUSED_CHUNK; }

struct Table {
  at::Tensor words;  // on the device
  int64_t ntensors = 0, nchunks = 0;
};

// Header, tensor entries and chunk entries, uploaded without a sync (refused under capture).
Table upload(const char* op, const std::vector<MmmodFusedTensor>& metas, const at::Device& device) {
  int capturing = 0;
  check_rc(mmmod_cuda_stream_is_capturing(current_stream(device), &capturing), op,
           "cudaStreamIsCapturing");
  TORCH_CHECK(!capturing, "mmmod.", op, ": this call uploads its metadata table from pinned host "
              "memory, which cannot be captured in a CUDA graph");
  std::vector<MmmodFusedChunk> chunks;
  for (size_t t = 0; t < metas.size(); ++t) {
    for (int64_t c = 0; c < chunks_of(metas[t].numel); ++c) {
      chunks.push_back({static_cast<int64_t>(t), c * MMMOD_FUSED_CHUNK});
    }
  }
  Table out;
  out.ntensors = static_cast<int64_t>(metas.size());
  out.nchunks = static_cast<int64_t>(chunks.size());
  at::Tensor host = at::empty({mmmod_fused_table_words(out.ntensors, out.nchunks)},
                              at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  char* w = static_cast<char*>(host.data_ptr());
  const int64_t header[2] = {out.ntensors, out.nchunks};
  std::memcpy(w, header, sizeof(header));
  w += sizeof(header);
  std::memcpy(w, metas.data(), metas.size() * sizeof(MmmodFusedTensor));
  w += metas.size() * sizeof(MmmodFusedTensor);
  if (!chunks.empty()) std::memcpy(w, chunks.data(), chunks.size() * sizeof(MmmodFusedChunk));
  out.words = host.to(device, /*non_blocking=*/true);
  return out;
}

MmmodFusedTensor entry(const at::Tensor& p, const at::Tensor& g, const at::Tensor* s1,
                       const at::Tensor* s2, int64_t offset) {
  MmmodFusedTensor e;
  std::memset(&e, 0, sizeof(e));
  e.param = reinterpret_cast<int64_t>(p.data_ptr());
  e.grad = reinterpret_cast<int64_t>(g.const_data_ptr());
  e.state1 = s1 != nullptr ? reinterpret_cast<int64_t>(s1->data_ptr()) : 0;
  e.state2 = s2 != nullptr ? reinterpret_cast<int64_t>(s2->data_ptr()) : 0;
  e.numel = p.numel();
  e.offset = offset;
  return e;
}

}  // namespace

void fused_sgd_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                    const c10::List<bool>& buffer_ready, at::IntArrayRef offsets,
                    const at::Tensor& k, const std::optional<at::Tensor>& sigma,
                    const std::optional<at::Tensor>& update_scale, double lr, double weight_decay,
                    double momentum, double dampening, bool nesterov, bool maximize, int64_t seed,
                    int64_t step, int64_t modality) {
  constexpr const char* op = "fused_sgd_";
  if (!check_common(op, params, grads, offsets, k, sigma, update_scale)) return;
  const bool use_momentum = momentum != 0.0;
  if (use_momentum) {
    check_like(op, "momentum_buffers", params, momentum_buffers);
    TORCH_CHECK_VALUE(buffer_ready.size() == params.size(), "mmmod.", op, ": ", params.size(),
                      " params but ", buffer_ready.size(), " buffer_ready flags");
  }
  const at::Device device = params[0].device();
  c10::DeviceGuard guard(device);
  std::vector<MmmodFusedTensor> metas;
  for (size_t i = 0; i < params.size(); ++i) {
    metas.push_back(entry(params[i], grads[i], use_momentum ? &momentum_buffers[i] : nullptr,
                          nullptr, offsets[i]));
    metas.back().flag = use_momentum && buffer_ready.get(i) ? 1 : 0;
  }
  if (!has_elements(params)) return;
  const Table t = upload(op, metas, device);
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
  check_rc(mmmod_cuda_fused_sgd(t.words.const_data_ptr(), t.ntensors, t.nchunks,
                                dtype_code(params[0].scalar_type()), k.const_data_ptr<float>(),
                                sigma.has_value() ? sigma->const_data_ptr<float>() : nullptr,
                                update_scale.has_value() ? update_scale->const_data_ptr<float>()
                                                         : nullptr,
                                s, static_cast<uint64_t>(seed), static_cast<uint32_t>(step),
                                static_cast<uint32_t>(modality), current_stream(device)),
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
  TORCH_CHECK_VALUE(steps.size() == params.size(), "mmmod.", op, ": ", params.size(),
                    " params but ", steps.size(), " steps");
  for (size_t i = 0; i < steps.size(); ++i) {
    TORCH_CHECK_VALUE(steps[i] >= 1.0, "mmmod.", op, ": step ", i, " is ", steps[i],
                      "; the count after this step's increment is at least 1");
  }
  if (!check_common(op, params, grads, offsets, k, sigma, update_scale)) return;
  check_like(op, "exp_avgs", params, exp_avgs);
  check_like(op, "exp_avg_sqs", params, exp_avg_sqs);
  const at::Device device = params[0].device();
  c10::DeviceGuard guard(device);
  std::vector<MmmodFusedTensor> metas;
  for (size_t i = 0; i < params.size(); ++i) {
    metas.push_back(entry(params[i], grads[i], &exp_avgs[i], &exp_avg_sqs[i], offsets[i]));
    // _multi_tensor_adam's Python float arithmetic (beta ** t is C's pow, as here)
    const double bc1 = 1.0 - std::pow(beta1, steps[i]);
    const double bc2 = 1.0 - std::pow(beta2, steps[i]);
    metas.back().neg_step_size = (lr / bc1) * -1.0;
    metas.back().bc2_sqrt = std::pow(bc2, 0.5);
  }
  if (!has_elements(params)) return;
  const Table t = upload(op, metas, device);
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
  check_rc(mmmod_cuda_fused_adam(t.words.const_data_ptr(), t.ntensors, t.nchunks,
                                 dtype_code(params[0].scalar_type()), k.const_data_ptr<float>(),
                                 sigma.has_value() ? sigma->const_data_ptr<float>() : nullptr,
                                 update_scale.has_value() ? update_scale->const_data_ptr<float>()
                                                          : nullptr,
                                 s, static_cast<uint64_t>(seed), static_cast<uint32_t>(step),
                                 static_cast<uint32_t>(modality), current_stream(device)),
           op, "launch");
}

}  // namespace fused_cuda
}  // namespace mmmod

TORCH_LIBRARY_IMPL(mmmod, CUDA, m) {
  m.impl("fused_sgd_", &mmmod::fused_cuda::fused_sgd_cuda);
  m.impl("fused_adam_", &mmmod::fused_cuda::fused_adam_cuda);
}
