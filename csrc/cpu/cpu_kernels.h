// CPU kernels shared by the default (portable scalar), the AVX2 and the AVX-512 translation units.
//
// cpu_kernels.cpp owns the ops and the threading (the chunking is chunks.h's); the per-chunk work
// goes through a KernelTable: the portable one (scalar Philox, libm Box-Muller, compiled for the
// baseline ISA), the AVX2 + FMA one from vec_avx2.cpp or the AVX-512 one from vec_avx512.cpp,
// picked at run time (isa.cpp) from cpuid (CPU features) and xgetbv (the OS saves the ymm / zmm
// and opmask state).
// The environment (read on every op call) caps the choice: MMMOD_CPU_KERNELS=scalar|avx2|avx512
// uses at most that table (the best one the CPU has at or below it; auto or unset: the best),
// MMMOD_CPU_SCALAR=1 forces the portable table whatever MMMOD_CPU_KERNELS says.
//
// Contracts every table meets, so chunking and threading never change a bit:
// - normals(): the value of a counter group depends only on (seed, step, modality, q), never on
//   where a block starts or ends (the AVX2 table computes partial blocks with the same vector
//   code on padded lanes);
// - lanes_shifted_f32() / lanes_sqdev_f32(): the statistics passes accumulate element i of a chunk
//   into float64 lane i % 16 in element order (then a fixed tree, moment_lanes_sum), identically
//   in every table, so the statistics are bit-identical too, however a chunk's pass is sliced;
// - pair_lanes_f32() / pair_lanes_f64(): MMPareto's moments, element i into float64 lane i % 16
//   in element order, each product added with one fused multiply-add (std::fma in the portable
//   table: the same single rounding), so every table gives the same bits;
// - modulate_f32(): x <- float32(x k) + float32(sigma z), products rounded separately (no FMA),
//   bit-identical to the reference for the same z; scale_f32(): x <- float32(x k), likewise;
// - the AVX-512 normals are bit-identical to the AVX2 ones (same operations, wider registers);
//   both are within a few ulp of the scalar table's libm-based ones.
#pragma once

#include <stdint.h>

#include "common/philox.h"

namespace mmmod {
namespace cpu {

// Counter groups per noise block (4 normals each): 2 KiB of normals, L1-resident. A multiple of
// the AVX2 batch of 8 groups and of the AVX-512 one of 32.
constexpr int64_t kBlockGroups = 128;
// Extra room a normals() output buffer needs past 4 * ngroups floats (the AVX2 table pads to 8
// groups; the AVX-512 one stores partial batches with masks).
constexpr int64_t kNormalsPad = 32;
// float64 accumulator lanes of the statistics pass.
constexpr int kMomentLanes = 16;
// How far ahead of the reads the statistics and noise passes prefetch (bytes).
constexpr int64_t kStatsPrefetchBytes = 4096;

// x86-64 GCC builds compile the AVX2 and AVX-512 tables (each TU switches its ISA on with a target
// pragma); other builds have the portable table only.
#if defined(MMMOD_HAVE_AVX2_TU) && defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define MMMOD_X86_SIMD_TABLES 1
#endif

struct KernelTable {
  const char* name;
  // The 4 * ngroups normals of counter groups q0 .. q0 + ngroups - 1 in stream order; z must
  // have room for 4 * ngroups + kNormalsPad floats.
  void (*normals)(uint64_t seed, uint32_t step, uint32_t modality, uint64_t q0, int64_t ngroups,
                  float* z);
  // x[i] <- x[i] k + sigma z[i] (float32, separately rounded products).
  void (*modulate_f32)(float* x, const float* z, int64_t n, float k, float sigma);
  // x[i] <- x[i] k (float32).
  void (*scale_f32)(float* x, int64_t n, float k);
  // d = float64(x[i]) - c; s1[j] += d, s2[j] += d * d (separately rounded) for i = j mod 16, in
  // order; n a multiple of 16.
  void (*lanes_shifted_f32)(const float* x, int64_t n, double c, double* s1, double* s2);
  // lanes[j] += (float64(x[i]) - mean)^2 for i = j mod 16, in order; n a multiple of 16.
  void (*lanes_sqdev_f32)(const float* x, int64_t n, double mean, double* lanes);
  // logsumexp of one row as torch defines it (an infinite max is not subtracted), exp terms
  // summed in float64; NaN if the row holds a NaN. C > 0.
  double (*row_lse_f32)(const float* row, int64_t C);
  // MMPareto's pair moments: a = float64(f[i]) * scale (no multiplication when scale == 1: the
  // same bits), b = float64(s[i]) - a; aa[j] = fma(a, a, aa[j]), bb[j] = fma(b, b, bb[j]),
  // ab[j] = fma(a, b, ab[j]) for i = j mod 16, in order; n a multiple of 16.
  void (*pair_lanes_f32)(const float* f, const float* s, int64_t n, double scale, double* aa,
                         double* bb, double* ab);
  void (*pair_lanes_f64)(const double* f, const double* s, int64_t n, double scale, double* aa,
                         double* bb, double* ab);
};

const KernelTable& scalar_kernels();
#if defined(MMMOD_X86_SIMD_TABLES)
const KernelTable& avx2_kernels();
const KernelTable& avx512_kernels();
#endif

// The table the ops use now: the best one the CPU supports within the cap of MMMOD_CPU_KERNELS /
// MMMOD_CPU_SCALAR. Never throws: an unrecognised MMMOD_CPU_KERNELS value counts as unset here
// (for reporting); the ops call kernels_for_op(), which rejects it.
const KernelTable& active_kernels();
// active_kernels(), but an unrecognised MMMOD_CPU_KERNELS value raises a ValueError naming it
// (isa.cpp, with the capability checks below).
const KernelTable& kernels_from_env();
// kernels_from_env(), and a malformed MMMOD_CPU_WINDOW raises too (cpu_kernels.cpp): what every
// op calls at its entry, before anything is written.
const KernelTable& kernels_for_op();
// Whether the AVX2 table is compiled in and the CPU (and OS) support it (independent of the env).
bool avx2_supported();
// Whether the AVX-512 table is compiled in and the CPU has avx512f/bw/dq/vl + FMA with the zmm
// and opmask state enabled by the OS (independent of the env).
bool avx512_supported();

// A gradient element as the float64 sums read it: float16, bfloat16 and float32 through float32
// (exact), float64 as it is (the references' g.double()).
template <typename T>
inline double float64_of(T v) {
  return static_cast<double>(static_cast<float>(v));
}
template <>
inline double float64_of<double>(double v) {
  return v;
}

// Fixed combination of the 16 lanes of the statistics pass (shared by both tables).
static inline double moment_lanes_sum(const double* a) {
  double s8[8], s4[4];
  for (int j = 0; j < 8; ++j) s8[j] = a[j] + a[j + 8];
  for (int j = 0; j < 4; ++j) s4[j] = s8[j] + s8[j + 4];
  return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

}  // namespace cpu
}  // namespace mmmod
