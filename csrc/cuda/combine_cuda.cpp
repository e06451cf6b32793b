// CUDA implementation of MMPareto's combine ops (mmmod::_pair_moments, mmmod::combine_, defined
// in mmmod/_ops/__init__.py): torch glue compiled by the host compiler with c10/ATen headers
// only; the kernels are behind the plain launchers of combine_cuda_api.h (combine.cu).
//
// No host sync: the common table (multi_tensor_table.h: two data pointers, size, chunks and
// dtype per tensor) is uploaded without a sync (or found in the uploader's cache); the moments,
// the scale, the factors and the weights stay on the device. The upload cannot be captured in a
// CUDA graph (the pinned staging block is recycled once the copy ran): refused under capture.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "common/combine_api.h"
#include "cuda/combine_cuda_api.h"
#include "cuda/cuda_api.h"
#include "cuda/cuda_glue.h"
#include "cuda/multi_tensor_table.h"

namespace mmmod {
namespace combine_cuda {
namespace {

// The operands (contiguous; copies of non-contiguous ones) and the device table of one call.
struct Plan {
  std::vector<at::Tensor> f, s;
  mt::DeviceTable table;
  void* stream = nullptr;
};

// `name` is the op's schema name (the uploader's messages read "mmmod.<name>: ...").
Plan make_plan(const char* name, at::TensorList fused, at::TensorList summed,
               const at::Device& device) {
  Plan p;
  p.stream = cuda_current_stream(device);
  mt::TableBuilder<comb::kDepth, comb::kExtra> builder(MMMOD_COMB_CHUNK);
  for (size_t i = 0; i < summed.size(); ++i) {
    p.f.push_back(fused[i].contiguous());
    p.s.push_back(summed[i].contiguous());
    builder.add({p.f.back().data_ptr(), p.s.back().data_ptr()}, summed[i].numel(),
                {kernel_dtype(summed[i].scalar_type(), "mmmod combine")});
  }
  p.table = mt::upload(builder, device, name);
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
  Plan p = make_plan("_pair_moments", fused, summed, device);
  at::Tensor keep;
  const double* sc = scale_ptr(fused_scale, keep);
  at::Tensor partial = at::empty({3 * p.table.nchunks + 1}, out.options());
  check_launch(mmmod_cuda_pair_moments(p.table.words.const_data_ptr(), p.table.ntensors, p.table.nchunks, sc,
                                       partial.mutable_data_ptr<double>(), out.mutable_data_ptr<double>(),
                                       p.stream),
               op, "launch");
  return out;
}

at::Tensor combine_cuda(at::TensorList summed, at::TensorList fused,
                        const std::optional<at::Tensor>& moments, at::IntArrayRef groups,
                        double gamma, const std::optional<at::Tensor>& fused_scale) {
  const char* op = "mmmod.combine_";
  check_pair_inputs(op, fused, summed, fused_scale);
  if (moments.has_value()) check_combine_moments(op, summed, *moments);
  check_combine_groups(op, summed, groups);
  const at::Device device = summed[0].device();  // groups >= 1 tensor each: there is one
  c10::DeviceGuard guard(device);
  // no moments given: this call's own first pass (no collective between the two passes)
  const at::Tensor mom = moments.has_value() ? moments->contiguous()
                                             : pair_moments_cuda(fused, summed, fused_scale);
  at::Tensor weights = at::empty({static_cast<int64_t>(groups.size()), 2}, mom.options());
  Plan p = make_plan("combine_", fused, summed, device);
  at::Tensor keep;
  const double* sc = scale_ptr(fused_scale, keep);
  at::Tensor factors = at::empty({2 * p.table.ntensors + 1}, mom.options());
  check_launch(mmmod_cuda_combine(p.table.words.const_data_ptr(), p.table.ntensors, p.table.nchunks,
                                  mom.const_data_ptr<double>(), groups.data(),
                                  static_cast<int64_t>(groups.size()), gamma, sc,
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
