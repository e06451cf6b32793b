// CPU kernels of the fused modulated optimizer update (ops fused_sgd_ / fused_adam_, defined
// in mmmod/_ops/__init__.py; the reference is mmmod/reference/fused.py).
//
// One pass per bucket: per element the modulated gradient k g + sigma n (or k g) is formed in
// registers, rounded to the gradient's dtype as the unfused modulation stores it, and fed into
// torch's single-tensor SGD / Adam arithmetic; the parameter and the state are written, the
// gradient is not. Every intermediate that torch materialises as a tensor is rounded to the
// storage dtype here too (R below), and each torch op's own arithmetic is reproduced (mul and
// addcdiv round each product and quotient). For float32 this equals "modulate, then torch's
// step" bit for bit, SGD and Adam (tests/test_fused_update.py).
//
// Two of torch's float ops are not the textbook ones, and Adam reproduces both (they were the
// cause of a one-ulp difference from torch's step in about a fifth of the elements):
// * sqrt: torch's CPU sqrt of a float tensor is not correctly rounded (it goes through a vector
//   math library: about 20 % of float32 results are one ulp from std::sqrt); it is a pure
//   function of the value (the same whatever the tensor's length, position or thread count), so
//   Adam takes its chunk's square roots from torch itself (at::sqrt_out on the exp_avg_sq chunk
//   just written, still in cache) between the moment pass and the parameter pass;
// * a * b + c: torch's AVX2 / AVX-512 kernels (built with FMA) round it once: add with alpha
//   and lerp through an explicit fmadd, addcmul's `self + value * t1 * t2` because the compiler
//   contracts it into fma(value * t1, t2, self); its DEFAULT kernels (ATEN_CPU_CAPABILITY=
//   default, or a CPU without AVX2) round the product and the sum. The kernel follows the
//   capability torch dispatches to (madd below).
//
// Noise: the same Philox stream and per-tensor layout as cpu_kernels.cpp (the active
// KernelTable's normals(), AVX2 or scalar), so the fused and unfused paths draw the same noise.
// Work is split into fixed chunks of kChunkCpu elements of one tensor, so results never depend
// on the thread count.
//
// Speed: float32 / float64 under torch's FMA kernels (the usual case) take the fast loops
// (sgd_fast, adam_moments_fast, adam_params_fast), with the flags that change the work as
// template parameters, so GCC vectorises them; the generic loops (sgd_run, adam_moments,
// adam_params: run-time flags, scalar code) serve float16 / bfloat16, torch's baseline kernels
// and MMMOD_CPU_KERNELS=scalar. Both compute the same operations in the same order.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "common/ops.h"
#include "common/philox.h"
#include "cpu/chunks.h"
#include "cpu/cpu_kernels.h"

namespace mmmod {
namespace fused_cpu {

namespace {

// the arithmetic type torch uses for a storage dtype (at::opmath_type): double for double,
// float otherwise
template <typename T>
using acc_t = typename std::conditional<std::is_same<T, double>::value, double, float>::type;

// a value stored into a T tensor and read back (identity for float32 / float64)
template <typename T, typename A>
inline __attribute__((always_inline)) A R(A x) {
  return static_cast<A>(static_cast<T>(x));
}

using cpu::Chunk;
using cpu::make_chunks;

struct NoiseArgs {
  bool on;
  uint64_t seed;
  uint32_t step, modality;
};

// What both updates read once per call: the noise stream, k and the update scale (CPU tensors:
// memory reads, not device syncs) and sigma's contiguous data (kept alive by `sig`).
struct CallValues {
  at::Tensor sig;
  NoiseArgs nz;
  float k, u;
  const float* sigma;
};

CallValues call_values(const at::Tensor& k, const std::optional<at::Tensor>& sigma,
                       const std::optional<at::Tensor>& update_scale, int64_t seed, int64_t step,
                       int64_t modality) {
  CallValues v;
  v.sig = sigma.has_value() ? sigma->contiguous() : at::Tensor();
  v.nz = {sigma.has_value(), static_cast<uint64_t>(seed), static_cast<uint32_t>(step),
          static_cast<uint32_t>(modality)};
  v.k = k.item<float>();
  v.u = update_scale.has_value() ? update_scale->item<float>() : 1.0f;
  v.sigma = sigma.has_value() ? v.sig.const_data_ptr<float>() : nullptr;
  return v;
}

// the modulated gradient as the unfused modulation stores it (float32 math, cast to T)
template <typename T>
inline __attribute__((always_inline)) acc_t<T> mod_grad(T g, float k, float sigma, const float* z,
                                                        int64_t j) {
  const float v = z != nullptr ? modulate_value(static_cast<float>(g), k, sigma, z[j])
                               : scale_value(static_cast<float>(g), k);
  return static_cast<acc_t<T>>(static_cast<T>(v));
}

// a * b + c as torch's kernel computes it: one rounding (an FMA) where torch's kernels are
// built with FMA (add with alpha, lerp, addcmul), two roundings in its baseline build
template <typename A>
inline __attribute__((always_inline)) A madd(A a, A b, A c, bool fused) {
  return fused ? std::fma(a, b, c) : a * b + c;
}

struct SgdScalars {
  bool maximize, nesterov, decay, use_momentum, scale_update, torch_fma;
  double lr, wd, momentum, dampening;
};

template <typename T>
inline __attribute__((always_inline)) void sgd_run(T* __restrict p, const T* __restrict g,
                                                   T* __restrict buf, bool ready, int64_t n,
                                                   const float* z, float k, float sigma, float u,
                                                   const SgdScalars& s) {
  using A = acc_t<T>;
  const A wd = static_cast<A>(s.wd), mom = static_cast<A>(s.momentum);
  const A one_minus_damp = static_cast<A>(1.0 - s.dampening), neg_lr = static_cast<A>(-s.lr);
  for (int64_t j = 0; j < n; ++j) {
    A x = mod_grad<T>(g[j], k, sigma, z, j);
    if (s.maximize) x = -x;
    const A p0 = static_cast<A>(p[j]);
    if (s.decay) x = R<T>(madd(p0, wd, x, s.torch_fma));   // grad.add(param, alpha=wd)
    if (s.use_momentum) {
      A b;
      if (!ready) {
        b = x;                                              // buf = grad.clone()
      } else {
        b = R<T>(madd(x, one_minus_damp, R<T>(static_cast<A>(buf[j]) * mom), s.torch_fma));
      }
      buf[j] = static_cast<T>(b);
      x = s.nesterov ? R<T>(madd(b, mom, x, s.torch_fma)) : b;  // grad.add(buf, alpha=momentum)
    }
    A pn = R<T>(madd(x, neg_lr, p0, s.torch_fma));         // param.add_(grad, alpha=-lr)
    if (s.scale_update) pn = R<T>(p0 + R<T>(R<T>(pn - p0) * static_cast<A>(u)));
    p[j] = static_cast<T>(pn);
  }
}

struct AdamScalars {
  bool maximize, decay, decoupled, scale_update, torch_fma;
  double lr, beta1, beta2, eps, wd;
};

// Pass 1 of a chunk (run by run, with the noise): the moments. exp_avg and exp_avg_sq are
// written; the parameter is only read (pass 2 reads it again, from cache).
template <typename T>
inline __attribute__((always_inline)) void adam_moments(const T* __restrict p,
                                                        const T* __restrict g,
                                                        T* __restrict m1, T* __restrict m2,
                                                        int64_t n, const float* z, float k,
                                                        float sigma, const AdamScalars& s) {
  using A = acc_t<T>;
  const A wd = static_cast<A>(s.wd), decay_mul = static_cast<A>(1.0 - s.lr * s.wd);
  const A w1 = static_cast<A>(1.0 - s.beta1);
  const bool small = std::abs(w1) < static_cast<A>(0.5);  // torch's is_lerp_weight_small
  const A coeff = small ? w1 : w1 - static_cast<A>(1);
  const A b2 = static_cast<A>(s.beta2), one_minus_b2 = static_cast<A>(1.0 - s.beta2);
  for (int64_t j = 0; j < n; ++j) {
    A x = mod_grad<T>(g[j], k, sigma, z, j);
    if (s.maximize) x = -x;
    if (s.decay && !s.decoupled) {
      x = R<T>(madd(static_cast<A>(p[j]), wd, x, s.torch_fma));  // grad.add(param, alpha=wd)
    }
    (void)decay_mul;  // decoupled decay touches only the parameter (pass 2)
    const A a = static_cast<A>(m1[j]);
    // exp_avg.lerp_(grad, 1 - beta1)
    const A ea = R<T>(madd(coeff, x - a, small ? a : x, s.torch_fma));
    // exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    const A vb = R<T>(static_cast<A>(m2[j]) * b2);
    const A ev = R<T>(madd(one_minus_b2 * x, x, vb, s.torch_fma));
    m1[j] = static_cast<T>(ea);
    m2[j] = static_cast<T>(ev);
  }
}

// Pass 2 of a chunk: the parameter, from the moments and torch's square roots of exp_avg_sq.
template <typename T>
void adam_params(T* __restrict p, const T* __restrict m1, const T* __restrict sq, int64_t n,
                 float u, const AdamScalars& s, double step) {
  using A = acc_t<T>;
  const A decay_mul = static_cast<A>(1.0 - s.lr * s.wd);
  // Python float arithmetic of _single_tensor_adam, in double
  const double bc1 = 1.0 - std::pow(s.beta1, step);
  const double bc2 = 1.0 - std::pow(s.beta2, step);
  const A bc2_sqrt = static_cast<A>(std::pow(bc2, 0.5));
  const A neg_step_size = static_cast<A>(-(s.lr / bc1));
  const A eps = static_cast<A>(s.eps);
  for (int64_t j = 0; j < n; ++j) {
    const A p0 = static_cast<A>(p[j]);
    const A pc = (s.decay && s.decoupled) ? R<T>(p0 * decay_mul) : p0;  // param.mul_(1 - lr*wd)
    // denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    const A den = R<T>(R<T>(static_cast<A>(sq[j]) / bc2_sqrt) + eps);
    // param.addcdiv_(exp_avg, denom, value=-step_size)
    A pn = R<T>(pc + neg_step_size * static_cast<A>(m1[j]) / den);
    if (s.scale_update) pn = R<T>(p0 + R<T>(R<T>(pn - p0) * static_cast<A>(u)));
    p[j] = static_cast<T>(pn);
  }
}

// The fast element loops: float32 / float64 with torch's FMA kernels (the common case). Every
// flag that changes which arrays are touched or which operations run is a template parameter,
// so each loop body is straight-line code GCC vectorises; maximize and update_scale stay run-time
// but are selects (a negation and a blend: exact, no branch). The operations, their order and
// their roundings are those of sgd_run / adam_moments / adam_params with R the identity and
// madd an FMA, so the results are the same bits.
template <typename T, bool Noise>
inline __attribute__((always_inline)) T fast_grad(T g, float k, float sigma, const float* z,
                                                  int64_t j, bool maximize) {
  const float v = Noise ? modulate_value(static_cast<float>(g), k, sigma, z[j])
                        : scale_value(static_cast<float>(g), k);
  const T x = static_cast<T>(v);
  return maximize ? -x : x;
}

// Ready: the momentum buffer holds last step's value (else buf = grad.clone())
template <typename T, bool Noise, bool Decay, bool Mom, bool Ready, bool Nest>
inline __attribute__((always_inline)) void sgd_fast(T* __restrict p, const T* __restrict g,
                                                    T* __restrict buf, int64_t n,
                                                    const float* __restrict z, float k,
                                                    float sigma, float u, const SgdScalars& s) {
  const T wd = static_cast<T>(s.wd), mom = static_cast<T>(s.momentum);
  const T one_minus_damp = static_cast<T>(1.0 - s.dampening), neg_lr = static_cast<T>(-s.lr);
  const T uu = static_cast<T>(u);
  const bool maximize = s.maximize, scale = s.scale_update;
  for (int64_t j = 0; j < n; ++j) {
    T x = fast_grad<T, Noise>(g[j], k, sigma, z, j, maximize);
    const T p0 = p[j];
    if (Decay) x = std::fma(p0, wd, x);
    if (Mom) {
      const T b = Ready ? std::fma(x, one_minus_damp, buf[j] * mom) : x;
      buf[j] = b;
      x = Nest ? std::fma(b, mom, x) : b;
    }
    const T pn = std::fma(x, neg_lr, p0);
    const T ps = p0 + (pn - p0) * uu;
    p[j] = scale ? ps : pn;
  }
}

// L2: weight decay added to the gradient (Adam's, not AdamW's)
template <typename T, bool Noise, bool L2>
inline __attribute__((always_inline)) void adam_moments_fast(const T* __restrict p,
                                                             const T* __restrict g,
                                                             T* __restrict m1, T* __restrict m2,
                                                             int64_t n, const float* __restrict z,
                                                             float k, float sigma,
                                                             const AdamScalars& s) {
  const T wd = static_cast<T>(s.wd);
  const T w1 = static_cast<T>(1.0 - s.beta1);
  const bool small = std::abs(w1) < static_cast<T>(0.5);  // torch's is_lerp_weight_small
  const T coeff = small ? w1 : w1 - static_cast<T>(1);
  const T b2 = static_cast<T>(s.beta2), one_minus_b2 = static_cast<T>(1.0 - s.beta2);
  const bool maximize = s.maximize;
  for (int64_t j = 0; j < n; ++j) {
    T x = fast_grad<T, Noise>(g[j], k, sigma, z, j, maximize);
    if (L2) x = std::fma(p[j], wd, x);
    const T a = m1[j];
    m1[j] = std::fma(coeff, x - a, small ? a : x);
    m2[j] = std::fma(one_minus_b2 * x, x, m2[j] * b2);
  }
}

// Decoupled: AdamW's param.mul_(1 - lr * wd)
template <typename T, bool Decoupled>
inline __attribute__((always_inline)) void adam_params_fast(T* __restrict p,
                                                            const T* __restrict m1,
                                                            const T* __restrict sq, int64_t n,
                                                            float u, const AdamScalars& s,
                                                            double step) {
  const T decay_mul = static_cast<T>(1.0 - s.lr * s.wd);
  const double bc1 = 1.0 - std::pow(s.beta1, step);
  const double bc2 = 1.0 - std::pow(s.beta2, step);
  const T bc2_sqrt = static_cast<T>(std::pow(bc2, 0.5));
  const T neg_step_size = static_cast<T>(-(s.lr / bc1));
  const T eps = static_cast<T>(s.eps), uu = static_cast<T>(u);
  const bool scale = s.scale_update;
  for (int64_t j = 0; j < n; ++j) {
    const T p0 = p[j];
    const T pc = Decoupled ? p0 * decay_mul : p0;
    const T den = sq[j] / bc2_sqrt + eps;
    const T pn = pc + neg_step_size * m1[j] / den;
    const T ps = p0 + (pn - p0) * uu;
    p[j] = scale ? ps : pn;
  }
}

template <typename T, bool Noise, bool Decay, bool Mom, bool Ready, bool Nest>
struct SgdFastRun {
  T* p; const T* g; T* b; float k, sigma, u; const SgdScalars* s;
  template <typename U>
  inline __attribute__((always_inline)) void go(int64_t i, int64_t n, const float* z) const {
    sgd_fast<T, Noise, Decay, Mom, Ready, Nest>(p + i, g + i, Mom ? b + i : nullptr, n, z, k,
                                                 sigma, u, *s);
  }
};

template <typename T, bool Noise, bool L2>
struct AdamFastRun {
  const T* p; const T* g; T* a; T* v; float k, sigma; const AdamScalars* s;
  template <typename U>
  inline __attribute__((always_inline)) void go(int64_t i, int64_t n, const float* z) const {
    adam_moments_fast<T, Noise, L2>(p + i, g + i, a + i, v + i, n, z, k, sigma, *s);
  }
};

// calls f(std::bool_constant<b>{}): a run-time flag turned into a template argument
template <typename F>
inline void with_flag(bool b, F&& f) {
  if (b) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

// One chunk (and Adam's parameter pass), compiled per ISA: AVX-512 and AVX2 + FMA (std::fma is
// one instruction and the fast loops vectorise in 512- / 256-bit vectors) and the baseline ISA
// (std::fma from libm, when torch's kernels use it); same results on each. No lambda inside (a
// lambda body would not inherit the target attribute): the noise runs of cpu_kernels.cpp's
// for_each_noise_run are written out.
#define MMMOD_FUSED_CHUNK(SUFFIX, ATTR)                                                         \
  template <typename T, typename Run>                                                           \
  ATTR void chunk##SUFFIX(const cpu::KernelTable& K, const NoiseArgs& nz, uint64_t p0,         \
                          int64_t len, const Run& run) {                                       \
    alignas(64) float z[4 * cpu::kBlockGroups + cpu::kNormalsPad];                              \
    constexpr int64_t kRun = 4 * cpu::kBlockGroups;                                             \
    if (!nz.on) {                                                                               \
      for (int64_t i = 0; i < len; i += kRun) run.template go<T>(i, std::min(kRun, len - i), nullptr); \
      return;                                                                                   \
    }                                                                                           \
    uint64_t q = p0 >> 2;                                                                       \
    int64_t lead = static_cast<int64_t>(p0 & 3);                                                \
    for (int64_t i = 0; i < len;) {                                                             \
      const int64_t n = std::min<int64_t>(kRun - lead, len - i);                                \
      const int64_t ng = (lead + n + 3) >> 2;                                                   \
      K.normals(nz.seed, nz.step, nz.modality, q, ng, z);                                       \
      run.template go<T>(i, n, z + lead);                                                       \
      i += n;                                                                                   \
      q += static_cast<uint64_t>(ng);                                                           \
      lead = 0;                                                                                 \
    }                                                                                           \
  }                                                                                             \
  template <typename T, bool Decoupled>                                                         \
  ATTR void adam_params##SUFFIX(T* p, const T* m1, const T* sq, int64_t n, float u,            \
                                const AdamScalars& s, double step) {                            \
    adam_params_fast<T, Decoupled>(p, m1, sq, n, u, s, step);                                   \
  }

// the per-run bodies as always-inline members (inlined into the chunk function's ISA)
template <typename T>
struct SgdRun {
  T* p; const T* g; T* b; bool ready; float k, sigma, u; const SgdScalars* s;
  template <typename U>
  inline __attribute__((always_inline)) void go(int64_t i, int64_t n, const float* z) const {
    sgd_run<T>(p + i, g + i, b == nullptr ? nullptr : b + i, ready, n, z, k, sigma, u, *s);
  }
};

template <typename T>
struct AdamRun {  // pass 1 (the moments) of one chunk
  const T* p; const T* g; T* a; T* v; float k, sigma; const AdamScalars* s;
  template <typename U>
  inline __attribute__((always_inline)) void go(int64_t i, int64_t n, const float* z) const {
    adam_moments<T>(p + i, g + i, a + i, v + i, n, z, k, sigma, *s);
  }
};

// whether torch's pointwise kernels round a * b + c once (see the top)
bool torch_uses_fma() {
#if defined(__x86_64__) || defined(__i386__)
  // at::get_cpu_capability() names the kernels torch dispatches to: "AVX2" / "AVX512", or
  // "NO AVX" / "DEFAULT" for the baseline build (ATEN_CPU_CAPABILITY can lower it)
  static const bool contracts = at::get_cpu_capability().rfind("AVX", 0) == 0;
  return contracts;
#else
  return true;  // AArch64 / POWER compilers contract by default and the FMA is always there
#endif
}

#if defined(__x86_64__) || defined(__i386__)
MMMOD_FUSED_CHUNK(_fma, __attribute__((target("avx2,fma"))))
// the fast loops in 512-bit vectors where the CPU has them (same operations, same bits)
MMMOD_FUSED_CHUNK(_avx512, __attribute__((target("avx512f,avx512vl,avx512dq,avx2,fma,"
                                                  "prefer-vector-width=512"))))
#endif
MMMOD_FUSED_CHUNK(_base, )

bool has_fma() {
#if defined(__x86_64__) || defined(__i386__)
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return ok;
#else
  return false;
#endif
}

// the ISA of the fast loops: 2 AVX-512, 1 AVX2 + FMA, 0 none (the generic loops). The CPU's
// widest, capped by the kernel table in use, so MMMOD_CPU_KERNELS=avx2 runs the 256-bit loops
// and =scalar the generic ones: each path can be checked against the others on one machine.
int chunk_isa(const cpu::KernelTable& K) {
#if defined(MMMOD_X86_SIMD_TABLES)
  static const bool avx512 = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512dq");
  }();
  if (!has_fma()) return 0;
  if (&K == &cpu::avx512_kernels()) return avx512 ? 2 : 1;
  return &K == &cpu::avx2_kernels() ? 1 : 0;
#else
  (void)K;
  return 0;
#endif
}

// whether this build picks the chunk ISA at run time (x86); elsewhere the baseline build is
// the fast one
constexpr bool has_x86_isa_dispatch() {
#if defined(__x86_64__) || defined(__i386__)
  return true;
#else
  return false;
#endif
}

// the dtypes of the fast loops (R is the identity and A the storage type)
template <typename T>
constexpr bool kFastType = std::is_same<T, float>::value || std::is_same<T, double>::value;

// one chunk through the fast loops, on the widest ISA here
template <typename T, typename Run>
void chunk_fast(int isa, const cpu::KernelTable& K, const NoiseArgs& nz, uint64_t p0,
                int64_t len, const Run& run) {
#if defined(__x86_64__) || defined(__i386__)
  if (isa == 2) return chunk_avx512<T>(K, nz, p0, len, run);
  chunk_fma<T>(K, nz, p0, len, run);  // isa 1 (the fast loops need FMA on x86)
#else
  (void)isa;
  chunk_base<T>(K, nz, p0, len, run);
#endif
}

template <typename T, bool Decoupled>
void adam_params_isa(int isa, T* p, const T* m1, const T* sq, int64_t n, float u,
                     const AdamScalars& s, double step) {
#if defined(__x86_64__) || defined(__i386__)
  if (isa == 2) return adam_params_avx512<T, Decoupled>(p, m1, sq, n, u, s, step);
  adam_params_fma<T, Decoupled>(p, m1, sq, n, u, s, step);
#else
  (void)isa;
  adam_params_base<T, Decoupled>(p, m1, sq, n, u, s, step);
#endif
}

}  // namespace

void fused_sgd_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                   const c10::List<bool>& buffer_ready, at::IntArrayRef offsets, const at::Tensor& k,
                   const std::optional<at::Tensor>& sigma,
                   const std::optional<at::Tensor>& update_scale, double lr, double weight_decay,
                   double momentum, double dampening, bool nesterov, bool maximize, int64_t seed,
                   int64_t step, int64_t modality) {
  const bool use_momentum = momentum != 0.0;
  check_fused_sgd_inputs(params, grads, momentum_buffers, buffer_ready.size(), use_momentum,
                         offsets, k, sigma, update_scale, c10::DeviceType::CPU);
  if (params.empty()) return;
  std::vector<char> ready(params.size(), 0);
  for (size_t i = 0; use_momentum && i < params.size(); ++i) ready[i] = buffer_ready.get(i);
  const std::vector<Chunk> chunks = make_chunks(params);
  const SgdScalars s{maximize, nesterov, weight_decay != 0.0, use_momentum,
                     update_scale.has_value(), torch_uses_fma(), lr, weight_decay, momentum,
                     dampening};
  const CallValues cv = call_values(k, sigma, update_scale, seed, step, modality);
  const NoiseArgs& nz = cv.nz;
  const float kv = cv.k, u = cv.u;
  const float* sp = cv.sigma;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(),
                                  "mmmod_fused_sgd_cpu", [&] {
    using T = scalar_t;
    const cpu::KernelTable& K = cpu::active_kernels();
    const bool fma = has_fma();
    // torch's FMA kernels on a CPU with FMA (or a non-x86 one): the fast loops
    const int isa = chunk_isa(K);
    const bool fast = s.torch_fma && (isa > 0 || !has_x86_isa_dispatch());
    at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const Chunk& ch = chunks[c];
        if constexpr (kFastType<T>) {
          if (fast) {
            const bool rdy = use_momentum && ready[ch.tensor] != 0;
            T* p = params[ch.tensor].mutable_data_ptr<T>() + ch.start;
            const T* g = grads[ch.tensor].const_data_ptr<T>() + ch.start;
            T* b = use_momentum ? momentum_buffers[ch.tensor].mutable_data_ptr<T>() + ch.start
                                : nullptr;
            const float sg = sp != nullptr ? sp[ch.tensor] : 0.0f;
            const uint64_t p0 = static_cast<uint64_t>(offsets[ch.tensor] + ch.start);
            with_flag(nz.on, [&](auto noise) {
              with_flag(s.decay, [&](auto decay) {
                with_flag(use_momentum, [&](auto mom) {
                  with_flag(rdy, [&](auto ready_buf) {
                    with_flag(use_momentum && nesterov, [&](auto nest) {
                      const SgdFastRun<T, decltype(noise)::value, decltype(decay)::value,
                                       decltype(mom)::value, decltype(ready_buf)::value,
                                       decltype(nest)::value>
                          run{p, g, b, kv, sg, u, &s};
                      chunk_fast<T>(isa, K, nz, p0, ch.len, run);
                    });
                  });
                });
              });
            });
            continue;
          }
        }
        const SgdRun<T> run{params[ch.tensor].mutable_data_ptr<T>() + ch.start,
                            grads[ch.tensor].const_data_ptr<T>() + ch.start,
                            use_momentum ? momentum_buffers[ch.tensor].mutable_data_ptr<T>() + ch.start
                                         : nullptr,
                            use_momentum && ready[ch.tensor] != 0, kv,
                            sp != nullptr ? sp[ch.tensor] : 0.0f, u, &s};
        const uint64_t p0 = static_cast<uint64_t>(offsets[ch.tensor] + ch.start);
#if defined(__x86_64__) || defined(__i386__)
        if (fma) {
          chunk_fma<T>(K, nz, p0, ch.len, run);
          continue;
        }
#endif
        (void)fma;
        chunk_base<T>(K, nz, p0, ch.len, run);
      }
    });
  });
}

void fused_adam_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                    at::TensorList exp_avg_sqs, at::ArrayRef<double> steps,
                    at::IntArrayRef offsets, const at::Tensor& k,
                    const std::optional<at::Tensor>& sigma,
                    const std::optional<at::Tensor>& update_scale, double lr, double beta1,
                    double beta2, double eps, double weight_decay, bool decoupled, bool maximize,
                    int64_t seed, int64_t step, int64_t modality) {
  check_fused_adam_inputs(params, grads, exp_avgs, exp_avg_sqs, steps, offsets, k, sigma,
                          update_scale, c10::DeviceType::CPU);
  if (params.empty()) return;
  const std::vector<Chunk> chunks = make_chunks(params);
  const AdamScalars s{maximize, weight_decay != 0.0, decoupled, update_scale.has_value(),
                      torch_uses_fma(), lr, beta1, beta2, eps, weight_decay};
  const CallValues cv = call_values(k, sigma, update_scale, seed, step, modality);
  const NoiseArgs& nz = cv.nz;
  const float kv = cv.k, u = cv.u;
  const float* sp = cv.sigma;
  const at::ScalarType dtype = params[0].scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "mmmod_fused_adam_cpu", [&] {
    using T = scalar_t;
    const cpu::KernelTable& K = cpu::active_kernels();
    const bool fma = has_fma();
    const int isa = chunk_isa(K);
    const bool fast = s.torch_fma && (isa > 0 || !has_x86_isa_dispatch());
    at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t c0, int64_t c1) {
      // torch's square roots of one chunk's exp_avg_sq (reused across this thread's chunks)
      at::Tensor sq = at::empty({kChunkCpu}, at::TensorOptions().dtype(dtype));
      for (int64_t c = c0; c < c1; ++c) {
        const Chunk& ch = chunks[c];
        T* p = params[ch.tensor].mutable_data_ptr<T>() + ch.start;
        T* a = exp_avgs[ch.tensor].mutable_data_ptr<T>() + ch.start;
        T* v = exp_avg_sqs[ch.tensor].mutable_data_ptr<T>() + ch.start;
        if constexpr (kFastType<T>) {
          if (fast) {
            const T* g = grads[ch.tensor].const_data_ptr<T>() + ch.start;
            const float sg = sp != nullptr ? sp[ch.tensor] : 0.0f;
            const uint64_t p0 = static_cast<uint64_t>(offsets[ch.tensor] + ch.start);
            with_flag(nz.on, [&](auto noise) {
              with_flag(s.decay && !s.decoupled, [&](auto l2) {
                const AdamFastRun<T, decltype(noise)::value, decltype(l2)::value> run{
                    p, g, a, v, kv, sg, &s};
                chunk_fast<T>(isa, K, nz, p0, ch.len, run);
              });
            });
            at::Tensor sq_chunk = sq.narrow(0, 0, ch.len);
            at::sqrt_out(sq_chunk, at::from_blob(v, {ch.len}, at::TensorOptions().dtype(dtype)));
            const T* root = sq_chunk.const_data_ptr<T>();
            with_flag(s.decay && s.decoupled, [&](auto decoupled_decay) {
              adam_params_isa<T, decltype(decoupled_decay)::value>(isa, p, a, root, ch.len, u, s,
                                                                   steps[ch.tensor]);
            });
            continue;
          }
        }
        const AdamRun<T> run{p, grads[ch.tensor].const_data_ptr<T>() + ch.start, a, v, kv,
                             sp != nullptr ? sp[ch.tensor] : 0.0f, &s};
        const uint64_t p0 = static_cast<uint64_t>(offsets[ch.tensor] + ch.start);
        bool done = false;
#if defined(__x86_64__) || defined(__i386__)
        if (fma) {
          chunk_fma<T>(K, nz, p0, ch.len, run);
          done = true;
        }
#endif
        (void)fma;
        if (!done) chunk_base<T>(K, nz, p0, ch.len, run);
        at::Tensor sq_chunk = sq.narrow(0, 0, ch.len);
        at::sqrt_out(sq_chunk, at::from_blob(v, {ch.len}, at::TensorOptions().dtype(dtype)));
        adam_params<T>(p, a, sq_chunk.const_data_ptr<T>(), ch.len, u, s, steps[ch.tensor]);
      }
    });
  });
}

}  // namespace fused_cpu
}  // namespace mmmod

TORCH_LIBRARY_IMPL(mmmod, CPU, m) {
  m.impl("fused_sgd_", &mmmod::fused_cpu::fused_sgd_cpu);
  m.impl("fused_adam_", &mmmod::fused_cpu::fused_adam_cpu);
}
