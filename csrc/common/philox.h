// Per-element math shared by the CPU (g++) and CUDA (nvcc) kernels of mmmod.
//
// The noise definition is mmmod/reference/philox.py: flat element e of a modality's stream at
// step t with seed S takes output e % 4 of Philox4x32-10 with key (lo32 S, hi32 S) and counter
// (lo32(e / 4), hi32(e / 4), t mod 2^32, modality); each output word is folded as a signed int32
// (x < 0 -> -x - 1), scaled by 4.6566127342e-10f, and Box-Muller turns (u0, u1), (u2, u3) into
// (r cos th, r sin th) with r = sqrt(-2 log max(u_a, 1e-7)), th = 6.283185307179586f * u_b.
//
// Only standard C++ / CUDA headers: this file compiles with g++ (no CUDA) and with nvcc.
#pragma once

#include <stdint.h>

#if defined(__CUDACC__)
#define MMMOD_HD __host__ __device__ __forceinline__
#else
#include <cmath>
#define MMMOD_HD inline
#endif

namespace mmmod {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;  // round multiplier A
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;  // round multiplier B
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;  // key increment A
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;  // key increment B
constexpr float kUniformScale = 4.6566127342e-10f;
constexpr float kTwoPi = 6.283185307179586f;
constexpr float kMinUniform = 1.0e-7f;

struct U32x4 {
  uint32_t x, y, z, w;
};

struct F32x4 {
  float x, y, z, w;
};

MMMOD_HD void mulhilo32(uint32_t a, uint32_t b, uint32_t* hi, uint32_t* lo) {
#if defined(__CUDA_ARCH__)
  *hi = __umulhi(a, b);
  *lo = a * b;
#else
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(p >> 32);
  *lo = static_cast<uint32_t>(p);
#endif
}

// Philox4x32-10 (Salmon et al. 2011), the round structure of Triton's tl.philox.
MMMOD_HD U32x4 philox4x32_10(U32x4 c, uint32_t k0, uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo32(kPhiloxM0, c.x, &hi0, &lo0);
    mulhilo32(kPhiloxM1, c.z, &hi1, &lo1);
    const U32x4 n = {hi1 ^ c.y ^ k0, lo1, hi0 ^ c.w ^ k1, lo0};
    c = n;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  return c;
}

// The four raw words of Philox counter group q (elements 4q .. 4q + 3 of the stream).
MMMOD_HD U32x4 philox_words(uint64_t seed, uint32_t step, uint32_t modality, uint64_t q) {
  const U32x4 c = {static_cast<uint32_t>(q), static_cast<uint32_t>(q >> 32), step, modality};
  return philox4x32_10(c, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// Triton's uint_to_uniform_float for 32-bit words: [0, 1) in float32.
MMMOD_HD float uint32_to_uniform(uint32_t x) {
  int32_t s = static_cast<int32_t>(x);
  s = s < 0 ? -s - 1 : s;  // never overflows: -(-2^31) - 1 = 2^31 - 1
  return static_cast<float>(s) * kUniformScale;
}

#if defined(__CUDA_ARCH__)
MMMOD_HD float mmmod_logf(float x) { return logf(x); }
MMMOD_HD float mmmod_sqrtf(float x) { return sqrtf(x); }
MMMOD_HD void mmmod_sincosf(float x, float* s, float* c) { sincosf(x, s, c); }
#else
MMMOD_HD float mmmod_logf(float x) { return std::log(x); }
MMMOD_HD float mmmod_sqrtf(float x) { return std::sqrt(x); }
MMMOD_HD void mmmod_sincosf(float x, float* s, float* c) {
  *s = std::sin(x);
  *c = std::cos(x);
}
#endif

// Box-Muller on one uniform pair; every step rounded to float32 as the reference does.
MMMOD_HD void box_muller(float ua, float ub, float* n0, float* n1) {
  ua = ua < kMinUniform ? kMinUniform : ua;
#if defined(__CUDA_ARCH__)
  const float th = __fmul_rn(kTwoPi, ub);
  const float r = mmmod_sqrtf(__fmul_rn(mmmod_logf(ua), -2.0f));
  float s, c;
  mmmod_sincosf(th, &s, &c);
  *n0 = __fmul_rn(r, c);
  *n1 = __fmul_rn(r, s);
#else
  const float th = kTwoPi * ub;
  const float r = mmmod_sqrtf(mmmod_logf(ua) * -2.0f);
  float s, c;
  mmmod_sincosf(th, &s, &c);
  *n0 = r * c;
  *n1 = r * s;
#endif
}

// The four normals of counter group q.
MMMOD_HD F32x4 philox_normal4(uint64_t seed, uint32_t step, uint32_t modality, uint64_t q) {
  const U32x4 w = philox_words(seed, step, modality, q);
  F32x4 out;
  box_muller(uint32_to_uniform(w.x), uint32_to_uniform(w.y), &out.x, &out.y);
  box_muller(uint32_to_uniform(w.z), uint32_to_uniform(w.w), &out.z, &out.w);
  return out;
}

MMMOD_HD float f32x4_get(const F32x4& v, int i) {
  return i == 0 ? v.x : (i == 1 ? v.y : (i == 2 ? v.z : v.w));
}

// The modulation arithmetic of the reference: float32(k * g) + float32(sigma * n), each product
// rounded separately (no fused multiply-add), so it is bit-identical to the eager torch ops.
MMMOD_HD float modulate_value(float g, float k, float sigma, float n) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(__fmul_rn(g, k), __fmul_rn(sigma, n));
#else
  // built with -ffp-contract=off, so this is never contracted into a fused multiply-add
  return g * k + sigma * n;
#endif
}

MMMOD_HD float scale_value(float g, float k) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(g, k);
#else
  return g * k;
#endif
}

// Chan et al. pairwise merge of (count, mean, M2) partial statistics, in float64.
struct Moments {
  double n, mean, m2;
};

MMMOD_HD Moments moments_merge(Moments a, Moments b) {
  if (a.n == 0) return b;
  if (b.n == 0) return a;
  const double n = a.n + b.n;
  const double delta = b.mean - a.mean;
  Moments out;
  out.n = n;
  out.mean = a.mean + delta * (b.n / n);
  out.m2 = a.m2 + b.m2 + delta * delta * (a.n * b.n / n);
  return out;
}

// sigma of the reference: float32(std64 + 1e-8) with std64 unbiased (0 below two elements),
// times |k| for noise_std="scaled"; non-finite -> 0 (no noise), then times the gate.
MMMOD_HD float sigma_from_moments(Moments m, bool scaled, float k, float gate) {
  double sd = 0.0;
  if (m.n >= 2) {
    double var = m.m2 / (m.n - 1.0);
#if defined(__CUDA_ARCH__)
    sd = sqrt(var);
#else
    sd = std::sqrt(var);
#endif
  }
  if (scaled) sd = sd * static_cast<double>(k < 0 ? -k : k);
  float sigma = static_cast<float>(sd + 1e-8);
  // finite test without <cmath> classification (NaN fails both comparisons)
  const float big = 3.4028234663852886e38f;
  if (!(sigma <= big && sigma >= -big)) sigma = 0.0f;
#if defined(__CUDA_ARCH__)
  return __fmul_rn(sigma, gate);
#else
  return sigma * gate;
#endif
}

}  // namespace mmmod
