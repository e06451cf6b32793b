// CUDA implementation of MMPareto's combine ops (mmmod::_pair_moments, mmmod::combine_, defined
// in mmmod/_ops/__init__.py): torch glue compiled by the host compiler with c10/ATen headers
// only; the kernels are behind the plain launchers of combine_cuda_api.h (combine.cu).
//
// No host sync: the table (two data pointers, size, chunks and dtype per tensor) is staged in
// pinned host memory and copied with non_blocking=true on the current stream; the moments, the
// scale, the factors and the weights stay on the device. The upload cannot be captured in a
// CUDA graph (the pinned staging block is recycled once the copy ran): refused under capture.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/library.h>

#include <cstring>
#include <optional>
#include <vector>

#include "common/combine_api.h"
#include "cuda/combine_cuda_api.h"

namespace mmmod {
namespace combine_cuda {
namespace {

void check(int rc, const char* op, const char* what) {
  TORCH_CHECK(rc == 0, op, ": CUDA ", what, " failed: ", mmmod_comb_error_string(rc));
}

int64_t dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return MMMOD_COMB_F32;
    case at::kHalf: return MMMOD_COMB_F16;
    case at::kBFloat16: return MMMOD_COMB_BF16;
    case at::kDouble: return MMMOD_COMB_F64;
    default: TORCH_CHECK_TYPE(false, "mmmod combine: unsupported dtype ", t);
  }
}

// The operands (contiguous; copies of non-contiguous ones) and the device table of one call.
struct Plan {
  std::vector<at::Tensor> f, s;
  at::Tensor table;
  int64_t ntensors = 0, nchunks = 0;
  void* stream = nullptr;
};

Plan make_plan(const char* op, at::TensorList fused, at::TensorList summed,
               const at::Device& device) {
  Plan p;
  p.stream =
      c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(device).native_handle();
  std::vector<MmmodCombTensor> metas;
  std::vector<MmmodCombChunk> chunks;
  for (size_t i = 0; i < summed.size(); ++i) {
    const int64_t n = summed[i].numel();
    p.f.push_back(fused[i].contiguous());
    p.s.push_back(summed[i].contiguous());
    const int64_t count = (n + MMMOD_COMB_CHUNK - 1) / MMMOD_COMB_CHUNK;
    const int64_t t = static_cast<int64_t>(metas.size());
    metas.push_back({reinterpret_cast<int64_t>(p.f.back().data_ptr()),
                     reinterpret_cast<int64_t>(p.s.back().data_ptr()), n,
                     static_cast<int64_t>(chunks.size()), count,
                     dtype_code(summed[i].scalar_type())});
    for (int64_t c = 0; c < count; ++c) chunks.push_back({t, c * MMMOD_COMB_CHUNK});
  }
  p.ntensors = static_cast<int64_t>(metas.size());
  p.nchunks = static_cast<int64_t>(chunks.size());
  int capturing = 0;
  check(mmmod_comb_stream_is_capturing(p.stream, &capturing), op, "cudaStreamIsCapturing");
  TORCH_CHECK(!capturing, op, ": this call uploads its metadata table from pinned host memory, "
              "which cannot be captured in a CUDA graph");
  at::Tensor host = at::empty({mmmod_comb_table_words(p.ntensors, p.nchunks)},
                              at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  char* w = static_cast<char*>(host.data_ptr());
  const int64_t header[2] = {p.ntensors, p.nchunks};
  std::memcpy(w, header, sizeof(header));
  w += sizeof(header);
  std::memcpy(w, metas.data(), metas.size() * sizeof(MmmodCombTensor));
  w += metas.size() * sizeof(MmmodCombTensor);
  std::memcpy(w, chunks.data(), chunks.size() * sizeof(MmmodCombChunk));
  p.table = host.to(device, /*non_blocking=*/true);
  return p;
}

const double* scale_ptr(const std::optional<at::Tensor>& fused_scale, at::Tensor& keep) {
  if (!fused_scale.has_value()) return nullptr;
  keep = fused_scale->reshape({1}).contiguous();
  return keep.const_data_ptr<double>();
}

}  // namespace

at::Tensor pair_moments_cuda(at::TensorList fused, at::TensorList summed,
                             const std::optional<at::Tensor>& fused_scale) {
  const char* op = "mmmod._pair_moments";
  check_pair_inputs(op, fused, summed, fused_scale);
  const at::Device device = summed[0].device();  // a CUDA kernel: there is a tensor
  c10::DeviceGuard guard(device);
  const int64_t n = static_cast<int64_t>(summed.size());
  at::Tensor out = at::zeros({n, 3}, summed[0].options().dtype(at::kDouble));
  Plan p = make_plan(op, fused, summed, device);
  at::Tensor keep;
  const double* sc = scale_ptr(fused_scale, keep);
  at::Tensor partial = at::empty({3 * p.nchunks + 1}, out.options());
  check(mmmod_cuda_pair_moments(p.table.const_data_ptr(), p.ntensors, p.nchunks, sc,
                                partial.mutable_data_ptr<double>(), out.mutable_data_ptr<double>(),
                                p.stream),
        op, "launch");
  return out;
}

at::Tensor combine_cuda(at::TensorList summed, at::TensorList fused, const at::Tensor& moments,
                        double gamma, const std::optional<at::Tensor>& fused_scale) {
  const char* op = "mmmod.combine_";
  check_pair_inputs(op, fused, summed, fused_scale);
  check_combine_moments(op, summed, moments);
  const at::Device device = moments.device();
  c10::DeviceGuard guard(device);
  at::Tensor weights = at::empty({2}, moments.options());
  const at::Tensor mom = moments.contiguous();
  Plan p = make_plan(op, fused, summed, device);
  at::Tensor keep;
  const double* sc = scale_ptr(fused_scale, keep);
  at::Tensor factors = at::empty({2 * p.ntensors + 1}, moments.options());
  check(mmmod_cuda_combine(p.table.const_data_ptr(), p.ntensors, p.nchunks,
                           mom.const_data_ptr<double>(), gamma, sc,
                           factors.mutable_data_ptr<double>(), weights.mutable_data_ptr<double>(),
                           p.stream),
        op, "launch");
  for (size_t t = 0; t < summed.size(); ++t) {
    if (!p.s[t].is_same(summed[t])) summed[t].copy_(p.s[t]);
  }
  return weights;
}

}  // namespace combine_cuda
}  // namespace mmmod

TORCH_LIBRARY_IMPL(mmmod, CUDA, m) {
  m.impl("_pair_moments", &mmmod::combine_cuda::pair_moments_cuda);
  m.impl("combine_", &mmmod::combine_cuda::combine_cuda);
}
