// CUDA kernels of InfoReg's proximal op (mmmod::proximal_; glue: proximal_cuda.cpp, interface:
// proximal_api.h). CUDA headers and the project's CUDA headers only, no torch.
//
// 1. ProximalChunk, applied over the common table (multi_tensor.cuh): one block per chunk of
//    MMMOD_PROX_CHUNK elements of one tensor. Thread i takes elements i, i + 256, ...
//    (coalesced), forms g + beta (p - p0) in float32 with
//    explicitly rounded intrinsics (never contracted to an FMA, whatever -fmad says), stores it
//    rounded to the tensor's dtype, and accumulates the square of the stored value in float64;
//    the block's threads are then merged in a fixed shared-memory tree into partial[chunk].
//    beta == 0 (read from device memory, the same value for every block): nothing is stored, so
//    the gradients stay bit-identical, and the squares are those of the gradients as they are.
// 2. proximal_finish_kernel: one block walks the tensors in order; per tensor its threads sum
//    the chunk partials (thread t: chunks t, t + 256, ... in order), the same fixed tree merges
//    them, and thread 0 adds sum / numel for the tensors that count for the Fisher.
// No atomics and a chunking independent of the GPU: the result is deterministic. Bytes per fp32
// element: 12 read + 4 written (beta != 0), 4 read (beta == 0).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "cuda/block_reduce.cuh"
#include "cuda/cuda_api.h"
#include "cuda/cuda_dtypes.cuh"
#include "cuda/multi_tensor.cuh"
#include "cuda/proximal_api.h"

namespace {

constexpr int kThreads = 256;

using mmmod::Cvt;  // stored value <-> float / double (csrc/cuda/cuda_dtypes.cuh)

// this thread's float64 sum of squares over its elements of one chunk
template <typename T>
__device__ double chunk_pass(T* g, const T* p, const T* p0, int64_t len, float beta) {
  double acc = 0.0;
  if (beta != 0.0f) {  // NaN != 0: a NaN beta writes NaN, as the reference
    for (int64_t i = threadIdx.x; i < len; i += kThreads) {
      const float d = __fsub_rn(Cvt<T>::to_f(p[i]), Cvt<T>::to_f(p0[i]));
      const T r = Cvt<T>::from_f(__fadd_rn(Cvt<T>::to_f(g[i]), __fmul_rn(beta, d)));
      g[i] = r;
      const double x = Cvt<T>::to_d(r);
      acc = __dadd_rn(acc, __dmul_rn(x, x));
    }
  } else {
    for (int64_t i = threadIdx.x; i < len; i += kThreads) {
      const double x = Cvt<T>::to_d(g[i]);
      acc = __dadd_rn(acc, __dmul_rn(x, x));
    }
  }
  return acc;
}

// one chunk of the table: its elements' pass, then the block's sum into partial[chunk]
struct ProximalChunk {
  __device__ void operator()(const mmmod::prox::Table& tb, int64_t c, const float* beta,
                             double* partial) const {
    using namespace mmmod::prox;
    __shared__ double sh[kThreads];
    const mmmod::mt::ChunkEntry ch = tb.chunks[c];
    const auto te = tb.tensors[ch.tensor];
    const int64_t len = mmmod::mt::chunk_len(te, ch, MMMOD_PROX_CHUNK);
    const float b = *beta;
    double acc = 0.0;
    switch (te.extra[kDtype]) {
      case MMMOD_F32:
        acc = chunk_pass(reinterpret_cast<float*>(te.ptr[kGrad]) + ch.start,
                         reinterpret_cast<const float*>(te.ptr[kParam]) + ch.start,
                         reinterpret_cast<const float*>(te.ptr[kSnapshot]) + ch.start, len, b);
        break;
      case MMMOD_F16:
        acc = chunk_pass(reinterpret_cast<__half*>(te.ptr[kGrad]) + ch.start,
                         reinterpret_cast<const __half*>(te.ptr[kParam]) + ch.start,
                         reinterpret_cast<const __half*>(te.ptr[kSnapshot]) + ch.start, len, b);
        break;
      case MMMOD_BF16:
        acc = chunk_pass(reinterpret_cast<__nv_bfloat16*>(te.ptr[kGrad]) + ch.start,
                         reinterpret_cast<const __nv_bfloat16*>(te.ptr[kParam]) + ch.start,
                         reinterpret_cast<const __nv_bfloat16*>(te.ptr[kSnapshot]) + ch.start, len,
                         b);
        break;
      default:
        acc = chunk_pass(reinterpret_cast<double*>(te.ptr[kGrad]) + ch.start,
                         reinterpret_cast<const double*>(te.ptr[kParam]) + ch.start,
                         reinterpret_cast<const double*>(te.ptr[kSnapshot]) + ch.start, len, b);
        break;
    }
    const double s = mmmod::block_sum_tree<kThreads>(acc, sh);
    if (threadIdx.x == 0) partial[c] = s;
  }
};

__global__ void __launch_bounds__(kThreads) proximal_finish_kernel(mmmod::prox::Table tb,
                                                                   const double* partial,
                                                                   double* out) {
  __shared__ double sh[kThreads];
  double total = 0.0;  // meaningful in thread 0
  for (int64_t t = 0; t < tb.ntensors; ++t) {
    const auto te = tb.tensors[t];
    if (!te.extra[mmmod::prox::kFisher]) continue;  // the same branch for every thread of the block
    double s = 0.0;
    for (int64_t k = threadIdx.x; k < te.chunk_count; k += kThreads) {
      s = __dadd_rn(s, partial[te.first_chunk + k]);
    }
    s = mmmod::block_sum_tree<kThreads>(s, sh);
    if (threadIdx.x == 0) total = __dadd_rn(total, __ddiv_rn(s, static_cast<double>(te.numel)));
  }
  if (threadIdx.x == 0) out[0] = total;
}

}  // namespace

extern "C" {

int mmmod_cuda_proximal(const void* table, int64_t ntensors, int64_t nchunks, const float* beta,
                        double* partial, double* out, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const auto tb = mmmod::prox::Table::view(table, ntensors, nchunks);
  const int rc = mmmod::mt::multi_tensor_apply<kThreads>(tb, s, ProximalChunk{}, beta, partial);
  if (rc != 0) return rc;
  proximal_finish_kernel<<<1, kThreads, 0, s>>>(tb, partial, out);
  return static_cast<int>(cudaGetLastError());
}

}  // extern "C"
