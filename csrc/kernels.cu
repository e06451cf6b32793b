// CUDA kernels of mmmod. Includes CUDA headers and mmmod's own headers only (no torch), and
// exposes the plain launchers of cuda_api.h; the torch glue is cuda_ops.cpp.
//
// Multi-tensor apply: one launch covers a whole bucket through a device-side metadata table
// (header, tensors, chunks of MMMOD_CUDA_CHUNK elements with 64-bit starts; an empty tensor owns
// no chunk, so nothing touches it). OGM-GE takes three launches and no host sync:
//   1. stats:  one block per chunk -> (n, mean, M2) in float64 (two passes over the chunk,
//              the second from L2), block reductions in a fixed tree;
//   2. sigma:  one thread per tensor merges its chunk partials in chunk order (Chan et al.),
//              reads k and gate from device memory, writes sigma;
//   3. apply:  one block per chunk, each thread one Philox counter group (4 elements):
//              g <- float32(k g) + float32(sigma n); seed and modality are kernel arguments,
//              the step either an argument or read from a device counter (CUDA graphs).
// Results are deterministic: no atomics, fixed chunking independent of the GPU. Every launcher
// checks for a launch error right after each launch, so an error is reported by the launch that
// caused it (and a check never clears an error of an unrelated earlier launch unseen).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <type_traits>

#include "coefficients.h"
#include "cuda_api.h"
#include "philox.h"

namespace {

constexpr int kThreads = 256;

template <typename T>
struct Io;
template <>
struct Io<float> {
  static __device__ __forceinline__ float load(const float* p) { return *p; }
  static __device__ __forceinline__ double load_d(const float* p) { return static_cast<double>(*p); }
  static __device__ __forceinline__ void store(float* p, float v) { *p = v; }
};
template <>
struct Io<double> {
  static __device__ __forceinline__ float load(const double* p) { return static_cast<float>(*p); }
  static __device__ __forceinline__ double load_d(const double* p) { return *p; }
  static __device__ __forceinline__ void store(double* p, float v) { *p = static_cast<double>(v); }
};
template <>
struct Io<__half> {
  static __device__ __forceinline__ float load(const __half* p) { return __half2float(*p); }
  static __device__ __forceinline__ double load_d(const __half* p) {
    return static_cast<double>(__half2float(*p));
  }
  static __device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }
};
template <>
struct Io<__nv_bfloat16> {
  static __device__ __forceinline__ float load(const __nv_bfloat16* p) { return __bfloat162float(*p); }
  static __device__ __forceinline__ double load_d(const __nv_bfloat16* p) {
    return static_cast<double>(__bfloat162float(*p));
  }
  static __device__ __forceinline__ void store(__nv_bfloat16* p, float v) {
    *p = __float2bfloat16_rn(v);
  }
};

struct Table {
  const MmmodHeader* header;
  const MmmodTensorMeta* tensors;
  const MmmodChunkMeta* chunks;
};

__host__ __device__ __forceinline__ Table table_view(const void* base) {
  const char* p = static_cast<const char*>(base);
  const MmmodHeader* h = reinterpret_cast<const MmmodHeader*>(p);
  const MmmodTensorMeta* t = reinterpret_cast<const MmmodTensorMeta*>(p + sizeof(MmmodHeader));
  return Table{h, t, nullptr};
}

__device__ __forceinline__ Table device_table(const void* base, int64_t ntensors) {
  Table tb = table_view(base);
  tb.chunks = reinterpret_cast<const MmmodChunkMeta*>(tb.tensors + ntensors);
  return tb;
}

// Sum over the block in a fixed reduction tree (deterministic for a fixed blockDim).
__device__ double block_sum(double v, double* shared) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  double total = 0.0;
  if (threadIdx.x == 0) {
    const int nwarps = (blockDim.x + 31) >> 5;
    for (int w = 0; w < nwarps; ++w) total += shared[w];
    shared[32] = total;
  }
  __syncthreads();
  total = shared[32];
  __syncthreads();  // shared is reused by the next call
  return total;
}

unsigned grid_for(int64_t n) {
  const int64_t cap = 0x7fffffff;
  return static_cast<unsigned>(n < 1 ? 1 : (n > cap ? cap : n));
}

template <typename T>
__global__ void __launch_bounds__(kThreads) stats_kernel(const void* table, int64_t ntensors,
                                                         int64_t nchunks, mmmod::Moments* part) {
  __shared__ double shared[33];
  const Table tb = device_table(table, ntensors);
  for (int64_t c = blockIdx.x; c < nchunks; c += gridDim.x) {
    const MmmodChunkMeta ch = tb.chunks[c];
    const MmmodTensorMeta tm = tb.tensors[ch.tensor];
    const int64_t rest = tm.numel - ch.start;
    const int64_t len = rest < MMMOD_CUDA_CHUNK ? rest : MMMOD_CUDA_CHUNK;
    const T* x = reinterpret_cast<const T*>(tm.ptr) + ch.start;
    double s = 0.0;
    for (int64_t i = threadIdx.x; i < len; i += blockDim.x) s += Io<T>::load_d(x + i);
    const double mean = block_sum(s, shared) / static_cast<double>(len);
    double q = 0.0;
    for (int64_t i = threadIdx.x; i < len; i += blockDim.x) {
      const double d = Io<T>::load_d(x + i) - mean;
      q = __dadd_rn(q, __dmul_rn(d, d));
    }
    const double m2 = block_sum(q, shared);
    if (threadIdx.x == 0) part[c] = mmmod::Moments{static_cast<double>(len), mean, m2};
  }
}

__device__ mmmod::Moments tensor_moments(const MmmodTensorMeta& tm, const mmmod::Moments* part) {
  mmmod::Moments m{0.0, 0.0, 0.0};
  for (int64_t c = 0; c < tm.chunk_count; ++c) m = mmmod::moments_merge(m, part[tm.first_chunk + c]);
  return m;
}

__global__ void sigma_kernel(const void* table, int64_t ntensors, const mmmod::Moments* part,
                             const float* k, const float* gate, int scaled, float* sigma) {
  const Table tb = table_view(table);
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < ntensors;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    sigma[t] = mmmod::sigma_from_moments(tensor_moments(tb.tensors[t], part), scaled != 0, *k, *gate);
  }
}

__global__ void std_kernel(const void* table, int64_t ntensors, const mmmod::Moments* part,
                           double* out) {
  const Table tb = table_view(table);
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < ntensors;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const mmmod::Moments m = tensor_moments(tb.tensors[t], part);
    out[t] = m.n >= 2 ? sqrt(m.m2 / (m.n - 1.0)) : 0.0;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) scale_kernel(const void* table, int64_t ntensors,
                                                         int64_t nchunks, const float* k) {
  const Table tb = device_table(table, ntensors);
  const float kv = *k;
  for (int64_t c = blockIdx.x; c < nchunks; c += gridDim.x) {
    const MmmodChunkMeta ch = tb.chunks[c];
    const MmmodTensorMeta tm = tb.tensors[ch.tensor];
    const int64_t rest = tm.numel - ch.start;
    const int64_t len = rest < MMMOD_CUDA_CHUNK ? rest : MMMOD_CUDA_CHUNK;
    T* x = reinterpret_cast<T*>(tm.ptr) + ch.start;
    for (int64_t i = threadIdx.x; i < len; i += blockDim.x) {
      Io<T>::store(x + i, mmmod::scale_value(Io<T>::load(x + i), kv));
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) noise_kernel(const void* table, int64_t ntensors,
                                                         int64_t nchunks, const float* k,
                                                         const float* sigma, uint64_t seed,
                                                         const int64_t* step_ptr, uint32_t step_value,
                                                         uint32_t modality) {
  const Table tb = device_table(table, ntensors);
  // the counter is read at run time, so each replay of a captured graph draws fresh noise
  const uint32_t step = step_ptr ? static_cast<uint32_t>(static_cast<uint64_t>(*step_ptr)) : step_value;
  const float kv = *k;
  for (int64_t c = blockIdx.x; c < nchunks; c += gridDim.x) {
    const MmmodChunkMeta ch = tb.chunks[c];
    const MmmodTensorMeta tm = tb.tensors[ch.tensor];
    const int64_t rest = tm.numel - ch.start;
    const int64_t len = rest < MMMOD_CUDA_CHUNK ? rest : MMMOD_CUDA_CHUNK;
    T* x = reinterpret_cast<T*>(tm.ptr) + ch.start;
    const float sg = sigma[ch.tensor];
    const uint64_t p0 = static_cast<uint64_t>(tm.offset) + static_cast<uint64_t>(ch.start);
    const uint64_t q0 = p0 >> 2;
    const uint64_t groups = ((p0 + static_cast<uint64_t>(len) - 1) >> 2) - q0 + 1;
    for (uint64_t gi = threadIdx.x; gi < groups; gi += blockDim.x) {
      const uint64_t q = q0 + gi;
      const mmmod::F32x4 z = mmmod::philox_normal4(seed, step, modality, q);
#pragma unroll
      for (int lane = 0; lane < 4; ++lane) {
        const uint64_t p = 4 * q + static_cast<uint64_t>(lane);
        if (p < p0 || p >= p0 + static_cast<uint64_t>(len)) continue;
        T* e = x + (p - p0);
        Io<T>::store(e, mmmod::modulate_value(Io<T>::load(e), kv, sg, mmmod::f32x4_get(z, lane)));
      }
    }
  }
}

__global__ void philox_kernel(float* out, int64_t n, uint64_t seed, uint32_t step,
                              uint32_t modality, uint64_t offset) {
  const uint64_t q0 = offset >> 2;
  const uint64_t groups = ((offset + static_cast<uint64_t>(n) - 1) >> 2) - q0 + 1;
  for (uint64_t gi = blockIdx.x * static_cast<uint64_t>(blockDim.x) + threadIdx.x; gi < groups;
       gi += static_cast<uint64_t>(gridDim.x) * blockDim.x) {
    const uint64_t q = q0 + gi;
    const mmmod::F32x4 z = mmmod::philox_normal4(seed, step, modality, q);
#pragma unroll
    for (int lane = 0; lane < 4; ++lane) {
      const uint64_t p = 4 * q + static_cast<uint64_t>(lane);
      if (p >= offset && p < offset + static_cast<uint64_t>(n)) out[p - offset] = mmmod::f32x4_get(z, lane);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) scores_kernel(const T* z, int64_t B, int64_t C,
                                                          int64_t s0, int64_t s1,
                                                          const int64_t* labels, float* out) {
  __shared__ double shared[33];
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < B; i += blockDim.x) {
    const int64_t y = labels[i];
    if (y < 0 || y >= C) {
      acc += __longlong_as_double(0x7ff8000000000000LL);
      continue;
    }
    const T* row = z + i * s0;
    double mx = -__longlong_as_double(0x7ff0000000000000LL);
    bool nan = false;
    for (int64_t c = 0; c < C; ++c) {
      const double v = static_cast<double>(Io<T>::load(row + c * s1));
      nan = nan || (v != v);
      mx = v > mx ? v : mx;
    }
    if (isinf(mx)) mx = 0.0;  // torch.logsumexp does not subtract an infinite max
    double se = 0.0;
    for (int64_t c = 0; c < C; ++c) se += exp(static_cast<double>(Io<T>::load(row + c * s1)) - mx);
    const double lse = nan ? __longlong_as_double(0x7ff8000000000000LL) : mx + log(se);
    acc += exp(static_cast<double>(Io<T>::load(row + y * s1)) - lse);
  }
  const double total = block_sum(acc, shared);
  if (threadIdx.x == 0) out[0] = static_cast<float>(total);
}

__global__ void coefficients_kernel(const float* s, float* k, int64_t M, int method, float alpha,
                                    float beta_max) {
  if (blockIdx.x == 0 && threadIdx.x == 0) mmmod::compute_coefficients(s, k, M, method, alpha, beta_max);
}

template <typename F>
int dispatch(int dtype, F&& f) {
  switch (dtype) {
    case MMMOD_F32: f(static_cast<float*>(nullptr)); return 0;
    case MMMOD_F16: f(static_cast<__half*>(nullptr)); return 0;
    case MMMOD_BF16: f(static_cast<__nv_bfloat16*>(nullptr)); return 0;
    case MMMOD_F64: f(static_cast<double*>(nullptr)); return 0;
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}

// The error of the launch just made (cudaSuccess = 0), checked after every single launch.
int launch_status() { return static_cast<int>(cudaGetLastError()); }

}  // namespace

extern "C" {

int64_t mmmod_cuda_table_words(int64_t ntensors, int64_t nchunks) {
  return static_cast<int64_t>((sizeof(MmmodHeader) + ntensors * sizeof(MmmodTensorMeta) +
                               nchunks * sizeof(MmmodChunkMeta) + 7) / 8);
}

int mmmod_cuda_stream_is_capturing(void* stream, int* capturing) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  const cudaError_t rc = cudaStreamIsCapturing(static_cast<cudaStream_t>(stream), &status);
  *capturing = status != cudaStreamCaptureStatusNone;
  return static_cast<int>(rc);
}

size_t mmmod_cuda_workspace_bytes(int64_t ntensors, int64_t nchunks) {
  return static_cast<size_t>(nchunks) * sizeof(mmmod::Moments) +
         static_cast<size_t>(ntensors) * sizeof(double);
}

// Each launcher below returns the first error: a bad dtype code, or the launch error checked
// right after the launch that caused it.
static int stats(const void* table, int64_t ntensors, int64_t nchunks, int dtype,
                 mmmod::Moments* part, cudaStream_t st) {
  const int rc = dispatch(dtype, [&](auto* tag) {
    using T = typename std::remove_pointer<decltype(tag)>::type;
    stats_kernel<T><<<grid_for(nchunks), kThreads, 0, st>>>(table, ntensors, nchunks, part);
  });
  return rc ? rc : launch_status();
}

int mmmod_cuda_modulate(const void* table, int64_t ntensors, int64_t nchunks, int dtype,
                        const float* k, const float* gate, int noise, int scaled, uint64_t seed,
                        const int64_t* step_ptr, uint32_t step, uint32_t modality,
                        void* workspace, void* stream) {
  if (ntensors == 0 || nchunks == 0) return 0;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  mmmod::Moments* part = static_cast<mmmod::Moments*>(workspace);
  float* sigma = reinterpret_cast<float*>(part + nchunks);
  int rc = 0;
  if (!noise) {
    rc = dispatch(dtype, [&](auto* tag) {
      using T = typename std::remove_pointer<decltype(tag)>::type;
      scale_kernel<T><<<grid_for(nchunks), kThreads, 0, st>>>(table, ntensors, nchunks, k);
    });
    return rc ? rc : launch_status();
  }
  rc = stats(table, ntensors, nchunks, dtype, part, st);
  if (rc) return rc;
  sigma_kernel<<<grid_for((ntensors + 127) / 128), 128, 0, st>>>(table, ntensors, part, k, gate,
                                                                  scaled, sigma);
  rc = launch_status();
  if (rc) return rc;
  rc = dispatch(dtype, [&](auto* tag) {
    using T = typename std::remove_pointer<decltype(tag)>::type;
    noise_kernel<T><<<grid_for(nchunks), kThreads, 0, st>>>(table, ntensors, nchunks, k, sigma,
                                                             seed, step_ptr, step, modality);
  });
  return rc ? rc : launch_status();
}

int mmmod_cuda_bucket_std(const void* table, int64_t ntensors, int64_t nchunks, int dtype,
                          void* workspace, double* out, void* stream) {
  if (ntensors == 0) return 0;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  mmmod::Moments* part = static_cast<mmmod::Moments*>(workspace);
  const int rc = nchunks ? stats(table, ntensors, nchunks, dtype, part, st) : 0;
  if (rc) return rc;
  std_kernel<<<grid_for((ntensors + 127) / 128), 128, 0, st>>>(table, ntensors, part, out);
  return launch_status();
}

int mmmod_cuda_scores(const void* z, int dtype, int64_t B, int64_t C, int64_t s0, int64_t s1,
                      const int64_t* labels, float* out, void* stream) {
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const int rc = dispatch(dtype, [&](auto* tag) {
    using T = typename std::remove_pointer<decltype(tag)>::type;
    scores_kernel<T><<<1, kThreads, 0, st>>>(static_cast<const T*>(z), B, C, s0, s1, labels, out);
  });
  return rc ? rc : launch_status();
}

int mmmod_cuda_coefficients(const float* s, float* k, int64_t M, int method, float alpha,
                            float beta_max, void* stream) {
  coefficients_kernel<<<1, 1, 0, static_cast<cudaStream_t>(stream)>>>(s, k, M, method, alpha, beta_max);
  return launch_status();
}

int mmmod_cuda_philox_normal(float* out, int64_t n, uint64_t seed, uint32_t step,
                             uint32_t modality, uint64_t offset, void* stream) {
  if (n <= 0) return 0;
  const int64_t groups = (n + 3) / 4 + 1;
  const int64_t blocks = (groups + kThreads - 1) / kThreads;
  philox_kernel<<<grid_for(blocks < 65536 ? blocks : 65536), kThreads, 0,
                  static_cast<cudaStream_t>(stream)>>>(out, n, seed, step, modality, offset);
  return launch_status();
}

const char* mmmod_cuda_error_string(int code) {
  return cudaGetErrorString(static_cast<cudaError_t>(code));
}

}  // extern "C"
