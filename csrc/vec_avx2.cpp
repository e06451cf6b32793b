// Box-Muller with at::vec compiled for AVX2 + FMA (Sleef log/sin/cos exported by libtorch_cpu),
// selected at run time by cpu_kernels.cpp only when the CPU supports AVX2 and FMA.
//
// The ISA is switched on for this translation unit alone with a target pragma (setuptools has no
// per-file flags); at::vec's inline namespace is CPU_CAPABILITY=AVX2 so its symbols cannot clash
// with the default build's. its name sorts last among the objects so the linker keeps the baseline copy
// of any shared inline function, and compiles everything with -ffp-contract=off so the
// reference's separately rounded products are kept even though FMA is enabled here.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(MMMOD_HAVE_AVX2_TU)
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

#include "box_muller_vec.h"
#include "cpu_kernels.h"

namespace mmmod {
namespace cpu {

void box_muller_batch_avx2(const float* ua, const float* ub, float* c, float* s, int64_t n) {
  box_muller_batch_vec(ua, ub, c, s, n);
}

}  // namespace cpu
}  // namespace mmmod

#pragma GCC pop_options
#endif
