// Host-side helpers shared by the CUDA extension's glue files (cuda_ops.cpp,
// fused_update_cuda.cpp): the current stream as the C launchers take it, and the dtype codes of
// cuda_api.h. Compiled by the host compiler only (ATen), never by nvcc.
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

}  // namespace mmmod
