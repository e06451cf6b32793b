// CPU building blocks shared by the default and the AVX2 translation units.
#pragma once

#include <stdint.h>

namespace mmmod {
namespace cpu {

// Normals of the 2 * n uniform pairs (ua[i], ub[i]): c[i] = r cos th, s[i] = r sin th.
using BoxMullerFn = void (*)(const float* ua, const float* ub, float* c, float* s, int64_t n);

void box_muller_batch_default(const float* ua, const float* ub, float* c, float* s, int64_t n);
#if defined(MMMOD_HAVE_AVX2_TU)
void box_muller_batch_avx2(const float* ua, const float* ub, float* c, float* s, int64_t n);
#endif

}  // namespace cpu
}  // namespace mmmod
