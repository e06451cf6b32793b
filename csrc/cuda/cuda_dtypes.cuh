// The gradient dtypes of the CUDA kernels (kernels.cu, fused_update.cu, proximal.cu): the
// conversions between a stored value and the float / double the kernels compute in, and the
// dispatch from cuda_api.h's dtype code (MMMOD_F32 ...) to the C++ type. CUDA headers only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "cuda/cuda_api.h"

namespace mmmod {

// to_f / to_d: a stored value as float / double; from_f: a float rounded to the stored type
// (round to nearest even).
template <typename T>
struct Cvt;
template <>
struct Cvt<float> {
  static __device__ __forceinline__ float to_f(float v) { return v; }
  static __device__ __forceinline__ double to_d(float v) { return static_cast<double>(v); }
  static __device__ __forceinline__ float from_f(float v) { return v; }
};
template <>
struct Cvt<double> {
  static __device__ __forceinline__ float to_f(double v) { return __double2float_rn(v); }
  static __device__ __forceinline__ double to_d(double v) { return v; }
  static __device__ __forceinline__ double from_f(float v) { return static_cast<double>(v); }
};
template <>
struct Cvt<__half> {
  static __device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
  static __device__ __forceinline__ double to_d(__half v) { return static_cast<double>(__half2float(v)); }
  static __device__ __forceinline__ __half from_f(float v) { return __float2half_rn(v); }
};
template <>
struct Cvt<__nv_bfloat16> {
  static __device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ double to_d(__nv_bfloat16 v) {
    return static_cast<double>(__bfloat162float(v));
  }
  static __device__ __forceinline__ __nv_bfloat16 from_f(float v) { return __float2bfloat16_rn(v); }
};

// f(static_cast<T*>(nullptr)) for the type T of `dtype`; 0, or cudaErrorInvalidValue for a code
// that is not a gradient dtype.
template <typename F>
int dispatch_dtype(int dtype, F&& f) {
  switch (dtype) {
    case MMMOD_F32: f(static_cast<float*>(nullptr)); return 0;
    case MMMOD_F16: f(static_cast<__half*>(nullptr)); return 0;
    case MMMOD_BF16: f(static_cast<__nv_bfloat16*>(nullptr)); return 0;
    case MMMOD_F64: f(static_cast<double*>(nullptr)); return 0;
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}

}  // namespace mmmod
