// CUDA kernels of mmmod. Includes CUDA headers and mmmod's own headers only (no torch), and
// exposes the plain launchers of cuda_api.h; the torch glue is cuda_ops.cpp.
//
// Multi-tensor apply (multi_tensor.cuh): one launch covers a whole bucket through the common
// device-side metadata table (multi_tensor.h: header, tensors, chunks of MMMOD_CUDA_CHUNK
// elements with 64-bit starts; an empty tensor owns no chunk, so nothing touches it); the
// per-chunk kernels are functors (StatsChunk, ScaleChunk, NoiseChunk) applied over it, the
// per-tensor merges plain kernels over the same table. OGM-GE takes three launches and no host
// sync:
//   1. stats:  one block per chunk -> (n, mean, M2) in float64, in ONE pass over the chunk:
//              each thread holds kVec elements per tile in registers, takes their exact
//              two-pass moments there and merges them into its own running moments (Chan et
//              al.); the block then merges its threads' moments in a fixed tree. (The previous
//              kernel made a second pass over the chunk assuming it came from L2; with ~1,000
//              resident blocks x 256 KB chunks it did not, and OGM-GE read g three times.)
//   2. sigma:  one block per tensor merges its chunk moments (thread t: chunks t, t + 256, ...
//              in order, then the same fixed tree), reads k and gate, writes sigma (the
//              _bucket_moments op: launch 1, then the same merge writing (n, mean, M2) rows);
//   3. apply:  one block per chunk, each thread one Philox counter group (4 elements):
//              g <- float32(k g) + float32(sigma n); seed and modality are kernel arguments,
//              the step either an argument or read from a device counter (CUDA graphs).
// modulate_sigma_ (each tensor's sigma given, e.g. gathered across the shards of a tensor) is
// launch 3 alone, finishing the given sigma (non-finite -> 0, times the gate) per chunk.
// Vector accesses (csrc/cuda/cuda_access.cuh, shared with fused_update.cu): a chunk whose tensor's
// data pointer is 16-byte aligned (checked per chunk on the device, so a table built once
// serves both cases) reads and writes whole 16-byte vectors (float4, 8 halves / bfloat16 as
// uint4, double2; the noise kernel 4 elements of its Philox group: float4, 2 x half2 /
// __nv_bfloat162, 2 x double2, when the stream offset is a multiple of 4); other chunks and a
// tensor's partial last tile take scalar accesses.
// Bytes per step (benchmarks/byte_model.py, next to each kernel below): OGM-GE reads every
// gradient element twice and writes it once (12 B/element in float32, the floor), plus ~80 B
// per 64 K-element chunk of table and moments.
// Results are deterministic: no atomics, fixed chunking and tiling independent of the GPU
// (tests/test_byte_model.py replays the exact float64 merge order in numpy). Every launcher
// checks for a launch error right after each launch, so an error is reported by the launch
// that caused it (and a check never clears an error of an unrelated earlier launch unseen).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <type_traits>

#include "common/coefficients.h"
#include "cuda/cuda_access.cuh"
#include "cuda/cuda_api.h"
#include "cuda/cuda_dtypes.cuh"
#include "cuda/multi_tensor.cuh"
#include "common/philox.h"

namespace {

namespace access = mmmod::access;

constexpr int kThreads = 256;

// Gradient accesses (csrc/cuda/cuda_access.cuh: ld.global.cg / st.global.cg, the vector widths) and
// the conversions between a stored value and the float / double the kernels compute in
// (csrc/cuda/cuda_dtypes.cuh).
using mmmod::Cvt;

// One element: read as float (load) or double (load_d), written from a float.
template <typename T>
struct Io {
  static __device__ __forceinline__ float load(const T* p) { return Cvt<T>::to_f(access::load(p)); }
  static __device__ __forceinline__ double load_d(const T* p) { return Cvt<T>::to_d(access::load(p)); }
  static __device__ __forceinline__ void store(T* p, float v) { access::store(p, Cvt<T>::from_f(v)); }
};

using mmmod::bucket::Table;  // the common table (multi_tensor.h), one pointer + stream offset
using mmmod::bucket::kGrad;
using mmmod::bucket::kOffset;
using mmmod::mt::ChunkEntry;

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

// Elements per thread and tile of the statistics and scale kernels: one 16-byte vector of a
// 16-bit type, two of float, four of double.
constexpr int kVec = 8;
constexpr int kTile = kThreads * kVec;

// kVec elements of a tile (16-byte vector loads, p 16-byte aligned) as double, and a 4-element
// group (one access of 4 elements' width, p aligned to it) as float.
template <typename T>
struct Vec {
  static_assert(kVec == 8, "a tile is one access::Vec8");
  static __device__ __forceinline__ void load8(const T* p, double* v) {
    T raw[kVec];
    access::Vec8<T>::load8(p, raw);
#pragma unroll
    for (int e = 0; e < kVec; ++e) v[e] = Cvt<T>::to_d(raw[e]);
  }
  static __device__ __forceinline__ void load4(const T* p, float* v) {
    T raw[4];
    access::Vec4<T>::load4(p, raw);
#pragma unroll
    for (int e = 0; e < 4; ++e) v[e] = Cvt<T>::to_f(raw[e]);
  }
  static __device__ __forceinline__ void store4(T* p, const float* v) {
    T raw[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) raw[e] = Cvt<T>::from_f(v[e]);
    access::Vec4<T>::store4(p, raw);
  }
};

using mmmod::access::aligned16;

// Moments of cnt values held in registers by the exact two-pass formula (the values are read
// once from memory): sum in index order, mean = sum / cnt, M2 = sum of squared deviations.
__device__ __forceinline__ mmmod::Moments tile_moments(const double* v, int cnt) {
  double s = 0.0;
#pragma unroll
  for (int e = 0; e < kVec; ++e) s = e < cnt ? __dadd_rn(s, v[e]) : s;
  const double mean = s / static_cast<double>(cnt);
  double q = 0.0;
#pragma unroll
  for (int e = 0; e < kVec; ++e) {
    const double d = __dadd_rn(v[e], -mean);
    q = e < cnt ? __dadd_rn(q, __dmul_rn(d, d)) : q;
  }
  return mmmod::Moments{static_cast<double>(cnt), mean, q};
}

// Merge the block's per-thread moments in a fixed tree: lane i <- merge(lane i, lane i + off)
// for off = 16, 8, 4, 2, 1, then warp results in warp order. The result is valid in thread 0;
// the same shape for every launch (fixed blockDim), so the bits never depend on timing.
__device__ mmmod::Moments block_merge(mmmod::Moments m, mmmod::Moments* shared) {
  for (int off = 16; off > 0; off >>= 1) {
    mmmod::Moments o;
    o.n = __shfl_down_sync(0xffffffffu, m.n, off);
    o.mean = __shfl_down_sync(0xffffffffu, m.mean, off);
    o.m2 = __shfl_down_sync(0xffffffffu, m.m2, off);
    m = mmmod::moments_merge(m, o);
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) shared[warp] = m;
  __syncthreads();
  mmmod::Moments total{0.0, 0.0, 0.0};
  if (threadIdx.x == 0) {
    const int nwarps = (blockDim.x + 31) >> 5;
    for (int w = 0; w < nwarps; ++w) total = mmmod::moments_merge(total, shared[w]);
  }
  __syncthreads();  // shared is reused by the next call
  return total;
}

// Bytes: reads the chunk once (n * sizeof(T)), 16 + 40 B of table per chunk, writes 24 B of
// moments per chunk (benchmarks/byte_model.py cuda_stats).
template <typename T>
struct StatsChunk {
  __device__ void operator()(const Table& tb, int64_t c, mmmod::Moments* part) const {
    __shared__ mmmod::Moments shared[kThreads / 32];
    const ChunkEntry ch = tb.chunks[c];
    const auto tm = tb.tensors[ch.tensor];
    const int64_t len = mmmod::mt::chunk_len(tm, ch, MMMOD_CUDA_CHUNK);
    const T* x = reinterpret_cast<const T*>(tm.ptr[kGrad]) + ch.start;
    const bool vec = aligned16(x);
    mmmod::Moments acc{0.0, 0.0, 0.0};
#pragma unroll 1
    for (int64_t base = 0; base < len; base += kTile) {
      const int64_t first = base + static_cast<int64_t>(threadIdx.x) * kVec;
      const int64_t left = len - first;
      const int cnt = left >= kVec ? kVec : (left > 0 ? static_cast<int>(left) : 0);
      if (cnt == 0) continue;
      double v[kVec];
      if (vec && cnt == kVec) {
        Vec<T>::load8(x + first, v);
      } else {
#pragma unroll
        for (int e = 0; e < kVec; ++e) v[e] = e < cnt ? Io<T>::load_d(x + first + e) : 0.0;
      }
      acc = mmmod::moments_merge(acc, tile_moments(v, cnt));
    }
    const mmmod::Moments m = block_merge(acc, shared);
    if (threadIdx.x == 0) part[c] = m;
  }
};

// One block per tensor: thread t merges the tensor's chunks t, t + blockDim, ... in order, then
// the block tree (block_merge). The result is in thread 0.
__device__ mmmod::Moments tensor_moments(const Table::Entry& tm, const mmmod::Moments* part,
                                         mmmod::Moments* shared) {
  mmmod::Moments m{0.0, 0.0, 0.0};
  for (int64_t c = threadIdx.x; c < tm.chunk_count; c += blockDim.x) {
    m = mmmod::moments_merge(m, part[tm.first_chunk + c]);
  }
  return block_merge(m, shared);
}

// Bytes: per tensor its 40 B entry, k and gate, 24 B of moments per chunk; writes sigma (4 B).
__global__ void __launch_bounds__(kThreads) sigma_kernel(Table tb, const mmmod::Moments* part,
                                                         const float* k, const float* gate,
                                                         int scaled, float* sigma) {
  __shared__ mmmod::Moments shared[kThreads / 32];
  for (int64_t t = blockIdx.x; t < tb.ntensors; t += gridDim.x) {
    const mmmod::Moments m = tensor_moments(tb.tensors[t], part, shared);
    if (threadIdx.x == 0) sigma[t] = mmmod::sigma_from_moments(m, scaled != 0, *k, *gate);
  }
}

// Bytes: as sigma_kernel, writes the float64 std (8 B).
__global__ void __launch_bounds__(kThreads) std_kernel(Table tb, const mmmod::Moments* part,
                                                       double* out) {
  __shared__ mmmod::Moments shared[kThreads / 32];
  for (int64_t t = blockIdx.x; t < tb.ntensors; t += gridDim.x) {
    const mmmod::Moments m = tensor_moments(tb.tensors[t], part, shared);
    if (threadIdx.x == 0) out[t] = m.n >= 2 ? sqrt(m.m2 / (m.n - 1.0)) : 0.0;
  }
}

// Bytes: as std_kernel, writes the float64 (count, mean, M2) row (24 B). An empty tensor owns
// no chunk: tensor_moments leaves it at (0, 0, 0).
__global__ void __launch_bounds__(kThreads) moments_kernel(Table tb, const mmmod::Moments* part,
                                                           double* out) {
  __shared__ mmmod::Moments shared[kThreads / 32];
  for (int64_t t = blockIdx.x; t < tb.ntensors; t += gridDim.x) {
    const mmmod::Moments m = tensor_moments(tb.tensors[t], part, shared);
    if (threadIdx.x == 0) {
      out[3 * t] = m.n;
      out[3 * t + 1] = m.mean;
      out[3 * t + 2] = m.m2;
    }
  }
}

// Bytes: reads and writes the chunk once, 56 B of table and k per chunk.
template <typename T>
struct ScaleChunk {
  __device__ void operator()(const Table& tb, int64_t c, const float* k) const {
    const float kv = *k;
    const ChunkEntry ch = tb.chunks[c];
    const auto tm = tb.tensors[ch.tensor];
    const int64_t len = mmmod::mt::chunk_len(tm, ch, MMMOD_CUDA_CHUNK);
    T* x = reinterpret_cast<T*>(tm.ptr[kGrad]) + ch.start;
    if (aligned16(x)) {
      // 4 elements per access: 16 B for float, 8 B (2 x half2) for 16-bit types, 2 x 16 B
      // for double; the tail (len % 4) scalar
      const int64_t groups = len >> 2;
#pragma unroll 1
      for (int64_t gi = threadIdx.x; gi < groups; gi += blockDim.x) {
        float v[4];
        Vec<T>::load4(x + 4 * gi, v);
#pragma unroll
        for (int e = 0; e < 4; ++e) v[e] = mmmod::scale_value(v[e], kv);
        Vec<T>::store4(x + 4 * gi, v);
      }
      for (int64_t i = 4 * groups + threadIdx.x; i < len; i += blockDim.x) {
        Io<T>::store(x + i, mmmod::scale_value(Io<T>::load(x + i), kv));
      }
    } else {
      for (int64_t i = threadIdx.x; i < len; i += blockDim.x) {
        Io<T>::store(x + i, mmmod::scale_value(Io<T>::load(x + i), kv));
      }
    }
  }
};

// A given sigma (modulate_sigma_) finished as sigma_from_moments finishes its own: not finite
// -> 0 (no noise), then one float32 multiply by the gate.
__device__ __forceinline__ float gated_sigma(float sigma, float gate) {
  const float big = 3.4028234663852886e38f;
  if (!(sigma <= big && sigma >= -big)) sigma = 0.0f;
  return __fmul_rn(sigma, gate);
}

// Bytes: reads and writes the chunk once, 56 B of table, k and sigma per chunk (8 B step).
// gate null: sigma is final (sigma_kernel's output, gated there); gate given: sigma is the
// caller's per-tensor scale before the gate (modulate_sigma_), finished per chunk.
template <typename T>
struct NoiseChunk {
  __device__ void operator()(const Table& tb, int64_t c, const float* k, const float* sigma,
                             const float* gate, uint64_t seed, const int64_t* step_ptr,
                             uint32_t step_value, uint32_t modality) const {
    // the counter is read at run time, so each replay of a captured graph draws fresh noise
    const uint32_t step = step_ptr ? static_cast<uint32_t>(static_cast<uint64_t>(*step_ptr)) : step_value;
    const float kv = *k;
    const float gv = gate ? *gate : 1.0f;
    const ChunkEntry ch = tb.chunks[c];
    const auto tm = tb.tensors[ch.tensor];
    const int64_t len = mmmod::mt::chunk_len(tm, ch, MMMOD_CUDA_CHUNK);
    T* x = reinterpret_cast<T*>(tm.ptr[kGrad]) + ch.start;
    const float sg = gate ? gated_sigma(sigma[ch.tensor], gv) : sigma[ch.tensor];
    const uint64_t p0 = static_cast<uint64_t>(tm.extra[kOffset]) + static_cast<uint64_t>(ch.start);
    const uint64_t q0 = p0 >> 2;
    const uint64_t groups = ((p0 + static_cast<uint64_t>(len) - 1) >> 2) - q0 + 1;
    // a Philox group is 4 consecutive elements in memory when the chunk starts on a group
    const bool vec = (p0 & 3u) == 0 && aligned16(x);
#pragma unroll 1
    for (uint64_t gi = threadIdx.x; gi < groups; gi += blockDim.x) {
      const uint64_t q = q0 + gi;
      const mmmod::F32x4 z = mmmod::philox_normal4(seed, step, modality, q);
      if (vec && 4 * gi + 4 <= static_cast<uint64_t>(len)) {
        float v[4];
        Vec<T>::load4(x + 4 * gi, v);
#pragma unroll
        for (int lane = 0; lane < 4; ++lane) {
          v[lane] = mmmod::modulate_value(v[lane], kv, sg, mmmod::f32x4_get(z, lane));
        }
        Vec<T>::store4(x + 4 * gi, v);
        continue;
      }
#pragma unroll
      for (int lane = 0; lane < 4; ++lane) {
        const uint64_t p = 4 * q + static_cast<uint64_t>(lane);
        if (p < p0 || p >= p0 + static_cast<uint64_t>(len)) continue;
        T* e = x + (p - p0);
        Io<T>::store(e, mmmod::modulate_value(Io<T>::load(e), kv, sg, mmmod::f32x4_get(z, lane)));
      }
    }
  }
};

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

// Scores: s_m = sum_i softmax(z_m)[i, y_i], in float64 per row, all modalities (up to
// MMMOD_CUDA_SCORES_MAX_M) in two launches and no atomics:
//   1. scores_kernel, grid (ceil(B / kScoreRows), M): one warp per row; the lanes stride over
//      the columns (pass 1: max and a NaN flag, pass 2: sum of exp(v - shift)), each pass merged
//      by a fixed __shfl_xor_sync butterfly (every lane ends with the same bits: IEEE addition
//      is commutative); lane 0 forms p_i = exp(z[i, y_i] - lse_i). The block adds its rows' p
//      in warp order into partial[m * nblocks + block].
//   2. scores_finish_kernel, one block per modality: thread t adds partials t, t + 256, ... in
//      order, then block_sum's fixed tree; out[m] = float32(total).
// The order depends on B only (not on the GPU or on timing), so the bits repeat run to run.
// Semantics as torch.logsumexp: shift = row max unless that max is +-inf (then 0); any NaN in
// the row gives NaN; a label outside [0, C) contributes NaN and is never dereferenced.
// Bytes (benchmarks/byte_model.py cuda_scores): every logit read twice (pass 2 mostly hits
// L1/L2 at small C; counted as DRAM), z[i, y_i] and the label once per row and modality, 8 B
// of partial written and read per block and modality, 4 B of score per modality.
constexpr int kScoreRows = kThreads / 32;  // rows per block of scores_kernel (one warp each)

struct ScoresBatch {
  MmmodScoresModality mod[MMMOD_CUDA_SCORES_MAX_M];
};

// Logit loads go through the read-only path (ld.global.nc), unlike the gradients: a row is read
// twice by the same warp, and at small C the second pass finds it in L1.
template <typename T>
__device__ __forceinline__ double logit(const T* p) {
  if constexpr (std::is_same<T, float>::value || std::is_same<T, double>::value) {
    return static_cast<double>(__ldg(p));
  } else if constexpr (std::is_same<T, __half>::value) {
    return static_cast<double>(__half2float(__ldg(p)));
  } else {
    return static_cast<double>(__bfloat162float(__ldg(p)));
  }
}

__device__ __forceinline__ double warp_sum(double v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

__device__ __forceinline__ double warp_max(double v) {
  for (int off = 16; off > 0; off >>= 1) {
    const double o = __shfl_xor_sync(0xffffffffu, v, off);
    v = o > v ? o : v;
  }
  return v;
}

// softmax(z)[i, y] of one row, computed by the whole warp; the result is valid in every lane.
template <typename T>
__device__ double row_probability(const T* row, int64_t C, int64_t s1, int64_t y, int lane) {
  const double nan = __longlong_as_double(0x7ff8000000000000LL);
  double mx = -__longlong_as_double(0x7ff0000000000000LL);
  bool has_nan = false;
  for (int64_t c = lane; c < C; c += 32) {
    const double v = logit(row + c * s1);
    has_nan = has_nan || (v != v);
    mx = v > mx ? v : mx;
  }
  mx = warp_max(mx);
  has_nan = __any_sync(0xffffffffu, has_nan);
  const double shift = isinf(mx) ? 0.0 : mx;  // torch.logsumexp does not subtract an infinite max
  double se = 0.0;
  for (int64_t c = lane; c < C; c += 32) se += exp(logit(row + c * s1) - shift);
  se = warp_sum(se);
  if (y < 0 || y >= C) return nan;
  const double lse = has_nan ? nan : shift + log(se);
  return exp(logit(row + y * s1) - lse);
}

__global__ void __launch_bounds__(kThreads) scores_kernel(ScoresBatch batch, int64_t B,
                                                          int64_t nblocks, const int64_t* labels,
                                                          double* partial) {
  __shared__ double rows_p[kScoreRows];
  const MmmodScoresModality md = batch.mod[blockIdx.y];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int64_t blk = blockIdx.x; blk < nblocks; blk += gridDim.x) {
    const int64_t i = blk * kScoreRows + warp;
    double p = 0.0;
    if (i < B) {
      const int64_t y = labels[i];
      // the modality's dtype is uniform over the block (blockIdx.y), so is this branch
      switch (md.dtype) {
        case MMMOD_F32:
          p = row_probability(reinterpret_cast<const float*>(md.ptr) + i * md.s0, md.C, md.s1, y, lane);
          break;
        case MMMOD_F16:
          p = row_probability(reinterpret_cast<const __half*>(md.ptr) + i * md.s0, md.C, md.s1, y, lane);
          break;
        case MMMOD_BF16:
          p = row_probability(reinterpret_cast<const __nv_bfloat16*>(md.ptr) + i * md.s0, md.C, md.s1,
                              y, lane);
          break;
        default:
          p = row_probability(reinterpret_cast<const double*>(md.ptr) + i * md.s0, md.C, md.s1, y, lane);
          break;
      }
    }
    if (lane == 0) rows_p[warp] = p;
    __syncthreads();
    if (threadIdx.x == 0) {
      double s = 0.0;
      for (int w = 0; w < kScoreRows; ++w) s += rows_p[w];
      partial[blockIdx.y * nblocks + blk] = s;
    }
    __syncthreads();  // rows_p is rewritten by the next block-stride iteration
  }
}

__global__ void __launch_bounds__(kThreads) scores_finish_kernel(const double* partial,
                                                                 int64_t nblocks, float* out) {
  __shared__ double shared[33];
  const double* mine = partial + blockIdx.x * nblocks;
  double acc = 0.0;
  for (int64_t b = threadIdx.x; b < nblocks; b += blockDim.x) acc += mine[b];
  const double total = block_sum(acc, shared);
  if (threadIdx.x == 0) out[blockIdx.x] = static_cast<float>(total);
}

__global__ void coefficients_kernel(const float* s, float* k, int64_t M, int rule, float alpha,
                                    float beta_max) {
  if (blockIdx.x == 0 && threadIdx.x == 0) mmmod::compute_coefficients(s, k, M, rule, alpha, beta_max);
}

// The error of the launch just made (cudaSuccess = 0), checked after every single launch.
int launch_status() { return static_cast<int>(cudaGetLastError()); }

}  // namespace

extern "C" {

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
static int stats(const Table& tb, int dtype, mmmod::Moments* part, cudaStream_t st) {
  int launched = 0;
  const int rc = mmmod::dispatch_dtype(dtype, [&](auto* tag) {
    using T = typename std::remove_pointer<decltype(tag)>::type;
    launched = mmmod::mt::multi_tensor_apply<kThreads>(tb, st, StatsChunk<T>{}, part);
  });
  return rc ? rc : launched;
}

// The statistics launch, then `merge` (one block per tensor) turning each tensor's chunk moments
// in `workspace` into its row(s) of `out` (std_kernel, moments_kernel).
using MergeKernel = void (*)(Table, const mmmod::Moments*, double*);
static int stats_then_merge(MergeKernel merge, const void* table, int64_t ntensors, int64_t nchunks,
                            int dtype, void* workspace, double* out, void* stream) {
  if (ntensors == 0) return 0;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const Table tb = Table::view(table, ntensors, nchunks);
  mmmod::Moments* part = static_cast<mmmod::Moments*>(workspace);
  const int rc = nchunks ? stats(tb, dtype, part, st) : 0;
  if (rc) return rc;
  merge<<<grid_for(ntensors), kThreads, 0, st>>>(tb, part, out);
  return launch_status();
}

int mmmod_cuda_modulate(const void* table, int64_t ntensors, int64_t nchunks, int dtype,
                        const float* k, const float* gate, int noise, int scaled, uint64_t seed,
                        const int64_t* step_ptr, uint32_t step, uint32_t modality,
                        void* workspace, void* stream) {
  if (ntensors == 0 || nchunks == 0) return 0;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const Table tb = Table::view(table, ntensors, nchunks);
  mmmod::Moments* part = static_cast<mmmod::Moments*>(workspace);
  float* sigma = reinterpret_cast<float*>(part + nchunks);
  int launched = 0;
  int rc = 0;
  if (!noise) {
    rc = mmmod::dispatch_dtype(dtype, [&](auto* tag) {
      using T = typename std::remove_pointer<decltype(tag)>::type;
      launched = mmmod::mt::multi_tensor_apply<kThreads>(tb, st, ScaleChunk<T>{}, k);
    });
    return rc ? rc : launched;
  }
  rc = stats(tb, dtype, part, st);
  if (rc) return rc;
  sigma_kernel<<<grid_for(ntensors), kThreads, 0, st>>>(tb, part, k, gate, scaled, sigma);
  rc = launch_status();
  if (rc) return rc;
  rc = mmmod::dispatch_dtype(dtype, [&](auto* tag) {
    using T = typename std::remove_pointer<decltype(tag)>::type;
    launched = mmmod::mt::multi_tensor_apply<kThreads>(tb, st, NoiseChunk<T>{}, k,
                                                       static_cast<const float*>(sigma),
                                                       static_cast<const float*>(nullptr), seed,
                                                       step_ptr, step, modality);
  });
  return rc ? rc : launched;
}

int mmmod_cuda_modulate_sigma(const void* table, int64_t ntensors, int64_t nchunks, int dtype,
                              const float* k, const float* gate, const float* sigma, uint64_t seed,
                              const int64_t* step_ptr, uint32_t step, uint32_t modality,
                              void* stream) {
  if (ntensors == 0 || nchunks == 0) return 0;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const Table tb = Table::view(table, ntensors, nchunks);
  int launched = 0;
  const int rc = mmmod::dispatch_dtype(dtype, [&](auto* tag) {
    using T = typename std::remove_pointer<decltype(tag)>::type;
    launched = mmmod::mt::multi_tensor_apply<kThreads>(tb, st, NoiseChunk<T>{}, k, sigma, gate, seed,
                                                       step_ptr, step, modality);
  });
  return rc ? rc : launched;
}

int mmmod_cuda_bucket_std(const void* table, int64_t ntensors, int64_t nchunks, int dtype,
                          void* workspace, double* out, void* stream) {
  return stats_then_merge(std_kernel, table, ntensors, nchunks, dtype, workspace, out, stream);
}

int mmmod_cuda_bucket_moments(const void* table, int64_t ntensors, int64_t nchunks, int dtype,
                              void* workspace, double* out, void* stream) {
  return stats_then_merge(moments_kernel, table, ntensors, nchunks, dtype, workspace, out, stream);
}

size_t mmmod_cuda_scores_workspace_bytes(int64_t B, int64_t M) {
  const int64_t m = M < MMMOD_CUDA_SCORES_MAX_M ? M : MMMOD_CUDA_SCORES_MAX_M;
  return static_cast<size_t>((B + kScoreRows - 1) / kScoreRows) * static_cast<size_t>(m) * sizeof(double);
}

int mmmod_cuda_scores(const MmmodScoresModality* mods, int64_t M, int64_t B, const int64_t* labels,
                      float* out, void* workspace, void* stream) {
  if (M < 0 || M > MMMOD_CUDA_SCORES_MAX_M || B < 0) return static_cast<int>(cudaErrorInvalidValue);
  if (M == 0) return 0;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  if (B == 0) return static_cast<int>(cudaMemsetAsync(out, 0, static_cast<size_t>(M) * sizeof(float), st));
  ScoresBatch batch{};
  for (int64_t m = 0; m < M; ++m) {
    const int d = static_cast<int>(mods[m].dtype);
    if (d != MMMOD_F32 && d != MMMOD_F16 && d != MMMOD_BF16 && d != MMMOD_F64) {
      return static_cast<int>(cudaErrorInvalidValue);
    }
    batch.mod[m] = mods[m];
  }
  const int64_t nblocks = (B + kScoreRows - 1) / kScoreRows;
  double* partial = static_cast<double*>(workspace);
  scores_kernel<<<dim3(grid_for(nblocks), static_cast<unsigned>(M)), kThreads, 0, st>>>(
      batch, B, nblocks, labels, partial);
  int rc = launch_status();
  if (rc) return rc;
  scores_finish_kernel<<<static_cast<unsigned>(M), kThreads, 0, st>>>(partial, nblocks, out);
  return launch_status();
}

int mmmod_cuda_coefficients(const float* s, float* k, int64_t M, int rule, float alpha,
                            float beta_max, void* stream) {
  coefficients_kernel<<<1, 1, 0, static_cast<cudaStream_t>(stream)>>>(s, k, M, rule, alpha, beta_max);
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
