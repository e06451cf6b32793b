// Box-Muller over arrays with at::vec (included by each CPU-capability translation unit).
// Rounding steps are those of the reference: th = 2pi * u_b, r = sqrt(log(max(u_a, 1e-7)) * -2),
// (r cos th, r sin th); only the log/sqrt/sin/cos implementations differ between ISAs.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include "philox.h"

namespace mmmod {
namespace cpu {
namespace {  // internal linkage: each CPU-capability translation unit keeps its own copy

inline void box_muller_batch_vec(const float* ua, const float* ub, float* c, float* s, int64_t n) {
  using V = at::vec::Vectorized<float>;
  int64_t i = 0;
  for (; i + V::size() <= n; i += V::size()) {
    const V a = at::vec::maximum(V::loadu(ua + i), V(kMinUniform));
    const V th = V(kTwoPi) * V::loadu(ub + i);
    const V r = (a.log() * V(-2.0f)).sqrt();
    (r * th.cos()).store(c + i);
    (r * th.sin()).store(s + i);
  }
  for (; i < n; ++i) box_muller(ua[i], ub[i], c + i, s + i);
}

}  // namespace
}  // namespace cpu
}  // namespace mmmod
