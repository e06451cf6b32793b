// CUDA kernels of the fused modulated optimizer update (ops mmmod::fused_sgd_ / fused_adam_,
// defined in mmmod/_ops/__init__.py; glue: fused_update_cuda.cpp; interface: fused_update_api.h).
// CUDA headers and mmmod's own headers only, no torch.
//
// One launch per bucket (multi_tensor_apply, multi_tensor.cuh, of the functors SgdChunk /
// AdamChunk): the common device table (multi_tensor.h) lists the bucket's tensors (param, grad,
// state pointers, size, stream offset, per-tensor flags and Adam's bias corrections) and its
// chunks of MMMOD_FUSED_CHUNK elements of one tensor; block b takes chunks b, b + grid, ...
// Each thread takes one Philox counter group at a time: 4 consecutive stream elements, whose 4
// normals philox_normal4 draws in registers exactly as the unfused NoiseChunk (kernels.cu)
// does. Per element:
//   1. x = k g + sigma n (or k g): philox.h's modulate_value / scale_value (explicitly rounded,
//      never contracted), rounded to the tensor's dtype as the unfused modulation stores it, and
//      never written back (the gradient is only read);
//   2. torch's foreach SGD / Adam(W) step on x (torch.optim's default on CUDA:
//      _multi_tensor_sgd / _multi_tensor_adam), op for op, in torch's arithmetic type (float32,
//      float64 for float64 tensors), each intermediate torch stores rounded to the storage dtype
//      (R). torch's CUDA kernels are compiled with FMA contraction on, so `a + alpha * b`
//      (add with alpha), lerp and `a + s * (b op c)` (addcmul, addcdiv) round once; here every
//      such step is an explicit fma and every other product, sum, quotient and square root an
//      explicitly rounded intrinsic (__fmul_rn, __fdiv_rn, __fsqrt_rn, ...), so the result does
//      not depend on -fmad and matches "modulate on CUDA, then torch's step";
//   3. apply_to="update": p <- p0 + u (p - p0), mmmod.optim.update.scale_updates' foreach
//      arithmetic (u read on the device, rounded to the dtype as torch's mul by a float32 0-d
//      tensor casts it).
// k, sigma and u are device values read by the kernel: no host sync. Hyperparameters are kernel
// arguments (the Python floats of the step, rounded on the device to the arithmetic type).
//
// Accesses: a chunk whose stream position is on a Philox group (always without noise) and whose
// tensors are all aligned to 4 elements' width (capped at 16 B) reads and writes each array a
// group at a time: float4 (16 B) for float32, 2 x half2 / bfloat162 (8 B), 2 x double2 (2 x 16 B);
// other chunks and the partial groups at a tensor's ends take scalar accesses. ld.global.cg /
// st.global.cg name the global space (the pointers come from the table) and keep the streamed
// data out of L1. Bytes per element (benchmarks/byte_model.py fused_update, CUDA): the gradient
// read once, the parameter and every state tensor read and written once: SGD with momentum
// 5 x 4 = 20 B in float32 (a first step does not read the buffer), Adam/AdamW 7 x 4 = 28 B; plus
// per chunk 16 B of chunk entry, 88 B of tensor entry, k, sigma and u (12 B).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <cmath>
#include <type_traits>

#include "cuda/cuda_access.cuh"
#include "cuda/cuda_api.h"
#include "cuda/cuda_dtypes.cuh"
#include "cuda/fused_update_api.h"
#include "cuda/multi_tensor.cuh"
#include "common/philox.h"

// Everything below but the __global__ entry points is __host__ __device__ (FU_HD): the chunk code
// also compiles for the host, where tests/test_fused_update_cuda.py runs it on CPU tensors (one
// "thread" after another) against the reference, so the table walk, the Philox positions and the
// vector / scalar split are tested without a GPU. On the host the explicitly rounded intrinsics
// become plain IEEE operations (built with -ffp-contract=off) and std::fma / std::sqrt.
#define FU_HD __host__ __device__ __forceinline__

namespace {

constexpr int kThreads = 256;

// ---- storage type <-> arithmetic type ----------------------------------------------------------
// A: torch's opmath type (float, double for double). to_a: a stored value in A; round: x stored
// into a T tensor and read back; grad_f: a gradient element as the modulation reads it (float);
// mod: the modulated float value as the unfused modulation stores it, read back in A.
template <typename T>
struct Num;
template <>
struct Num<float> {
  using A = float;
  static FU_HD float to_a(float v) { return v; }
  static FU_HD float from_a(float x) { return x; }
  static FU_HD float round(float x) { return x; }
  static FU_HD float grad_f(float v) { return v; }
  static FU_HD float mod(float v) { return v; }
};
template <>
struct Num<double> {
  using A = double;
  static FU_HD double to_a(double v) { return v; }
  static FU_HD double from_a(double x) { return x; }
  static FU_HD double round(double x) { return x; }
  static FU_HD float grad_f(double v) { return static_cast<float>(v); }  // round to nearest
  static FU_HD double mod(float v) { return static_cast<double>(v); }
};
template <>
struct Num<__half> {
  using A = float;
  static FU_HD float to_a(__half v) { return __half2float(v); }
  static FU_HD __half from_a(float x) { return __float2half_rn(x); }
  static FU_HD float round(float x) { return __half2float(__float2half_rn(x)); }
  static FU_HD float grad_f(__half v) { return __half2float(v); }
  static FU_HD float mod(float v) { return round(v); }
};
template <>
struct Num<__nv_bfloat16> {
  using A = float;
  static FU_HD float to_a(__nv_bfloat16 v) { return __bfloat162float(v); }
  static FU_HD __nv_bfloat16 from_a(float x) { return __float2bfloat16_rn(x); }
  static FU_HD float round(float x) {
    return __bfloat162float(__float2bfloat16_rn(x));
  }
  static FU_HD float grad_f(__nv_bfloat16 v) { return __bfloat162float(v); }
  static FU_HD float mod(float v) { return round(v); }
};

// ---- explicitly rounded arithmetic (independent of -fmad) ---------------------------------------
// device: the _rn intrinsics, never contracted; host (the tests' CPU run): IEEE operations, built
// with -ffp-contract=off, and the correctly rounded std::fma / std::sqrt
#if defined(__CUDA_ARCH__)
#define FU_RN(device_expr, host_expr) return device_expr
#else
#define FU_RN(device_expr, host_expr) return host_expr
#endif

FU_HD float mul_rn(float a, float b) { FU_RN(__fmul_rn(a, b), a * b); }
FU_HD double mul_rn(double a, double b) { FU_RN(__dmul_rn(a, b), a * b); }
FU_HD float add_rn(float a, float b) { FU_RN(__fadd_rn(a, b), a + b); }
FU_HD double add_rn(double a, double b) { FU_RN(__dadd_rn(a, b), a + b); }
FU_HD float sub_rn(float a, float b) { FU_RN(__fsub_rn(a, b), a - b); }
FU_HD double sub_rn(double a, double b) { FU_RN(__dsub_rn(a, b), a - b); }
FU_HD float div_rn(float a, float b) { FU_RN(__fdiv_rn(a, b), a / b); }
FU_HD double div_rn(double a, double b) { FU_RN(__ddiv_rn(a, b), a / b); }
FU_HD float sqrt_rn(float a) { FU_RN(__fsqrt_rn(a), std::sqrt(a)); }
FU_HD double sqrt_rn(double a) { FU_RN(__dsqrt_rn(a), std::sqrt(a)); }
FU_HD float fma_rn(float a, float b, float c) { FU_RN(__fmaf_rn(a, b, c), std::fma(a, b, c)); }
FU_HD double fma_rn(double a, double b, double c) { FU_RN(__fma_rn(a, b, c), std::fma(a, b, c)); }
#undef FU_RN

// ---- global memory (csrc/cuda/cuda_access.cuh): ld.global.cg / st.global.cg on the device, plain
// accesses on the host; Vec4: one vector access per array for a 4-element group -------------------
using mmmod::access::group_aligned;
using mmmod::access::load;
using mmmod::access::store;
using mmmod::access::Vec4;

// ---- the table ----------------------------------------------------------------------------------
// the common table (multi_tensor.h); entry fields by fused_update_api.h's indices
using FusedTable = mmmod::fused::Table;
using FusedEntry = FusedTable::Entry;
using mmmod::mt::ChunkEntry;
namespace fu = mmmod::fused;

// Where one chunk lives in its tensor and in the Philox stream. Without noise the groups start
// at the chunk's first element (lead 0); with noise at the Philox group of its stream position.
struct ChunkView {
  int64_t start;   // first element in the tensor
  int len;         // elements (<= MMMOD_FUSED_CHUNK)
  int lead;        // elements of the first group before the chunk (0..3)
  int groups;
  uint64_t q0;     // Philox counter group of the first group
};

FU_HD ChunkView chunk_view(const ChunkEntry& ch, const FusedEntry& te, bool noise) {
  ChunkView v;
  v.start = ch.start;
  const int64_t rest = te.numel - ch.start;
  v.len = static_cast<int>(rest < MMMOD_FUSED_CHUNK ? rest : MMMOD_FUSED_CHUNK);
  const uint64_t pos = static_cast<uint64_t>(te.extra[fu::kOffset]) + static_cast<uint64_t>(ch.start);
  v.lead = noise ? static_cast<int>(pos & 3u) : 0;
  v.groups = (v.lead + v.len + 3) >> 2;
  v.q0 = pos >> 2;
  return v;
}

// The modulated gradient of one element, as the unfused modulation stores it, in A.
template <typename T, bool NOISE>
FU_HD typename Num<T>::A modulated(T g, float k, float sigma, float z) {
  const float gf = Num<T>::grad_f(g);
  return Num<T>::mod(NOISE ? mmmod::modulate_value(gf, k, sigma, z) : mmmod::scale_value(gf, k));
}

template <bool NOISE>
FU_HD void group_normals(uint64_t seed, uint32_t step, uint32_t modality, uint64_t q, float* z) {
  if (NOISE) {
    const mmmod::F32x4 n = mmmod::philox_normal4(seed, step, modality, q);
    z[0] = n.x; z[1] = n.y; z[2] = n.z; z[3] = n.w;
  } else {
    z[0] = z[1] = z[2] = z[3] = 0.0f;
  }
}

// p <- p0 + u (p - p0): _foreach_sub_, _foreach_mul_, _foreach_add_, each rounded to T
template <typename T>
FU_HD typename Num<T>::A scale_update(typename Num<T>::A pn, typename Num<T>::A p0,
                                      typename Num<T>::A u) {
  using N = Num<T>;
  return N::round(add_rn(N::round(mul_rn(N::round(sub_rn(pn, p0)), u)), p0));
}

// ---- SGD ------------------------------------------------------------------------------------------
template <typename A>
struct SgdConsts {
  float k;
  A neg_lr, wd, mom, omd, u;
  bool maximize, decay, use_momentum, nesterov, scale;
};

// the call's constants in the arithmetic type (k and u read from device memory)
template <typename T>
FU_HD SgdConsts<typename Num<T>::A> sgd_consts(const MmmodSgdScalars& s, const float* k_ptr,
                                               const float* u_ptr) {
  using A = typename Num<T>::A;
  SgdConsts<A> c;
  c.k = *k_ptr;
  c.neg_lr = static_cast<A>(s.neg_lr);
  c.wd = static_cast<A>(s.weight_decay);
  c.mom = static_cast<A>(s.momentum);
  c.omd = static_cast<A>(s.one_minus_dampening);
  c.scale = u_ptr != nullptr;
  // torch's mul of a T tensor by a float32 0-d tensor casts the latter to T first
  c.u = c.scale ? Num<T>::round(static_cast<A>(*u_ptr)) : static_cast<A>(1);
  c.maximize = s.maximize != 0;
  c.decay = s.decay != 0;
  c.use_momentum = s.use_momentum != 0;
  c.nesterov = s.nesterov != 0;
  return c;
}

// torch's _multi_tensor_sgd on one element: x the modulated gradient, p the parameter, b the
// momentum buffer (read only when ready)
template <typename T>
FU_HD void sgd_element(typename Num<T>::A x, typename Num<T>::A& p, typename Num<T>::A& b,
                       bool ready, const SgdConsts<typename Num<T>::A>& c) {
  using N = Num<T>;
  using A = typename N::A;
  if (c.maximize) x = -x;                                  // _foreach_neg(grads)
  const A p0 = p;
  if (c.decay) x = N::round(fma_rn(c.wd, p0, x));          // _foreach_add(grads, params, alpha=wd)
  if (c.use_momentum) {
    // _foreach_mul_(bufs, momentum); _foreach_add_(bufs, grads, alpha=1 - dampening), or, on a
    // buffer's first step, clone(grad)
    b = ready ? N::round(fma_rn(c.omd, x, N::round(mul_rn(b, c.mom)))) : x;
    x = c.nesterov ? N::round(fma_rn(c.mom, b, x)) : b;    // _foreach_add_(grads, bufs, alpha=m)
  }
  A pn = N::round(fma_rn(c.neg_lr, x, p0));                // _foreach_add_(params, grads, alpha=-lr)
  if (c.scale) pn = scale_update<T>(pn, p0, c.u);
  p = pn;
}

// ---- the chunk walk both updates share ------------------------------------------------------------
// Chunk ci's groups tid, tid + nthreads, ... of four elements (a thread of the block that owns the
// chunk): each element's gradient modulated, then U::element on the parameter and the update's
// state buffers, through 16-byte accesses where the chunk and every buffer allow them. U gives
// kStates, the per-tensor values (per_tensor), its state pointers (states: null for a state the
// step has none of), whether they are read (reads: else they start at 0) and element.
template <typename T, bool NOISE, class U>
FU_HD void update_chunk(const FusedTable& tb, int64_t ci, int tid, int nthreads, const U& u,
                        const float* sigma, uint64_t seed, uint32_t step, uint32_t modality) {
  using N = Num<T>;
  using A = typename N::A;
  constexpr int S = U::kStates;
  const ChunkEntry ch = tb.chunks[ci];
  const FusedEntry te = tb.tensors[ch.tensor];
  const ChunkView cv = chunk_view(ch, te, NOISE);
  T* p = reinterpret_cast<T*>(te.ptr[fu::kParam]) + cv.start;
  const T* g = reinterpret_cast<const T*>(te.ptr[fu::kGrad]) + cv.start;
  T* st[S];
  u.states(te, cv.start, st);
  const typename U::PerTensor pt = u.per_tensor(te);
  const bool read = u.reads(pt);
  const float sg = NOISE ? sigma[ch.tensor] : 0.0f;
  bool vec = cv.lead == 0 && group_aligned<T>(p) && group_aligned<T>(g);
#pragma unroll
  for (int j = 0; j < S; ++j) vec = vec && group_aligned<T>(st[j]);
#pragma unroll 1
  for (int gi = tid; gi < cv.groups; gi += nthreads) {
    float z[4];
    group_normals<NOISE>(seed, step, modality, cv.q0 + static_cast<uint64_t>(gi), z);
    const int e0 = 4 * gi - cv.lead;
    if (vec && e0 + 4 <= cv.len) {
      T gv[4], pv[4], sv[S][4];
      Vec4<T>::load4(g + e0, gv);
      Vec4<T>::load4(p + e0, pv);
#pragma unroll
      for (int j = 0; j < S; ++j) {
        if (read) Vec4<T>::load4(st[j] + e0, sv[j]);
      }
#pragma unroll
      for (int l = 0; l < 4; ++l) {
        A pa = N::to_a(pv[l]);
        A sa[S];
#pragma unroll
        for (int j = 0; j < S; ++j) sa[j] = read ? N::to_a(sv[j][l]) : static_cast<A>(0);
        u.element(modulated<T, NOISE>(gv[l], u.c.k, sg, z[l]), pa, sa, pt);
        pv[l] = N::from_a(pa);
#pragma unroll
        for (int j = 0; j < S; ++j) sv[j][l] = N::from_a(sa[j]);
      }
      Vec4<T>::store4(p + e0, pv);
#pragma unroll
      for (int j = 0; j < S; ++j) {
        if (st[j] != nullptr) Vec4<T>::store4(st[j] + e0, sv[j]);
      }
      continue;
    }
#pragma unroll
    for (int l = 0; l < 4; ++l) {
      const int e = e0 + l;
      if (e < 0 || e >= cv.len) continue;
      A pa = N::to_a(load(p + e));
      A sa[S];
#pragma unroll
      for (int j = 0; j < S; ++j) sa[j] = read ? N::to_a(load(st[j] + e)) : static_cast<A>(0);
      u.element(modulated<T, NOISE>(load(g + e), u.c.k, sg, z[l]), pa, sa, pt);
      store(p + e, N::from_a(pa));
#pragma unroll
      for (int j = 0; j < S; ++j) {
        if (st[j] != nullptr) store(st[j] + e, N::from_a(sa[j]));
      }
    }
  }
}

// SGD as update_chunk's U: one state, the momentum buffer (none without momentum), read once the
// buffer is ready (else the element starts it from the gradient, as torch's first step)
template <typename T>
struct SgdUpdate {
  using A = typename Num<T>::A;
  static constexpr int kStates = 1;
  SgdConsts<A> c;
  struct PerTensor {
    bool ready;
  };
  FU_HD PerTensor per_tensor(const FusedEntry& te) const {
    return {c.use_momentum && te.extra[fu::kFlag] != 0};
  }
  FU_HD void states(const FusedEntry& te, int64_t start, T** st) const {
    st[0] = c.use_momentum ? reinterpret_cast<T*>(te.ptr[fu::kState1]) + start : nullptr;
  }
  FU_HD bool reads(const PerTensor& pt) const { return pt.ready; }
  FU_HD void element(A x, A& p, A* s, const PerTensor& pt) const {
    sgd_element<T>(x, p, s[0], pt.ready, c);
  }
};

template <typename T, bool NOISE>
FU_HD void sgd_chunk(const FusedTable& tb, int64_t ci, int tid, int nthreads,
                     const SgdConsts<typename Num<T>::A>& c, const float* sigma, uint64_t seed,
                     uint32_t step, uint32_t modality) {
  update_chunk<T, NOISE>(tb, ci, tid, nthreads, SgdUpdate<T>{c}, sigma, seed, step, modality);
}

// ---- Adam / AdamW ---------------------------------------------------------------------------------
template <typename A>
struct AdamConsts {
  float k;
  A wd, w, one_minus_w, b2, c2, eps, decay_mul, u;
  bool small_w, maximize, decay, decoupled, scale;
};

template <typename T>
FU_HD AdamConsts<typename Num<T>::A> adam_consts(const MmmodAdamScalars& s, const float* k_ptr,
                                                 const float* u_ptr) {
  using A = typename Num<T>::A;
  AdamConsts<A> c;
  c.k = *k_ptr;
  c.wd = static_cast<A>(s.weight_decay);
  c.w = static_cast<A>(s.one_minus_beta1);
  c.one_minus_w = sub_rn(static_cast<A>(1), c.w);  // torch's opmath_t(1) - weight
  c.small_w = (c.w < static_cast<A>(0) ? -c.w : c.w) < static_cast<A>(0.5);  // is_lerp_weight_small
  c.b2 = static_cast<A>(s.beta2);
  c.c2 = static_cast<A>(s.one_minus_beta2);
  c.eps = static_cast<A>(s.eps);
  c.decay_mul = static_cast<A>(s.decay_mul);
  c.scale = u_ptr != nullptr;
  c.u = c.scale ? Num<T>::round(static_cast<A>(*u_ptr)) : static_cast<A>(1);
  c.maximize = s.maximize != 0;
  c.decay = s.decay != 0;
  c.decoupled = s.decoupled != 0;
  return c;
}

// torch's _multi_tensor_adam (non-capturable, amsgrad off) on one element: x the modulated
// gradient, p the parameter, m / v the moments; neg_step = -(lr / bc1), bc2s = sqrt(bc2)
template <typename T>
FU_HD void adam_element(typename Num<T>::A x, typename Num<T>::A& p, typename Num<T>::A& m,
                        typename Num<T>::A& v, typename Num<T>::A neg_step,
                        typename Num<T>::A bc2s, const AdamConsts<typename Num<T>::A>& c) {
  using N = Num<T>;
  using A = typename N::A;
  if (c.maximize) x = -x;                                   // _foreach_neg(grads)
  const A p0 = p;
  A pc = p0;
  if (c.decay) {
    if (c.decoupled) {
      pc = N::round(mul_rn(p0, c.decay_mul));               // _foreach_mul_(params, 1 - lr wd)
    } else {
      x = N::round(fma_rn(c.wd, p0, x));                    // _foreach_add(grads, params, alpha=wd)
    }
  }
  // _foreach_lerp_(exp_avgs, grads, 1 - beta1): torch's lerp (ATen/native/Lerp.h), its two
  // formulas by the weight's size, contracted
  const A d = sub_rn(x, m);
  m = N::round(c.small_w ? fma_rn(c.w, d, m) : fma_rn(-d, c.one_minus_w, x));
  // _foreach_mul_(exp_avg_sqs, beta2); _foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2):
  // v + value * (g * g)
  v = N::round(fma_rn(c.c2, mul_rn(x, x), N::round(mul_rn(v, c.b2))));
  // _foreach_sqrt(exp_avg_sqs); _foreach_div_(., bias_correction2_sqrt); _foreach_add_(., eps)
  const A den = N::round(add_rn(N::round(div_rn(N::round(sqrt_rn(v)), bc2s)), c.eps));
  // _foreach_addcdiv_(params, exp_avgs, den, step_size): p + step_size * (m / den)
  A pn = N::round(fma_rn(neg_step, div_rn(m, den), pc));
  if (c.scale) pn = scale_update<T>(pn, p0, c.u);
  p = pn;
}

// Adam as update_chunk's U: two states (exp_avg, exp_avg_sq), always read; per tensor its step
// size and bias correction (doubles in the table, bit for bit)
template <typename T>
struct AdamUpdate {
  using A = typename Num<T>::A;
  static constexpr int kStates = 2;
  AdamConsts<A> c;
  struct PerTensor {
    A neg_step, bc2s;
  };
  FU_HD PerTensor per_tensor(const FusedEntry& te) const {
    return {static_cast<A>(mmmod::mt::word_as_double(te.extra[fu::kNegStepSize])),
            static_cast<A>(mmmod::mt::word_as_double(te.extra[fu::kBc2Sqrt]))};
  }
  FU_HD void states(const FusedEntry& te, int64_t start, T** st) const {
    st[0] = reinterpret_cast<T*>(te.ptr[fu::kState1]) + start;
    st[1] = reinterpret_cast<T*>(te.ptr[fu::kState2]) + start;
  }
  FU_HD bool reads(const PerTensor&) const { return true; }
  FU_HD void element(A x, A& p, A* s, const PerTensor& pt) const {
    adam_element<T>(x, p, s[0], s[1], pt.neg_step, pt.bc2s, c);
  }
};

template <typename T, bool NOISE>
FU_HD void adam_chunk(const FusedTable& tb, int64_t ci, int tid, int nthreads,
                      const AdamConsts<typename Num<T>::A>& c, const float* sigma, uint64_t seed,
                      uint32_t step, uint32_t modality) {
  update_chunk<T, NOISE>(tb, ci, tid, nthreads, AdamUpdate<T>{c}, sigma, seed, step, modality);
}

// ---- the functors, applied over the table by multi_tensor_apply (block b takes chunks b,
// b + gridDim.x, ...) --------------------------------------------------------------------------
template <typename T, bool NOISE>
struct SgdChunk {
  __device__ void operator()(const FusedTable& tb, int64_t ci, const float* k_ptr,
                             const float* sigma, const float* u_ptr, MmmodSgdScalars s,
                             uint64_t seed, uint32_t step, uint32_t modality) const {
    sgd_chunk<T, NOISE>(tb, ci, threadIdx.x, kThreads, sgd_consts<T>(s, k_ptr, u_ptr), sigma,
                        seed, step, modality);
  }
};

template <typename T, bool NOISE>
struct AdamChunk {
  __device__ void operator()(const FusedTable& tb, int64_t ci, const float* k_ptr,
                             const float* sigma, const float* u_ptr, MmmodAdamScalars s,
                             uint64_t seed, uint32_t step, uint32_t modality) const {
    adam_chunk<T, NOISE>(tb, ci, threadIdx.x, kThreads, adam_consts<T>(s, k_ptr, u_ptr), sigma,
                         seed, step, modality);
  }
};

template <template <typename, bool> class Functor, typename T, typename S>
int launch(const FusedTable& tb, const float* k, const float* sigma, const float* u, const S& s,
           uint64_t seed, uint32_t step, uint32_t modality, cudaStream_t st) {
  if (sigma != nullptr) {
    return mmmod::mt::multi_tensor_apply<kThreads>(tb, st, Functor<T, true>{}, k, sigma, u, s,
                                                   seed, step, modality);
  }
  return mmmod::mt::multi_tensor_apply<kThreads>(tb, st, Functor<T, false>{}, k, sigma, u, s, seed,
                                                 step, modality);
}

}  // namespace

extern "C" {

int64_t mmmod_fused_table_words(int64_t ntensors, int64_t nchunks) {
  return mmmod::mt::table_words<fu::kDepth, fu::kExtra>(ntensors, nchunks);
}

int mmmod_cuda_fused_sgd(const void* table, int64_t ntensors, int64_t nchunks, int dtype,
                         const float* k, const float* sigma, const float* update_scale,
                         MmmodSgdScalars scalars, uint64_t seed, uint32_t step,
                         uint32_t modality, void* stream) {
  if (nchunks <= 0) return 0;
  const FusedTable tb = FusedTable::view(table, ntensors, nchunks);
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  int launched = 0;
  const int rc = mmmod::dispatch_dtype(dtype, [&](auto* tag) {
    using T = typename std::remove_pointer<decltype(tag)>::type;
    launched = launch<SgdChunk, T>(tb, k, sigma, update_scale, scalars, seed, step, modality, st);
  });
  return rc ? rc : launched;
}

int mmmod_cuda_fused_adam(const void* table, int64_t ntensors, int64_t nchunks, int dtype,
                          const float* k, const float* sigma, const float* update_scale,
                          MmmodAdamScalars scalars, uint64_t seed, uint32_t step,
                          uint32_t modality, void* stream) {
  if (nchunks <= 0) return 0;
  const FusedTable tb = FusedTable::view(table, ntensors, nchunks);
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  int launched = 0;
  const int rc = mmmod::dispatch_dtype(dtype, [&](auto* tag) {
    using T = typename std::remove_pointer<decltype(tag)>::type;
    launched = launch<AdamChunk, T>(tb, k, sigma, update_scale, scalars, seed, step, modality, st);
  });
  return rc ? rc : launched;
}

}  // extern "C"
