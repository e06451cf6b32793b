// The AVX2 + FMA kernel table (cpu_kernels.h), selected at run time by cpu_kernels.cpp only when
// the CPU supports AVX2 and FMA (and the AVX-512 table is not taken, and the environment does not
// cap the choice at scalar).
//
// - Philox4x32-10 across lanes: a register holds one word of 4 counter groups, one uint32 in the
//   low half of each 64-bit lane, so _mm256_mul_epu32 yields the full 32x32->64 product (hi in
//   the upper half, lo in the lower); 4 such registers (16 groups) are in flight per iteration.
//   The integer words are bit-identical to the scalar philox4x32_10 of philox.h, and so are the
//   float32 uniforms (same fold, same int->float rounding, same product).
// - Box-Muller with inlined float32 polynomials (Cephes logf, sinf/cosf on [-pi/4, pi/4] with a
//   three-part pi/2 reduction done with FMA): within a few ulp of libm/Sleef; the rounding steps of
//   the reference (th = 2pi u_b, r = sqrt(log(max(u_a, 1e-7)) * -2), r cos th, r sin th) are kept.
// - Every group goes through the same vector code, a partial batch on padded lanes, so a normal
//   never depends on where a block, chunk or thread boundary falls.
// - Statistics: 16 float64 lanes in the order of the portable table (bit-identical to it).
// - logsumexp of score rows with at::vec (Sleef expf, u10), terms summed in float64.
//
// The ISA is switched on for this translation unit alone with a target pragma (setuptools has no
// per-file flags); at::vec's inline namespace is CPU_CAPABILITY=AVX2 so its symbols cannot clash
// with the default build's, and everything of ours lives in an anonymous namespace. Its name sorts
// after the baseline objects' so the linker keeps the baseline copy of any shared inline function; the
// whole extension is compiled with -ffp-contract=off, so only the explicit _mm256_fmadd_ps below
// fuse (the reference's separately rounded products are kept elsewhere).
#include "cpu/cpu_kernels.h"  // before the pragma: its inline functions stay baseline code

#include <type_traits>  // compile-time only: emits no code under the target pragma

#if defined(MMMOD_X86_SIMD_TABLES)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2

// sleef.h declares its 256-bit functions only under __AVX__, which the target pragma does not
// define: declare them here (the definitions are exported by libtorch_cpu).
#include <immintrin.h>
#if !defined(__AVX__)
#define __AVX__ 1
#define MMMOD_UNDEF_AVX
#endif
#if !defined(__AVX2__)
#define __AVX2__ 1
#define MMMOD_UNDEF_AVX2
#endif
#define SLEEF_STATIC_LIBS
#include <sleef.h>
#if defined(MMMOD_UNDEF_AVX)
#undef __AVX__
#endif
#if defined(MMMOD_UNDEF_AVX2)
#undef __AVX2__
#endif

#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <limits>

namespace mmmod {
namespace cpu {
namespace {

#define MMMOD_INLINE inline __attribute__((always_inline))

// ---- Philox4x32-10 ---------------------------------------------------------------------------
constexpr int kHalves = 4;  // registers of 4 groups in flight: 16 groups per iteration

// Ten rounds on kHalves x 4 groups. c[w][h]: word w of half h, in the low 32 bits of each 64-bit
// lane (the upper halves carry garbage that only ever reaches _mm256_mul_epu32, which ignores it,
// or the final extraction, which drops it).
MMMOD_INLINE void philox_rounds(__m256i (&c)[4][kHalves], const __m256i* K0, const __m256i* K1,
                                __m256i r0_c0x, __m256i r0_c1, __m256i r0_c2x) {
  const __m256i m0 = _mm256_set1_epi64x(kPhiloxM0);
  const __m256i m1 = _mm256_set1_epi64x(kPhiloxM1);
  // round 0: words 2 and 3 (step, modality) are the same in every lane, so M1 * step and the
  // key are folded into constants by the caller
#pragma GCC unroll 4
  for (int h = 0; h < kHalves; ++h) {
    const __m256i p0 = _mm256_mul_epu32(c[0][h], m0);
    c[0][h] = _mm256_xor_si256(r0_c0x, c[1][h]);
    c[1][h] = r0_c1;
    c[2][h] = _mm256_xor_si256(_mm256_srli_epi64(p0, 32), r0_c2x);
    c[3][h] = p0;
  }
#pragma GCC unroll 9
  for (int r = 1; r < 10; ++r) {
#pragma GCC unroll 4
    for (int h = 0; h < kHalves; ++h) {
      const __m256i p0 = _mm256_mul_epu32(c[0][h], m0);
      const __m256i p1 = _mm256_mul_epu32(c[2][h], m1);
      // (c1 ^ key) is off the multiply's critical path
      c[0][h] = _mm256_xor_si256(_mm256_srli_epi64(p1, 32), _mm256_xor_si256(c[1][h], K0[r]));
      c[1][h] = p1;
      c[2][h] = _mm256_xor_si256(_mm256_srli_epi64(p0, 32), _mm256_xor_si256(c[3][h], K1[r]));
      c[3][h] = p0;
    }
  }
}

// Eight uint32 words, lane j = group j, from the half with the even groups and the odd one.
MMMOD_INLINE __m256i merge_halves(__m256i even, __m256i odd) {
  return _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
}

// uint32_to_uniform of philox.h: s ^ (s >> 31) is s for s >= 0 and -s - 1 otherwise.
MMMOD_INLINE __m256 to_uniform(__m256i w) {
  const __m256i s = _mm256_xor_si256(w, _mm256_srai_epi32(w, 31));
  return _mm256_mul_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(kUniformScale));
}

// ---- float32 log / sincos, N independent vectors interleaved step by step -----------------
// (the dependency chains are ~100 cycles long; written side by side they overlap in the
// out-of-order window, written one after the other they do not)
#define MMMOD_EACH(i) _Pragma("GCC unroll 8") for (int i = 0; i < N; ++i)

// Natural log of positive normal x: Cephes logf (max relative error ~1 ulp) on the mantissa
// brought to [sqrt(1/2), sqrt(2)) with integer arithmetic (as musl does), where m - 1 is exact.
template <int N>
MMMOD_INLINE void log_ps(const __m256* x, __m256* out) {
  const __m256i off = _mm256_set1_epi32(0x3f3504f3);  // bits of float32(sqrt(1/2))
  __m256 e[N], m[N], z[N], p[N];
  MMMOD_EACH(i) {
    const __m256i d = _mm256_sub_epi32(_mm256_castps_si256(x[i]), off);
    e[i] = _mm256_cvtepi32_ps(_mm256_srai_epi32(d, 23));
    m[i] = _mm256_sub_ps(_mm256_castsi256_ps(_mm256_add_epi32(_mm256_and_si256(d, _mm256_set1_epi32(0x007fffff)), off)),
                         _mm256_set1_ps(1.0f));
  }
  MMMOD_EACH(i) z[i] = _mm256_mul_ps(m[i], m[i]);
  MMMOD_EACH(i) p[i] = _mm256_fmadd_ps(_mm256_set1_ps(7.0376836292E-2f), m[i], _mm256_set1_ps(-1.1514610310E-1f));
  MMMOD_EACH(i) p[i] = _mm256_fmadd_ps(p[i], m[i], _mm256_set1_ps(1.1676998740E-1f));
  MMMOD_EACH(i) p[i] = _mm256_fmadd_ps(p[i], m[i], _mm256_set1_ps(-1.2420140846E-1f));
  MMMOD_EACH(i) p[i] = _mm256_fmadd_ps(p[i], m[i], _mm256_set1_ps(1.4249322787E-1f));
  MMMOD_EACH(i) p[i] = _mm256_fmadd_ps(p[i], m[i], _mm256_set1_ps(-1.6668057665E-1f));
  MMMOD_EACH(i) p[i] = _mm256_fmadd_ps(p[i], m[i], _mm256_set1_ps(2.0000714765E-1f));
  MMMOD_EACH(i) p[i] = _mm256_fmadd_ps(p[i], m[i], _mm256_set1_ps(-2.4999993993E-1f));
  MMMOD_EACH(i) p[i] = _mm256_fmadd_ps(p[i], m[i], _mm256_set1_ps(3.3333331174E-1f));
  MMMOD_EACH(i) {
    __m256 y = _mm256_mul_ps(_mm256_mul_ps(p[i], m[i]), z[i]);
    y = _mm256_fmadd_ps(e[i], _mm256_set1_ps(-2.12194440e-4f), y);
    y = _mm256_fnmadd_ps(_mm256_set1_ps(0.5f), z[i], y);
    out[i] = _mm256_fmadd_ps(e[i], _mm256_set1_ps(0.693359375f), _mm256_add_ps(m[i], y));
  }
}

// sin and cos of th in [0, 2pi]: th - j pi/2 with pi/2 split in three float32 parts (the first
// FMA is exact, the reduced argument keeps full relative precision next to the zeros), then the
// Cephes sinf/cosf polynomials on [-pi/4, pi/4] and the quadrant's swap and signs.
template <int N>
MMMOD_INLINE void sincos_ps(const __m256* th, __m256* s, __m256* c) {
  __m256 jf[N], y[N], z[N], sp[N], cp[N];
  MMMOD_EACH(i) {
    jf[i] = _mm256_round_ps(_mm256_mul_ps(th[i], _mm256_set1_ps(0.636619772367581343f)),
                            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    y[i] = _mm256_fnmadd_ps(jf[i], _mm256_set1_ps(0x1.921fb6p+0f), th[i]);
  }
  MMMOD_EACH(i) y[i] = _mm256_fnmadd_ps(jf[i], _mm256_set1_ps(-0x1.777a5cp-25f), y[i]);
  MMMOD_EACH(i) y[i] = _mm256_fnmadd_ps(jf[i], _mm256_set1_ps(-0x1.ee59dap-50f), y[i]);
  MMMOD_EACH(i) z[i] = _mm256_mul_ps(y[i], y[i]);
  MMMOD_EACH(i) {
    sp[i] = _mm256_fmadd_ps(_mm256_set1_ps(-1.9515295891E-4f), z[i], _mm256_set1_ps(8.3321608736E-3f));
    cp[i] = _mm256_fmadd_ps(_mm256_set1_ps(2.443315711809948E-5f), z[i], _mm256_set1_ps(-1.388731625493765E-3f));
  }
  MMMOD_EACH(i) {
    sp[i] = _mm256_fmadd_ps(sp[i], z[i], _mm256_set1_ps(-1.6666654611E-1f));
    cp[i] = _mm256_fmadd_ps(cp[i], z[i], _mm256_set1_ps(4.166664568298827E-2f));
  }
  MMMOD_EACH(i) {
    const __m256 sy = _mm256_fmadd_ps(_mm256_mul_ps(y[i], z[i]), sp[i], y[i]);
    const __m256 cy = _mm256_fmadd_ps(_mm256_mul_ps(z[i], z[i]), cp[i],
                                      _mm256_fnmadd_ps(_mm256_set1_ps(0.5f), z[i], _mm256_set1_ps(1.0f)));
    const __m256i j = _mm256_cvtps_epi32(jf[i]);
    const __m256i one = _mm256_set1_epi32(1), two = _mm256_set1_epi32(2);
    const __m256 swap = _mm256_castsi256_ps(_mm256_slli_epi32(j, 31));  // blendv reads the sign bit
    const __m256 ss = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_and_si256(j, two), 30));
    const __m256 cs = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_and_si256(_mm256_add_epi32(j, one), two), 30));
    s[i] = _mm256_xor_ps(_mm256_blendv_ps(sy, cy, swap), ss);
    c[i] = _mm256_xor_ps(_mm256_blendv_ps(cy, sy, swap), cs);
  }
}

// box_muller of philox.h on N x 8 pairs of raw words: n0 = r cos th, n1 = r sin th.
template <int N>
MMMOD_INLINE void box_muller_words(const __m256i* wa, const __m256i* wb, __m256* n0, __m256* n1) {
  __m256 a[N], th[N], r[N], s[N], c[N];
  MMMOD_EACH(i) {
    a[i] = _mm256_max_ps(to_uniform(wa[i]), _mm256_set1_ps(kMinUniform));
    th[i] = _mm256_mul_ps(_mm256_set1_ps(kTwoPi), to_uniform(wb[i]));
  }
  log_ps<N>(a, r);
  MMMOD_EACH(i) r[i] = _mm256_sqrt_ps(_mm256_mul_ps(r[i], _mm256_set1_ps(-2.0f)));
  sincos_ps<N>(th, s, c);
  MMMOD_EACH(i) {
    n0[i] = _mm256_mul_ps(r[i], c[i]);
    n1[i] = _mm256_mul_ps(r[i], s[i]);
  }
}

// The 32 normals of 8 groups (lane j = group j of each of a0 .. a3) stored in stream order.
MMMOD_INLINE void store_transposed(__m256 a0, __m256 a1, __m256 a2, __m256 a3, float* z) {
  // 4 x 8 transpose: out[4 j + w] = a_w[j]
  const __m256 t0 = _mm256_unpacklo_ps(a0, a1), t1 = _mm256_unpackhi_ps(a0, a1);
  const __m256 t2 = _mm256_unpacklo_ps(a2, a3), t3 = _mm256_unpackhi_ps(a2, a3);
  const __m256 g04 = _mm256_shuffle_ps(t0, t2, 0x44), g15 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 g26 = _mm256_shuffle_ps(t1, t3, 0x44), g37 = _mm256_shuffle_ps(t1, t3, 0xEE);
  _mm256_storeu_ps(z, _mm256_permute2f128_ps(g04, g15, 0x20));
  _mm256_storeu_ps(z + 8, _mm256_permute2f128_ps(g26, g37, 0x20));
  _mm256_storeu_ps(z + 16, _mm256_permute2f128_ps(g04, g15, 0x31));
  _mm256_storeu_ps(z + 24, _mm256_permute2f128_ps(g26, g37, 0x31));
}

void normals_avx2(uint64_t seed, uint32_t step, uint32_t modality, uint64_t q0, int64_t ngroups,
                  float* z) {
  constexpr int kSets = kHalves / 2;  // batches of 8 groups per iteration
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  __m256i K0[10], K1[10];
  for (int r = 0; r < 10; ++r) {
    K0[r] = _mm256_set1_epi32(static_cast<int>(k0 + static_cast<uint32_t>(r) * kPhiloxW0));
    K1[r] = _mm256_set1_epi32(static_cast<int>(k1 + static_cast<uint32_t>(r) * kPhiloxW1));
  }
  const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * step;
  const __m256i r0_c0x = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(p1 >> 32) ^ k0));
  const __m256i r0_c1 = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(p1)));
  const __m256i r0_c2x = _mm256_set1_epi32(static_cast<int>(modality ^ k1));
  // half 2p holds groups q + 8p + {0, 2, 4, 6}, half 2p + 1 groups q + 8p + {1, 3, 5, 7}
  const __m256i lane = _mm256_set_epi64x(6, 4, 2, 0);
  for (int64_t g = 0; g < ngroups; g += 8 * kSets) {
    const __m256i base = _mm256_add_epi64(_mm256_set1_epi64x(static_cast<int64_t>(q0 + static_cast<uint64_t>(g))), lane);
    __m256i c[4][kHalves];
    for (int h = 0; h < kHalves; ++h) {
      // 64-bit add: the low word carries into the high one
      const __m256i q = _mm256_add_epi64(base, _mm256_set1_epi64x(8 * (h / 2) + (h % 2)));
      c[0][h] = q;
      c[1][h] = _mm256_srli_epi64(q, 32);
    }
    philox_rounds(c, K0, K1, r0_c0x, r0_c1, r0_c2x);
    // pairs (word 0, word 1) and (word 2, word 3) of every set, Box-Muller side by side
    __m256i wa[2 * kSets], wb[2 * kSets];
    __m256 n0[2 * kSets], n1[2 * kSets];
    for (int p = 0; p < kSets; ++p) {
      wa[2 * p] = merge_halves(c[0][2 * p], c[0][2 * p + 1]);
      wb[2 * p] = merge_halves(c[1][2 * p], c[1][2 * p + 1]);
      wa[2 * p + 1] = merge_halves(c[2][2 * p], c[2][2 * p + 1]);
      wb[2 * p + 1] = merge_halves(c[3][2 * p], c[3][2 * p + 1]);
    }
    box_muller_words<2 * kSets>(wa, wb, n0, n1);
    for (int p = 0; p < kSets; ++p) {
      if (p > 0 && g + 8 * p >= ngroups) break;  // padding past the last batch of 8 is not stored
      store_transposed(n0[2 * p], n1[2 * p], n0[2 * p + 1], n1[2 * p + 1], z + 4 * (g + 8 * p));
    }
  }
}

// ---- modulation -----------------------------------------------------------------------------
void modulate_f32_avx2(float* x, const float* z, int64_t n, float k, float sigma) {
  const __m256 kv = _mm256_set1_ps(k), sv = _mm256_set1_ps(sigma);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    _mm256_storeu_ps(x + i, _mm256_add_ps(_mm256_mul_ps(v, kv), _mm256_mul_ps(sv, _mm256_loadu_ps(z + i))));
  }
  for (; i < n; ++i) x[i] = x[i] * k + sigma * z[i];  // -ffp-contract=off: same rounding
}

void scale_f32_avx2(float* x, int64_t n, float k) {
  const __m256 kv = _mm256_set1_ps(k);
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m256 v0 = _mm256_loadu_ps(x + i), v1 = _mm256_loadu_ps(x + i + 8);
    const __m256 v2 = _mm256_loadu_ps(x + i + 16), v3 = _mm256_loadu_ps(x + i + 24);
    _mm256_storeu_ps(x + i, _mm256_mul_ps(v0, kv));
    _mm256_storeu_ps(x + i + 8, _mm256_mul_ps(v1, kv));
    _mm256_storeu_ps(x + i + 16, _mm256_mul_ps(v2, kv));
    _mm256_storeu_ps(x + i + 24, _mm256_mul_ps(v3, kv));
  }
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, _mm256_mul_ps(_mm256_loadu_ps(x + i), kv));
  for (; i < n; ++i) x[i] = x[i] * k;
}

// ---- statistics -----------------------------------------------------------------------------
void lanes_shifted_f32_avx2(const float* x, int64_t n, double c, double* s1, double* s2) {
  const __m256d cv = _mm256_set1_pd(c);
  __m256d a[4], q[4];
  for (int r = 0; r < 4; ++r) {
    a[r] = _mm256_loadu_pd(s1 + 4 * r);
    q[r] = _mm256_loadu_pd(s2 + 4 * r);
  }
  for (int64_t i = 0; i < n; i += 16) {
    _mm_prefetch(reinterpret_cast<const char*>(x + i) + kStatsPrefetchBytes, _MM_HINT_T0);  // as AVX-512
    const __m256 v0 = _mm256_loadu_ps(x + i), v1 = _mm256_loadu_ps(x + i + 8);
    const __m256d d[4] = {_mm256_sub_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(v0)), cv),
                          _mm256_sub_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(v0, 1)), cv),
                          _mm256_sub_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(v1)), cv),
                          _mm256_sub_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(v1, 1)), cv)};
    for (int r = 0; r < 4; ++r) {
      a[r] = _mm256_add_pd(a[r], d[r]);
      q[r] = _mm256_add_pd(q[r], _mm256_mul_pd(d[r], d[r]));  // separately rounded, no FMA
    }
  }
  for (int r = 0; r < 4; ++r) {
    _mm256_storeu_pd(s1 + 4 * r, a[r]);
    _mm256_storeu_pd(s2 + 4 * r, q[r]);
  }
}

void lanes_sqdev_f32_avx2(const float* x, int64_t n, double mean, double* lanes) {
  const __m256d mv = _mm256_set1_pd(mean);
  __m256d a0 = _mm256_loadu_pd(lanes), a1 = _mm256_loadu_pd(lanes + 4);
  __m256d a2 = _mm256_loadu_pd(lanes + 8), a3 = _mm256_loadu_pd(lanes + 12);
  for (int64_t i = 0; i < n; i += 16) {
    const __m256 v0 = _mm256_loadu_ps(x + i), v1 = _mm256_loadu_ps(x + i + 8);
    const __m256d d0 = _mm256_sub_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(v0)), mv);
    const __m256d d1 = _mm256_sub_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(v0, 1)), mv);
    const __m256d d2 = _mm256_sub_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(v1)), mv);
    const __m256d d3 = _mm256_sub_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(v1, 1)), mv);
    a0 = _mm256_add_pd(a0, _mm256_mul_pd(d0, d0));
    a1 = _mm256_add_pd(a1, _mm256_mul_pd(d1, d1));
    a2 = _mm256_add_pd(a2, _mm256_mul_pd(d2, d2));
    a3 = _mm256_add_pd(a3, _mm256_mul_pd(d3, d3));
  }
  _mm256_storeu_pd(lanes, a0);
  _mm256_storeu_pd(lanes + 4, a1);
  _mm256_storeu_pd(lanes + 8, a2);
  _mm256_storeu_pd(lanes + 12, a3);
}

// ---- MMPareto's pair moments: pair_lanes.h over 4 doubles per register ----------------------
struct Avx2Doubles {
  using Reg = __m256d;
  static constexpr int kWidth = 4;
  static Reg set1(double x) { return _mm256_set1_pd(x); }
  static Reg loadu(const double* p) { return _mm256_loadu_pd(p); }
  static void storeu(double* p, Reg v) { _mm256_storeu_pd(p, v); }
  static Reg widen(const float* p) { return _mm256_cvtps_pd(_mm_loadu_ps(p)); }
  static Reg mul(Reg a, Reg b) { return _mm256_mul_pd(a, b); }
  static Reg sub(Reg a, Reg b) { return _mm256_sub_pd(a, b); }
  static Reg fmadd(Reg a, Reg b, Reg c) { return _mm256_fmadd_pd(a, b, c); }
};
#include "cpu/pair_lanes.h"

// ---- scores ---------------------------------------------------------------------------------
double row_lse_f32_avx2(const float* row, int64_t C) {
  using V = at::vec::Vectorized<float>;
  static_assert(V::size() == 8, "AVX2 Vectorized<float> holds 8 floats");
  const int64_t c8 = C - C % 8;
  alignas(32) float tail[8];
  for (int j = 0; j < 8; ++j) tail[j] = -std::numeric_limits<float>::infinity();
  for (int64_t c = c8; c < C; ++c) tail[c - c8] = row[c];
  __m256 mx = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  __m256 nan = _mm256_setzero_ps();
  for (int64_t c = 0; c <= c8; c += 8) {
    const __m256 v = c < c8 ? _mm256_loadu_ps(row + c) : _mm256_load_ps(tail);
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    mx = _mm256_max_ps(mx, v);
  }
  if (_mm256_movemask_ps(nan)) return std::numeric_limits<double>::quiet_NaN();
  alignas(32) float m8[8];
  _mm256_store_ps(m8, mx);
  float m = m8[0];
  for (int j = 1; j < 8; ++j) m = m8[j] > m ? m8[j] : m;
  if (std::isinf(m)) m = 0.0f;  // torch's logsumexp: an infinite max is not subtracted
  const V mv(m);
  __m256d s0 = _mm256_setzero_pd(), s1 = s0;
  for (int64_t c = 0; c <= c8; c += 8) {
    const V v = c < c8 ? V::loadu(row + c) : V::loadu(tail);
    const __m256 e = (v - mv).exp();
    s0 = _mm256_add_pd(s0, _mm256_cvtps_pd(_mm256_castps256_ps128(e)));
    s1 = _mm256_add_pd(s1, _mm256_cvtps_pd(_mm256_extractf128_ps(e, 1)));
  }
  alignas(32) double s[4];
  _mm256_store_pd(s, _mm256_add_pd(s0, s1));
  return static_cast<double>(m) + std::log((s[0] + s[2]) + (s[1] + s[3]));
}

const KernelTable kAvx2 = {"avx2", normals_avx2, modulate_f32_avx2, scale_f32_avx2, lanes_shifted_f32_avx2,
                           lanes_sqdev_f32_avx2, row_lse_f32_avx2,
                           pair_lanes<Avx2Doubles, float>,
                           pair_lanes<Avx2Doubles, double>};

}  // namespace

const KernelTable& avx2_kernels() { return kAvx2; }

}  // namespace cpu
}  // namespace mmmod

#pragma GCC pop_options
#endif
