// CUDA kernels of MMPareto's combine ops (mmmod::_pair_moments, mmmod::combine_; glue:
// combine_cuda.cpp, interface: combine_cuda_api.h; reference: mmmod/reference/combine.py).
// CUDA headers and the project's CUDA headers only, no torch.
//
// 1. MomentsChunk, applied over the common table (multi_tensor.cuh): one block per chunk of
//    MMMOD_COMB_CHUNK elements of one tensor; thread i takes elements i, i + 256, ...
//    (coalesced), forms a = g_mm * scale and b = g_sum - a in
//    float64 with explicitly rounded intrinsics, accumulates a*a, b*b, a*b; a fixed shared-memory
//    tree merges the threads into partial[3 chunk + k].
// 2. moments_finish_kernel: one block per tensor sums its chunks' partials (thread t: chunks
//    t, t + 256, ... in order, then the same tree) into its row.
// 3. factors_kernel, once per modality: one thread: its rows added in order, the sign rule and
//    min-norm weights, each tensor's factors: the reference's float64 operations in its order.
// 4. CombineChunk, applied over the common table: one block per chunk:
//    g_sum <- T(g_mm * c_fused + g_sum * c_summed) in float32 (float64 for float64 gradients),
//    each operation rounded (never an FMA).
// No atomics and a chunking independent of the GPU: deterministic. Gradient bytes per fp32
// element: 8 read (moments) + 8 read + 4 written (combine).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "cuda/combine_cuda_api.h"
#include "cuda/block_reduce.cuh"
#include "cuda/cuda_api.h"
#include "cuda/cuda_dtypes.cuh"
#include "cuda/multi_tensor.cuh"

namespace {

constexpr int kThreads = 256;

using mmmod::Cvt;

template <typename T>
__device__ void chunk_moments(const T* f, const T* s, int64_t len, double scale, double* acc) {
  for (int64_t i = threadIdx.x; i < len; i += kThreads) {
    const double a = __dmul_rn(Cvt<T>::to_d(f[i]), scale);
    const double b = __dsub_rn(Cvt<T>::to_d(s[i]), a);
    acc[0] = __dadd_rn(acc[0], __dmul_rn(a, a));
    acc[1] = __dadd_rn(acc[1], __dmul_rn(b, b));
    acc[2] = __dadd_rn(acc[2], __dmul_rn(a, b));
  }
}

// one chunk: this block's three sums into partial[3 chunk + k]
struct MomentsChunk {
  __device__ void operator()(const mmmod::comb::Table& tb, int64_t c, const double* scale_ptr,
                             double* partial) const {
    using namespace mmmod::comb;
    __shared__ double sh[kThreads];
    const mmmod::mt::ChunkEntry ch = tb.chunks[c];
    const auto te = tb.tensors[ch.tensor];
    const int64_t len = mmmod::mt::chunk_len(te, ch, MMMOD_COMB_CHUNK);
    const double scale = scale_ptr ? *scale_ptr : 1.0;
    double acc[3] = {0.0, 0.0, 0.0};
    switch (te.extra[kDtype]) {
      case MMMOD_F32:
        chunk_moments(reinterpret_cast<const float*>(te.ptr[kFused]) + ch.start,
                      reinterpret_cast<const float*>(te.ptr[kSummed]) + ch.start, len, scale, acc);
        break;
      case MMMOD_F16:
        chunk_moments(reinterpret_cast<const __half*>(te.ptr[kFused]) + ch.start,
                      reinterpret_cast<const __half*>(te.ptr[kSummed]) + ch.start, len, scale, acc);
        break;
      case MMMOD_BF16:
        chunk_moments(reinterpret_cast<const __nv_bfloat16*>(te.ptr[kFused]) + ch.start,
                      reinterpret_cast<const __nv_bfloat16*>(te.ptr[kSummed]) + ch.start, len,
                      scale, acc);
        break;
      default:
        chunk_moments(reinterpret_cast<const double*>(te.ptr[kFused]) + ch.start,
                      reinterpret_cast<const double*>(te.ptr[kSummed]) + ch.start, len, scale, acc);
        break;
    }
    for (int k = 0; k < 3; ++k) {
      const double s = mmmod::block_sum_tree<kThreads>(acc[k], sh);
      if (threadIdx.x == 0) partial[3 * c + k] = s;
    }
  }
};

__global__ void __launch_bounds__(kThreads) moments_finish_kernel(mmmod::comb::Table tb,
                                                                  const double* partial,
                                                                  double* moments) {
  __shared__ double sh[kThreads];
  const int64_t t = blockIdx.x;
  const auto te = tb.tensors[t];
  for (int k = 0; k < 3; ++k) {
    double s = 0.0;
    for (int64_t j = threadIdx.x; j < te.chunk_count; j += kThreads) {
      s = __dadd_rn(s, partial[3 * (te.first_chunk + j) + k]);
    }
    s = mmmod::block_sum_tree<kThreads>(s, sh);
    if (threadIdx.x == 0) moments[3 * t + k] = s;
  }
}

__global__ void factors_kernel(int64_t ntensors, const double* mom, double gamma,
                               double* factors, double* weights) {
  double aa = 0.0, bb = 0.0, ab = 0.0;
  for (int64_t i = 0; i < ntensors; ++i) {
    aa = __dadd_rn(aa, mom[3 * i]);
    bb = __dadd_rn(bb, mom[3 * i + 1]);
    ab = __dadd_rn(ab, mom[3 * i + 2]);
  }
  const double inner =
      __ddiv_rn(__dsub_rn(bb, ab), __dsub_rn(__dadd_rn(aa, bb), __dmul_rn(2.0, ab)));
  const double c = ab >= aa ? 0.999 : (ab >= bb ? 0.001 : inner);
  const double w_mm = ab > 0 ? 0.5 : c;
  const double w_m = ab > 0 ? 0.5 : __dsub_rn(1.0, c);
  weights[0] = w_mm;
  weights[1] = w_m;
  for (int64_t i = 0; i < ntensors; ++i) {
    const double a2 = mom[3 * i], b2 = mom[3 * i + 1], x = mom[3 * i + 2];
    const double t1 = __dmul_rn(__dmul_rn(w_mm, w_mm), a2);
    const double t2 = __dmul_rn(__dmul_rn(w_m, w_m), b2);
    const double t3 = __dmul_rn(__dmul_rn(__dmul_rn(2.0, w_mm), w_m), x);
    double new2 = __dmul_rn(4.0, __dadd_rn(__dadd_rn(t1, t2), t3));
    if (new2 < 0.0) new2 = 0.0;  // clamp_min(0): NaN stays NaN
    const double sum2 = __dadd_rn(__dadd_rn(a2, b2), __dmul_rn(2.0, x));
    const bool grow = (sum2 > new2) && (new2 > 0.0);
    const double d = __dmul_rn(grow ? __dsqrt_rn(__ddiv_rn(sum2, new2)) : 1.0, gamma);
    factors[2 * i] = __dmul_rn(__dmul_rn(2.0, d), __dsub_rn(w_mm, w_m));
    factors[2 * i + 1] = __dmul_rn(__dmul_rn(2.0, d), w_m);
  }
}

template <typename T>
__device__ void chunk_combine(const T* f, T* s, int64_t len, float ca, float cs) {
  for (int64_t i = threadIdx.x; i < len; i += kThreads) {
    s[i] = Cvt<T>::from_f(__fadd_rn(__fmul_rn(Cvt<T>::to_f(f[i]), ca),
                                    __fmul_rn(Cvt<T>::to_f(s[i]), cs)));
  }
}

__device__ void chunk_combine64(const double* f, double* s, int64_t len, double ca, double cs) {
  for (int64_t i = threadIdx.x; i < len; i += kThreads) {
    s[i] = __dadd_rn(__dmul_rn(f[i], ca), __dmul_rn(s[i], cs));
  }
}

// one chunk: g_sum <- c_fused (scale g_mm) + c_summed g_sum with its tensor's factors
struct CombineChunk {
  __device__ void operator()(const mmmod::comb::Table& tb, int64_t c, const double* factors,
                             const double* scale_ptr) const {
    using namespace mmmod::comb;
    const mmmod::mt::ChunkEntry ch = tb.chunks[c];
    const auto te = tb.tensors[ch.tensor];
    const int64_t len = mmmod::mt::chunk_len(te, ch, MMMOD_COMB_CHUNK);
    const double ca = scale_ptr ? __dmul_rn(factors[2 * ch.tensor], *scale_ptr)
                                : factors[2 * ch.tensor];
    const double cs = factors[2 * ch.tensor + 1];
    const float caf = __double2float_rn(ca), csf = __double2float_rn(cs);
    switch (te.extra[kDtype]) {
      case MMMOD_F32:
        chunk_combine(reinterpret_cast<const float*>(te.ptr[kFused]) + ch.start,
                      reinterpret_cast<float*>(te.ptr[kSummed]) + ch.start, len, caf, csf);
        break;
      case MMMOD_F16:
        chunk_combine(reinterpret_cast<const __half*>(te.ptr[kFused]) + ch.start,
                      reinterpret_cast<__half*>(te.ptr[kSummed]) + ch.start, len, caf, csf);
        break;
      case MMMOD_BF16:
        chunk_combine(reinterpret_cast<const __nv_bfloat16*>(te.ptr[kFused]) + ch.start,
                      reinterpret_cast<__nv_bfloat16*>(te.ptr[kSummed]) + ch.start, len, caf, csf);
        break;
      default:
        chunk_combine64(reinterpret_cast<const double*>(te.ptr[kFused]) + ch.start,
                        reinterpret_cast<double*>(te.ptr[kSummed]) + ch.start, len, ca, cs);
        break;
    }
  }
};

}  // namespace

extern "C" {

int mmmod_cuda_pair_moments(const void* table, int64_t ntensors, int64_t nchunks,
                            const double* scale, double* partial, double* moments, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const auto tb = mmmod::comb::Table::view(table, ntensors, nchunks);
  const int rc = mmmod::mt::multi_tensor_apply<kThreads>(tb, s, MomentsChunk{}, scale, partial);
  if (rc != 0) return rc;
  if (ntensors > 0) {
    moments_finish_kernel<<<static_cast<unsigned>(ntensors), kThreads, 0, s>>>(tb, partial,
                                                                               moments);
  }
  return static_cast<int>(cudaGetLastError());
}

int mmmod_cuda_combine(const void* table, int64_t ntensors, int64_t nchunks, const double* moments,
                       const int64_t* groups, int64_t ngroups, double gamma, const double* scale,
                       double* factors, double* weights, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  int64_t start = 0;
  for (int64_t g = 0; g < ngroups; ++g) {  // one modality per launch: a few, each tiny
    factors_kernel<<<1, 1, 0, s>>>(groups[g], moments + 3 * start, gamma, factors + 2 * start,
                                   weights + 2 * g);
    start += groups[g];
  }
  const cudaError_t rc = cudaGetLastError();
  if (rc != cudaSuccess) return static_cast<int>(rc);
  const auto tb = mmmod::comb::Table::view(table, ntensors, nchunks);
  return mmmod::mt::multi_tensor_apply<kThreads>(tb, s, CombineChunk{}, factors, scale);
}

}  // extern "C"
