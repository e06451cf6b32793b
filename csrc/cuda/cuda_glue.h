// Host-side helpers shared by the CUDA extension's glue files (cuda_ops.cpp, proximal_cuda.cpp,
// combine_cuda.cpp, fused_update_cuda.cpp): the current stream as the C launchers take it, the
// dtype codes of cuda_api.h and the launchers' return codes as errors. Compiled by the host
// compiler only (ATen), never by nvcc.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include "cuda/cuda_api.h"

namespace mmmod {

// The current CUDA stream of `device` as the launchers' `void*` (cudaStream_t).
inline void* cuda_current_stream(const at::Device& device) {
  return c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(device).native_handle();
}

// cuda_api.h's code of a gradient dtype (MMMOD_F32 ...), -1 for any other dtype.
inline int cuda_dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return MMMOD_F32;
    case at::kHalf: return MMMOD_F16;
    case at::kBFloat16: return MMMOD_BF16;
    case at::kDouble: return MMMOD_F64;
    default: return -1;
  }
}

// cuda_dtype_code, or a TypeError naming the op: "<op>: unsupported dtype <t>".
inline int64_t kernel_dtype(at::ScalarType t, const char* op) {
  const int code = cuda_dtype_code(t);
  TORCH_CHECK_TYPE(code >= 0, op, ": unsupported dtype ", t);
  return code;
}

// A C launcher's return code (0, or the cudaError_t it met) as an error naming the op and step:
// "<op>: CUDA <what> failed: <CUDA's text>".
inline void check_launch(int rc, const char* op, const char* what) {
  TORCH_CHECK(rc == 0, op, ": CUDA ", what, " failed: ", mmmod_cuda_error_string(rc));
}

}  // namespace mmmod
