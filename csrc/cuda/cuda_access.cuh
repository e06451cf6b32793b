// Global-memory accesses of the CUDA kernels (kernels.cu, fused_update.cu): one copy of the
// scalar and vector loads and stores both files make on gradients, parameters and optimizer
// state. CUDA headers only (no torch).
//
// Every access names the global space with ld.global.cg / st.global.cg (__ldcg / __stcg): the
// pointers come from an int64 table, so the compiler cannot infer the space and would emit
// generic LD/ST otherwise; .cg caches in L2 only, since each element is touched once per kernel.
// Everything is __host__ __device__: on the host (fused_update.cu's chunk code run by
// tests/test_fused_update_cuda.py on CPU tensors) the accesses are plain loads and stores.
//
// Vector accesses move the raw stored values (no conversion): the kernels convert to their
// arithmetic type themselves. Widths: a 4-element group is one float4 for float, 2 x double2 for
// double, one 8-byte uint2 (2 x half2 / bfloat162) for 16-bit types; an 8-element tile is
// 2 x float4, 4 x double2, or one 16-byte uint4. The pointer must be aligned to the access
// (group_aligned / aligned16 check it).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#define MMMOD_ACCESS_HD __host__ __device__ __forceinline__

namespace mmmod {
namespace access {

template <typename T>
MMMOD_ACCESS_HD T load(const T* p) {
#if defined(__CUDA_ARCH__)
  return __ldcg(p);
#else
  return *p;
#endif
}

template <typename T>
MMMOD_ACCESS_HD void store(T* p, T v) {
#if defined(__CUDA_ARCH__)
  __stcg(p, v);
#else
  *p = v;
#endif
}

MMMOD_ACCESS_HD bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

// Whether p (null counts as aligned: an absent array) can take Vec4 accesses: aligned to
// 4 elements' width, capped at 16 bytes.
template <typename T>
MMMOD_ACCESS_HD bool group_aligned(const void* p) {
  constexpr uintptr_t width = 4 * sizeof(T) < 16 ? 4 * sizeof(T) : 16;
  return p == nullptr || (reinterpret_cast<uintptr_t>(p) & (width - 1)) == 0;
}

// ---- 4 elements (one Philox counter group): one vector access per 16 bytes ---------------------
template <typename T>
struct Vec4;
template <>
struct Vec4<float> {
  static MMMOD_ACCESS_HD void load4(const float* p, float* v) {
    const float4 a = load(reinterpret_cast<const float4*>(p));
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
  }
  static MMMOD_ACCESS_HD void store4(float* p, const float* v) {
    store(reinterpret_cast<float4*>(p), make_float4(v[0], v[1], v[2], v[3]));
  }
};
template <>
struct Vec4<double> {
  static MMMOD_ACCESS_HD void load4(const double* p, double* v) {
    const double2 a = load(reinterpret_cast<const double2*>(p));
    const double2 b = load(reinterpret_cast<const double2*>(p) + 1);
    v[0] = a.x; v[1] = a.y; v[2] = b.x; v[3] = b.y;
  }
  static MMMOD_ACCESS_HD void store4(double* p, const double* v) {
    store(reinterpret_cast<double2*>(p), make_double2(v[0], v[1]));
    store(reinterpret_cast<double2*>(p) + 1, make_double2(v[2], v[3]));
  }
};
// 16-bit types: one 8-byte access (uint2) holding 2 x half2 / bfloat162
template <typename T>
struct Vec4Half {
  static MMMOD_ACCESS_HD void load4(const T* p, T* v) {
    const uint2 raw = load(reinterpret_cast<const uint2*>(p));
    const T* h = reinterpret_cast<const T*>(&raw);
    v[0] = h[0]; v[1] = h[1]; v[2] = h[2]; v[3] = h[3];
  }
  static MMMOD_ACCESS_HD void store4(T* p, const T* v) {
    uint2 raw;
    T* h = reinterpret_cast<T*>(&raw);
    h[0] = v[0]; h[1] = v[1]; h[2] = v[2]; h[3] = v[3];
    store(reinterpret_cast<uint2*>(p), raw);
  }
};
template <>
struct Vec4<__half> : Vec4Half<__half> {};
template <>
struct Vec4<__nv_bfloat16> : Vec4Half<__nv_bfloat16> {};

// ---- 8 elements (a statistics tile): 16-byte vector loads, p 16-byte aligned ------------------
template <typename T>
struct Vec8;
template <>
struct Vec8<float> {
  static MMMOD_ACCESS_HD void load8(const float* p, float* v) {
    Vec4<float>::load4(p, v);
    Vec4<float>::load4(p + 4, v + 4);
  }
};
template <>
struct Vec8<double> {
  static MMMOD_ACCESS_HD void load8(const double* p, double* v) {
    Vec4<double>::load4(p, v);
    Vec4<double>::load4(p + 4, v + 4);
  }
};
template <typename T>
struct Vec8Half {
  static MMMOD_ACCESS_HD void load8(const T* p, T* v) {
    const uint4 raw = load(reinterpret_cast<const uint4*>(p));
    const T* h = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = h[i];
  }
};
template <>
struct Vec8<__half> : Vec8Half<__half> {};
template <>
struct Vec8<__nv_bfloat16> : Vec8Half<__nv_bfloat16> {};

}  // namespace access
}  // namespace mmmod
