// CUDA implementation of the fused modulated update (ops mmmod::fused_sgd_ / fused_adam_,
// defined in mmmod/_ops/__init__.py; the definition is mmmod/reference/fused.py): torch glue
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

#include "cuda/cuda_api.h"
#include "cuda/cuda_glue.h"
#include "cuda/fused_update_api.h"
#include "common/ops.h"

namespace mmmod {
namespace fused_cuda {
namespace {

void check_rc(int rc, const char* op, const char* what) {
  TORCH_CHECK(rc == 0, "mmmod.", op, ": CUDA ", what, " failed: ", mmmod_cuda_error_string(rc));
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
  check_rc(mmmod_cuda_stream_is_capturing(cuda_current_stream(device), &capturing), op,
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

// What both launchers take besides their scalars: the uploaded table and the device pointers of
// k, sigma and update_scale (sigma's contiguous copy held here), seed, step, modality, stream.
struct Launch {
  Table table;
  at::Tensor sigma;
  int dtype = 0;
  const float* k = nullptr;
  const float* sigma_ptr = nullptr;
  const float* update_scale = nullptr;
  uint64_t seed = 0;
  uint32_t step = 0, modality = 0;
  void* stream = nullptr;
};

Launch prepare(const char* op, const std::vector<MmmodFusedTensor>& metas, at::TensorList params,
               const at::Tensor& k, const std::optional<at::Tensor>& sigma,
               const std::optional<at::Tensor>& update_scale, int64_t seed, int64_t step,
               int64_t modality, const at::Device& device) {
  Launch l;
  l.table = upload(op, metas, device);
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
  std::vector<MmmodFusedTensor> metas;
  for (size_t i = 0; i < params.size(); ++i) {
    metas.push_back(entry(params[i], grads[i], use_momentum ? &momentum_buffers[i] : nullptr,
                          nullptr, offsets[i]));
    metas.back().flag = use_momentum && buffer_ready.get(i) ? 1 : 0;
  }
  if (!has_elements(params)) return;
  const Launch l = prepare(op, metas, params, k, sigma, update_scale, seed, step, modality, device);
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
  const Launch l = prepare(op, metas, params, k, sigma, update_scale, seed, step, modality, device);
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
