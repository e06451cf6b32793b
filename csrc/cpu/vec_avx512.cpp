// The AVX-512 kernel table (cpu_kernels.h), selected at run time by cpu_kernels.cpp only when the
// CPU reports avx512f/bw/dq/vl + FMA and the OS saves the opmask and zmm state (XCR0), and
// MMMOD_CPU_KERNELS / MMMOD_CPU_SCALAR do not cap the ISA below it.
//
// It is the AVX2 table's algorithm on 512-bit registers, operation for operation, so its normals
// are bit-identical to the AVX2 table's (same FMAs, same roundings, same polynomial order; only
// the register width and the instructions that move data differ), and its statistics, scaling
// and modulation are bit-identical to both other tables:
// - Philox4x32-10 across lanes: one word of 8 counter groups per register, in the low halves of
//   the 64-bit lanes (_mm512_mul_epu32 gives the full 32x32->64 product); the two XORs of a round
//   are one three-input ternary-logic instruction; 4 registers (32 groups) in flight.
// - Box-Muller: Cephes logf and sinf/cosf exactly as vec_avx2.cpp, 16 pairs per register; the
//   quadrant select uses a mask register instead of blendv.
// - a partial batch runs on padded lanes and is stored with masked stores, so a normal never
//   depends on where a block, chunk or thread boundary falls, and nothing is written past
//   4 * ngroups floats.
// - Statistics and MMPareto's pair moments: the 16 float64 lanes of the portable table, as two
//   zmm registers per sum.
// - Score rows: the AVX2 table's routine (one row of C logits is not worth a second copy; the
//   scores are ~1 % of a step).
//
// The ISA is switched on for this translation unit alone with a target pragma: the equivalent of
// compiling it with -mavx512f -mavx512bw -mavx512dq -mavx512vl -mfma (setuptools' extensions take
// one flag set for all sources). Only <immintrin.h>, this project's constants and cpu/pair_lanes.h
// (included inside this file's anonymous namespace) are used here, so no inline function of a
// shared header is emitted with AVX-512 instructions (the file sorts
// after the baseline objects too, so the linker would keep their copies first anyway). The
// extension is compiled with -ffp-contract=off: only the explicit FMAs below fuse.
#include "cpu/cpu_kernels.h"

#include <type_traits>  // compile-time only: emits no code under the target pragma

#if defined(MMMOD_X86_SIMD_TABLES)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")
// GCC 12's AVX-512 headers spell "undefined register" as a self-initialised variable, which its
// -Wmaybe-uninitialized reports in every inlined cast and conversion (GCC bug 105593)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

namespace mmmod {
namespace cpu {
namespace {

#define MMMOD_INLINE inline __attribute__((always_inline))

// ---- Philox4x32-10 ---------------------------------------------------------------------------
constexpr int kHalves = 4;  // registers of 8 groups in flight: 32 groups per iteration
constexpr int kSets = kHalves / 2;  // batches of 16 groups (one register of uint32 words each)

// Ten rounds on kHalves x 8 groups. c[w][h]: word w of half h, in the low 32 bits of each 64-bit
// lane (upper halves: garbage that only _mm512_mul_epu32, which ignores it, and the final
// permutation, which drops it, ever see).
MMMOD_INLINE void philox_rounds(__m512i (&c)[4][kHalves], const __m512i* K0, const __m512i* K1,
                                __m512i r0_c0x, __m512i r0_c1, __m512i r0_c2x) {
  const __m512i m0 = _mm512_set1_epi64(kPhiloxM0);
  const __m512i m1 = _mm512_set1_epi64(kPhiloxM1);
  // round 0: words 2 and 3 (step, modality) are the same in every lane, so M1 * step and the
  // key are folded into constants by the caller
#pragma GCC unroll 4
  for (int h = 0; h < kHalves; ++h) {
    const __m512i p0 = _mm512_mul_epu32(c[0][h], m0);
    c[0][h] = _mm512_xor_si512(r0_c0x, c[1][h]);
    c[1][h] = r0_c1;
    c[2][h] = _mm512_xor_si512(_mm512_srli_epi64(p0, 32), r0_c2x);
    c[3][h] = p0;
  }
#pragma GCC unroll 9
  for (int r = 1; r < 10; ++r) {
#pragma GCC unroll 4
    for (int h = 0; h < kHalves; ++h) {
      const __m512i p0 = _mm512_mul_epu32(c[0][h], m0);
      const __m512i p1 = _mm512_mul_epu32(c[2][h], m1);
      // 0x96: a ^ b ^ c
      c[0][h] = _mm512_ternarylogic_epi32(_mm512_srli_epi64(p1, 32), c[1][h], K0[r], 0x96);
      c[1][h] = p1;
      c[2][h] = _mm512_ternarylogic_epi32(_mm512_srli_epi64(p0, 32), c[3][h], K1[r], 0x96);
      c[3][h] = p0;
    }
  }
}

// Sixteen uint32 words, lane j = group j, from the half with the even groups and the odd one:
// the low uint32 of every 64-bit lane of each, interleaved (one two-source permutation).
MMMOD_INLINE __m512i merge_halves(__m512i even, __m512i odd) {
  const __m512i idx = _mm512_set_epi32(30, 14, 28, 12, 26, 10, 24, 8, 22, 6, 20, 4, 18, 2, 16, 0);
  return _mm512_permutex2var_epi32(even, idx, odd);
}

// uint32_to_uniform of philox.h: s ^ (s >> 31) is s for s >= 0 and -s - 1 otherwise.
MMMOD_INLINE __m512 to_uniform(__m512i w) {
  const __m512i s = _mm512_xor_si512(w, _mm512_srai_epi32(w, 31));
  return _mm512_mul_ps(_mm512_cvtepi32_ps(s), _mm512_set1_ps(kUniformScale));
}

// ---- float32 log / sincos: vec_avx2.cpp's, N independent vectors interleaved -----------------
#define MMMOD_EACH(i) _Pragma("GCC unroll 8") for (int i = 0; i < N; ++i)

template <int N>
MMMOD_INLINE void log_ps(const __m512* x, __m512* out) {
  const __m512i off = _mm512_set1_epi32(0x3f3504f3);  // bits of float32(sqrt(1/2))
  __m512 e[N], m[N], z[N], p[N];
  MMMOD_EACH(i) {
    const __m512i d = _mm512_sub_epi32(_mm512_castps_si512(x[i]), off);
    e[i] = _mm512_cvtepi32_ps(_mm512_srai_epi32(d, 23));
    m[i] = _mm512_sub_ps(_mm512_castsi512_ps(_mm512_add_epi32(_mm512_and_si512(d, _mm512_set1_epi32(0x007fffff)), off)),
                         _mm512_set1_ps(1.0f));
  }
  MMMOD_EACH(i) z[i] = _mm512_mul_ps(m[i], m[i]);
  MMMOD_EACH(i) p[i] = _mm512_fmadd_ps(_mm512_set1_ps(7.0376836292E-2f), m[i], _mm512_set1_ps(-1.1514610310E-1f));
  MMMOD_EACH(i) p[i] = _mm512_fmadd_ps(p[i], m[i], _mm512_set1_ps(1.1676998740E-1f));
  MMMOD_EACH(i) p[i] = _mm512_fmadd_ps(p[i], m[i], _mm512_set1_ps(-1.2420140846E-1f));
  MMMOD_EACH(i) p[i] = _mm512_fmadd_ps(p[i], m[i], _mm512_set1_ps(1.4249322787E-1f));
  MMMOD_EACH(i) p[i] = _mm512_fmadd_ps(p[i], m[i], _mm512_set1_ps(-1.6668057665E-1f));
  MMMOD_EACH(i) p[i] = _mm512_fmadd_ps(p[i], m[i], _mm512_set1_ps(2.0000714765E-1f));
  MMMOD_EACH(i) p[i] = _mm512_fmadd_ps(p[i], m[i], _mm512_set1_ps(-2.4999993993E-1f));
  MMMOD_EACH(i) p[i] = _mm512_fmadd_ps(p[i], m[i], _mm512_set1_ps(3.3333331174E-1f));
  MMMOD_EACH(i) {
    __m512 y = _mm512_mul_ps(_mm512_mul_ps(p[i], m[i]), z[i]);
    y = _mm512_fmadd_ps(e[i], _mm512_set1_ps(-2.12194440e-4f), y);
    y = _mm512_fnmadd_ps(_mm512_set1_ps(0.5f), z[i], y);
    out[i] = _mm512_fmadd_ps(e[i], _mm512_set1_ps(0.693359375f), _mm512_add_ps(m[i], y));
  }
}

template <int N>
MMMOD_INLINE void sincos_ps(const __m512* th, __m512* s, __m512* c) {
  __m512 jf[N], y[N], z[N], sp[N], cp[N];
  MMMOD_EACH(i) {
    jf[i] = _mm512_roundscale_ps(_mm512_mul_ps(th[i], _mm512_set1_ps(0.636619772367581343f)),
                                 _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    y[i] = _mm512_fnmadd_ps(jf[i], _mm512_set1_ps(0x1.921fb6p+0f), th[i]);
  }
  MMMOD_EACH(i) y[i] = _mm512_fnmadd_ps(jf[i], _mm512_set1_ps(-0x1.777a5cp-25f), y[i]);
  MMMOD_EACH(i) y[i] = _mm512_fnmadd_ps(jf[i], _mm512_set1_ps(-0x1.ee59dap-50f), y[i]);
  MMMOD_EACH(i) z[i] = _mm512_mul_ps(y[i], y[i]);
  MMMOD_EACH(i) {
    sp[i] = _mm512_fmadd_ps(_mm512_set1_ps(-1.9515295891E-4f), z[i], _mm512_set1_ps(8.3321608736E-3f));
    cp[i] = _mm512_fmadd_ps(_mm512_set1_ps(2.443315711809948E-5f), z[i], _mm512_set1_ps(-1.388731625493765E-3f));
  }
  MMMOD_EACH(i) {
    sp[i] = _mm512_fmadd_ps(sp[i], z[i], _mm512_set1_ps(-1.6666654611E-1f));
    cp[i] = _mm512_fmadd_ps(cp[i], z[i], _mm512_set1_ps(4.166664568298827E-2f));
  }
  MMMOD_EACH(i) {
    const __m512 sy = _mm512_fmadd_ps(_mm512_mul_ps(y[i], z[i]), sp[i], y[i]);
    const __m512 cy = _mm512_fmadd_ps(_mm512_mul_ps(z[i], z[i]), cp[i],
                                      _mm512_fnmadd_ps(_mm512_set1_ps(0.5f), z[i], _mm512_set1_ps(1.0f)));
    const __m512i j = _mm512_cvtps_epi32(jf[i]);
    const __m512i one = _mm512_set1_epi32(1), two = _mm512_set1_epi32(2);
    const __mmask16 swap = _mm512_test_epi32_mask(j, one);  // odd quadrant: sin and cos swap
    const __m512 ss = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_and_si512(j, two), 30));
    const __m512 cs = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_and_si512(_mm512_add_epi32(j, one), two), 30));
    s[i] = _mm512_xor_ps(_mm512_mask_blend_ps(swap, sy, cy), ss);
    c[i] = _mm512_xor_ps(_mm512_mask_blend_ps(swap, cy, sy), cs);
  }
}

// box_muller of philox.h on N x 16 pairs of raw words: n0 = r cos th, n1 = r sin th.
template <int N>
MMMOD_INLINE void box_muller_words(const __m512i* wa, const __m512i* wb, __m512* n0, __m512* n1) {
  __m512 a[N], th[N], r[N], s[N], c[N];
  MMMOD_EACH(i) {
    a[i] = _mm512_max_ps(to_uniform(wa[i]), _mm512_set1_ps(kMinUniform));
    th[i] = _mm512_mul_ps(_mm512_set1_ps(kTwoPi), to_uniform(wb[i]));
  }
  log_ps<N>(a, r);
  MMMOD_EACH(i) r[i] = _mm512_sqrt_ps(_mm512_mul_ps(r[i], _mm512_set1_ps(-2.0f)));
  sincos_ps<N>(th, s, c);
  MMMOD_EACH(i) {
    n0[i] = _mm512_mul_ps(r[i], c[i]);
    n1[i] = _mm512_mul_ps(r[i], s[i]);
  }
}

// The 64 normals of 16 groups (lane j = group j of each of a0 .. a3) in stream order,
// out[4 j + w] = a_w[j], of which only the first `nfloats` are stored.
MMMOD_INLINE void store_transposed(__m512 a0, __m512 a1, __m512 a2, __m512 a3, float* z, int64_t nfloats) {
  // within each 128-bit lane L: g04 holds group 4L's four normals, g15 4L + 1, g26 4L + 2, g37 4L + 3
  const __m512 t0 = _mm512_unpacklo_ps(a0, a1), t1 = _mm512_unpackhi_ps(a0, a1);
  const __m512 t2 = _mm512_unpacklo_ps(a2, a3), t3 = _mm512_unpackhi_ps(a2, a3);
  const __m512 g04 = _mm512_shuffle_ps(t0, t2, 0x44), g15 = _mm512_shuffle_ps(t0, t2, 0xEE);
  const __m512 g26 = _mm512_shuffle_ps(t1, t3, 0x44), g37 = _mm512_shuffle_ps(t1, t3, 0xEE);
  // then a 4 x 4 transpose of 128-bit lanes: output register L = lane L of g04, g15, g26, g37
  const __m512 u01 = _mm512_shuffle_f32x4(g04, g15, 0x44), u23 = _mm512_shuffle_f32x4(g26, g37, 0x44);
  const __m512 v01 = _mm512_shuffle_f32x4(g04, g15, 0xEE), v23 = _mm512_shuffle_f32x4(g26, g37, 0xEE);
  const __m512 o[4] = {_mm512_shuffle_f32x4(u01, u23, 0x88), _mm512_shuffle_f32x4(u01, u23, 0xDD),
                       _mm512_shuffle_f32x4(v01, v23, 0x88), _mm512_shuffle_f32x4(v01, v23, 0xDD)};
  if (nfloats >= 64) {
    for (int v = 0; v < 4; ++v) _mm512_storeu_ps(z + 16 * v, o[v]);
    return;
  }
  for (int v = 0; v < 4 && 16 * v < nfloats; ++v) {
    const int64_t left = nfloats - 16 * v;
    const __mmask16 m = left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1u);
    _mm512_mask_storeu_ps(z + 16 * v, m, o[v]);
  }
}

void normals_avx512(uint64_t seed, uint32_t step, uint32_t modality, uint64_t q0, int64_t ngroups,
                    float* z) {
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  __m512i K0[10], K1[10];
  for (int r = 0; r < 10; ++r) {
    K0[r] = _mm512_set1_epi32(static_cast<int>(k0 + static_cast<uint32_t>(r) * kPhiloxW0));
    K1[r] = _mm512_set1_epi32(static_cast<int>(k1 + static_cast<uint32_t>(r) * kPhiloxW1));
  }
  const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * step;
  const __m512i r0_c0x = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(p1 >> 32) ^ k0));
  const __m512i r0_c1 = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(p1)));
  const __m512i r0_c2x = _mm512_set1_epi32(static_cast<int>(modality ^ k1));
  // half 2p holds groups q + 16p + {0, 2, .., 14}, half 2p + 1 groups q + 16p + {1, 3, .., 15}
  const __m512i lane = _mm512_set_epi64(14, 12, 10, 8, 6, 4, 2, 0);
  for (int64_t g = 0; g < ngroups; g += 16 * kSets) {
    const __m512i base = _mm512_add_epi64(_mm512_set1_epi64(static_cast<int64_t>(q0 + static_cast<uint64_t>(g))), lane);
    __m512i c[4][kHalves];
    for (int h = 0; h < kHalves; ++h) {
      // 64-bit add: the low word carries into the high one
      const __m512i q = _mm512_add_epi64(base, _mm512_set1_epi64(16 * (h / 2) + (h % 2)));
      c[0][h] = q;
      c[1][h] = _mm512_srli_epi64(q, 32);
    }
    philox_rounds(c, K0, K1, r0_c0x, r0_c1, r0_c2x);
    // pairs (word 0, word 1) and (word 2, word 3) of every set, Box-Muller side by side
    __m512i wa[2 * kSets], wb[2 * kSets];
    __m512 n0[2 * kSets], n1[2 * kSets];
    for (int p = 0; p < kSets; ++p) {
      wa[2 * p] = merge_halves(c[0][2 * p], c[0][2 * p + 1]);
      wb[2 * p] = merge_halves(c[1][2 * p], c[1][2 * p + 1]);
      wa[2 * p + 1] = merge_halves(c[2][2 * p], c[2][2 * p + 1]);
      wb[2 * p + 1] = merge_halves(c[3][2 * p], c[3][2 * p + 1]);
    }
    box_muller_words<2 * kSets>(wa, wb, n0, n1);
    for (int p = 0; p < kSets; ++p) {
      const int64_t first = g + 16 * p;  // group of lane 0 of this set
      if (first >= ngroups) break;       // padded lanes past the last group are never stored
      store_transposed(n0[2 * p], n1[2 * p], n0[2 * p + 1], n1[2 * p + 1], z + 4 * first,
                       4 * (ngroups - first));
    }
  }
}

// ---- modulation and scaling (the reference's separately rounded products, as the scalar table) --
void modulate_f32_avx512(float* x, const float* z, int64_t n, float k, float sigma) {
  const __m512 kv = _mm512_set1_ps(k), sv = _mm512_set1_ps(sigma);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 v = _mm512_loadu_ps(x + i);
    _mm512_storeu_ps(x + i, _mm512_add_ps(_mm512_mul_ps(v, kv), _mm512_mul_ps(sv, _mm512_loadu_ps(z + i))));
  }
  if (i < n) {
    const __mmask16 m = static_cast<__mmask16>((1u << (n - i)) - 1u);
    const __m512 v = _mm512_maskz_loadu_ps(m, x + i);
    _mm512_mask_storeu_ps(x + i, m, _mm512_add_ps(_mm512_mul_ps(v, kv), _mm512_mul_ps(sv, _mm512_maskz_loadu_ps(m, z + i))));
  }
}

void scale_f32_avx512(float* x, int64_t n, float k) {
  const __m512 kv = _mm512_set1_ps(k);
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {
    const __m512 v0 = _mm512_loadu_ps(x + i), v1 = _mm512_loadu_ps(x + i + 16);
    const __m512 v2 = _mm512_loadu_ps(x + i + 32), v3 = _mm512_loadu_ps(x + i + 48);
    _mm512_storeu_ps(x + i, _mm512_mul_ps(v0, kv));
    _mm512_storeu_ps(x + i + 16, _mm512_mul_ps(v1, kv));
    _mm512_storeu_ps(x + i + 32, _mm512_mul_ps(v2, kv));
    _mm512_storeu_ps(x + i + 48, _mm512_mul_ps(v3, kv));
  }
  for (; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (n - i)) - 1u);
    _mm512_mask_storeu_ps(x + i, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + i), kv));
  }
}

// ---- statistics: lanes 0-7 in one register, 8-15 in the other --------------------------------
void lanes_shifted_f32_avx512(const float* x, int64_t n, double c, double* s1, double* s2) {
  const __m512d cv = _mm512_set1_pd(c);
  __m512d a0 = _mm512_loadu_pd(s1), a1 = _mm512_loadu_pd(s1 + 8);
  __m512d q0 = _mm512_loadu_pd(s2), q1 = _mm512_loadu_pd(s2 + 8);
  for (int64_t i = 0; i < n; i += 16) {
    // the chunks' reads are short runs interleaved with the noise arithmetic, which the hardware
    // prefetchers follow late: ask for the line 4 KiB ahead (measured: ~5 % off the OGM-GE pass)
    _mm_prefetch(reinterpret_cast<const char*>(x + i) + kStatsPrefetchBytes, _MM_HINT_T0);
    const __m512 v = _mm512_loadu_ps(x + i);
    const __m512d d0 = _mm512_sub_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(v)), cv);
    const __m512d d1 = _mm512_sub_pd(
        _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1))), cv);
    a0 = _mm512_add_pd(a0, d0);
    a1 = _mm512_add_pd(a1, d1);
    // separately rounded square and sum, as the other tables (no FMA here)
    q0 = _mm512_add_pd(q0, _mm512_mul_pd(d0, d0));
    q1 = _mm512_add_pd(q1, _mm512_mul_pd(d1, d1));
  }
  _mm512_storeu_pd(s1, a0);
  _mm512_storeu_pd(s1 + 8, a1);
  _mm512_storeu_pd(s2, q0);
  _mm512_storeu_pd(s2 + 8, q1);
}

void lanes_sqdev_f32_avx512(const float* x, int64_t n, double mean, double* lanes) {
  const __m512d mv = _mm512_set1_pd(mean);
  __m512d a0 = _mm512_loadu_pd(lanes), a1 = _mm512_loadu_pd(lanes + 8);
  for (int64_t i = 0; i < n; i += 16) {
    const __m512 v = _mm512_loadu_ps(x + i);
    const __m512d d0 = _mm512_sub_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(v)), mv);
    const __m512d d1 = _mm512_sub_pd(
        _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1))), mv);
    // separately rounded square and sum, as the other tables (no FMA here)
    a0 = _mm512_add_pd(a0, _mm512_mul_pd(d0, d0));
    a1 = _mm512_add_pd(a1, _mm512_mul_pd(d1, d1));
  }
  _mm512_storeu_pd(lanes, a0);
  _mm512_storeu_pd(lanes + 8, a1);
}

// ---- MMPareto's pair moments: pair_lanes.h over 8 doubles per register ----------------------
struct Avx512Doubles {
  using Reg = __m512d;
  static constexpr int kWidth = 8;
  static Reg set1(double x) { return _mm512_set1_pd(x); }
  static Reg loadu(const double* p) { return _mm512_loadu_pd(p); }
  static void storeu(double* p, Reg v) { _mm512_storeu_pd(p, v); }
  static Reg widen(const float* p) { return _mm512_cvtps_pd(_mm256_loadu_ps(p)); }
  static Reg mul(Reg a, Reg b) { return _mm512_mul_pd(a, b); }
  static Reg sub(Reg a, Reg b) { return _mm512_sub_pd(a, b); }
  static Reg fmadd(Reg a, Reg b, Reg c) { return _mm512_fmadd_pd(a, b, c); }
};
#include "cpu/pair_lanes.h"

}  // namespace

const KernelTable& avx512_kernels() {
  static const KernelTable table = {"avx512", normals_avx512, modulate_f32_avx512, scale_f32_avx512,
                                    lanes_shifted_f32_avx512, lanes_sqdev_f32_avx512,
                                    avx2_kernels().row_lse_f32,
                                    pair_lanes<Avx512Doubles, float>,
                                    pair_lanes<Avx512Doubles, double>};
  return table;
}

}  // namespace cpu
}  // namespace mmmod

#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif
