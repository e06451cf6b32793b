// CUDA implementation of InfoReg's proximal op (mmmod::proximal_, defined in
// mmmod/_ops/__init__.py): torch glue compiled by the host compiler with c10/ATen headers only;
// the kernels are behind the plain launcher of proximal_api.h (proximal.cu).
//
// No host sync: the table (three data pointers, size, chunks, dtype and Fisher flag per tensor)
// is staged in pinned host memory and copied with non_blocking=true on the current stream, and
// beta stays a device tensor read by the kernels. The upload cannot be captured in a CUDA graph
// (the pinned staging block is recycled once the copy ran), so a call under capture is refused.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "common/ops.h"
#include "cuda/proximal_api.h"

namespace mmmod {
namespace proximal_cuda {
namespace {

void check(int rc, const char* what) {
  TORCH_CHECK(rc == 0, "mmmod.proximal_: CUDA ", what, " failed: ", mmmod_prox_error_string(rc));
}

int64_t dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return MMMOD_PROX_F32;
    case at::kHalf: return MMMOD_PROX_F16;
    case at::kBFloat16: return MMMOD_PROX_BF16;
    case at::kDouble: return MMMOD_PROX_F64;
    default: TORCH_CHECK_TYPE(false, "mmmod.proximal_: unsupported dtype ", t);
  }
}

}  // namespace

at::Tensor proximal_cuda(at::TensorList grads, at::TensorList params, at::TensorList snapshots,
                         const at::Tensor& beta) {
  check_proximal_inputs(grads, params, snapshots, beta);
  const at::Device device = beta.device();
  c10::DeviceGuard guard(device);
  void* stream =
      c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(device).native_handle();
  at::Tensor out = at::zeros({}, beta.options().dtype(at::kDouble));
  // contiguous operands (copies for non-contiguous ones; a copied gradient is written back)
  std::vector<at::Tensor> g, p, p0;
  std::vector<size_t> index;
  std::vector<MmmodProxTensor> metas;
  std::vector<MmmodProxChunk> chunks;
  for (size_t i = 0; i < grads.size(); ++i) {
    const int64_t n = grads[i].numel();
    if (n == 0) continue;
    g.push_back(grads[i].contiguous());
    p.push_back(params[i].contiguous());
    p0.push_back(snapshots[i].contiguous());
    index.push_back(i);
    const int64_t count = (n + MMMOD_PROX_CHUNK - 1) / MMMOD_PROX_CHUNK;
    const int64_t t = static_cast<int64_t>(metas.size());
    metas.push_back({reinterpret_cast<int64_t>(g.back().data_ptr()),
                     reinterpret_cast<int64_t>(p.back().data_ptr()),
                     reinterpret_cast<int64_t>(p0.back().data_ptr()), n,
                     static_cast<int64_t>(chunks.size()), count, dtype_code(grads[i].scalar_type()),
                     grads[i].dim() >= 2 ? 1 : 0});
    for (int64_t c = 0; c < count; ++c) chunks.push_back({t, c * MMMOD_PROX_CHUNK});
  }
  if (metas.empty()) return out;
  int capturing = 0;
  check(mmmod_prox_stream_is_capturing(stream, &capturing), "cudaStreamIsCapturing");
  TORCH_CHECK(!capturing, "mmmod.proximal_: this call uploads its metadata table from pinned host "
              "memory, which cannot be captured in a CUDA graph");
  const int64_t nt = static_cast<int64_t>(metas.size());
  const int64_t nc = static_cast<int64_t>(chunks.size());
  at::Tensor host = at::empty({mmmod_prox_table_words(nt, nc)},
                              at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  char* w = static_cast<char*>(host.data_ptr());
  const int64_t header[2] = {nt, nc};
  std::memcpy(w, header, sizeof(header));
  w += sizeof(header);
  std::memcpy(w, metas.data(), metas.size() * sizeof(MmmodProxTensor));
  w += metas.size() * sizeof(MmmodProxTensor);
  std::memcpy(w, chunks.data(), chunks.size() * sizeof(MmmodProxChunk));
  const at::Tensor table = host.to(device, /*non_blocking=*/true);
  const at::Tensor b = beta.to(at::kFloat).reshape({1}).contiguous();
  at::Tensor partial = at::empty({nc}, beta.options().dtype(at::kDouble));
  check(mmmod_cuda_proximal(table.const_data_ptr(), nt, nc, b.const_data_ptr<float>(),
                            partial.mutable_data_ptr<double>(), out.mutable_data_ptr<double>(),
                            stream),
        "proximal_");
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
