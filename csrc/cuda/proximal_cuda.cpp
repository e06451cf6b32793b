// CUDA implementation of InfoReg's proximal op (mmmod::proximal_, defined in
// mmmod/_ops/__init__.py): torch glue compiled by the host compiler with c10/ATen headers only;
// the kernels are behind the plain launcher of proximal_api.h (proximal.cu).
//
// No host sync: the common table (multi_tensor_table.h: three data pointers, size, chunks, dtype
// and Fisher flag per tensor) is uploaded without a sync (or found in the uploader's cache), and
// beta stays a device tensor read by the kernels. The upload cannot be captured in a CUDA graph
// (the pinned staging block is recycled once the copy ran), so a call under capture is refused.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/library.h>

#include <vector>

#include "common/ops.h"
#include "cuda/cuda_api.h"
#include "cuda/cuda_glue.h"
#include "cuda/multi_tensor_table.h"
#include "cuda/proximal_api.h"

namespace mmmod {
namespace proximal_cuda {
namespace {

}  // namespace

at::Tensor proximal_cuda(at::TensorList grads, at::TensorList params, at::TensorList snapshots,
                         const at::Tensor& beta) {
  check_proximal_inputs(grads, params, snapshots, beta);
  const at::Device device = beta.device();
  c10::DeviceGuard guard(device);
  at::Tensor out = at::zeros({}, beta.options().dtype(at::kDouble));
  // contiguous operands (copies for non-contiguous ones; a copied gradient is written back)
  std::vector<at::Tensor> g, p, p0;
  std::vector<size_t> index;
  mt::TableBuilder<prox::kDepth, prox::kExtra> builder(MMMOD_PROX_CHUNK);
  for (size_t i = 0; i < grads.size(); ++i) {
    const int64_t n = grads[i].numel();
    if (n == 0) continue;
    g.push_back(grads[i].contiguous());
    p.push_back(params[i].contiguous());
    p0.push_back(snapshots[i].contiguous());
    index.push_back(i);
    builder.add({g.back().data_ptr(), p.back().data_ptr(), p0.back().data_ptr()}, n,
                {kernel_dtype(grads[i].scalar_type(), "mmmod.proximal_"), grads[i].dim() >= 2 ? 1 : 0});
  }
  if (builder.ntensors() == 0) return out;
  const mt::DeviceTable table = mt::upload(builder, device, "proximal_");
  const at::Tensor b = beta.to(at::kFloat).reshape({1}).contiguous();
  at::Tensor partial = at::empty({table.nchunks}, beta.options().dtype(at::kDouble));
  check_launch(mmmod_cuda_proximal(table.words.const_data_ptr(), table.ntensors, table.nchunks,
                                   b.const_data_ptr<float>(), partial.mutable_data_ptr<double>(),
                                   out.mutable_data_ptr<double>(), cuda_current_stream(device)),
               "mmmod.proximal_", "proximal_");
  // beta is not known here: a copied gradient goes back whatever it is (unchanged when 0)
  for (size_t k = 0; k < index.size(); ++k) {
    if (!g[k].is_same(grads[index[k]])) grads[index[k]].copy_(g[k]);
  }
  return out;
}

}  // namespace proximal_cuda
}  // namespace mmmod

TORCH_LIBRARY_IMPL(mmmod, CUDA, m) {
  m.impl("proximal_", &mmmod::proximal_cuda::proximal_cuda);
}
