// Coefficient rules of docs/semantics.md section 3 on M float32 scores, shared by the CPU and CUDA ops.
// Every operation is the float32 operation of mmmod/reference/coefficients.py in the same order
// (built without FMA contraction), so decisions such as the M = 2 tie rule are identical.
#pragma once

#include <stdint.h>

#include "common/native_rules.h"
#include "common/philox.h"

namespace mmmod {

MMMOD_HD float quiet_nanf() {
#if defined(__CUDA_ARCH__)
  return __int_as_float(0x7fc00000);
#else
  return std::nanf("");
#endif
}

MMMOD_HD float coef_tanhf(float x) {
#if defined(__CUDA_ARCH__)
  return tanhf(x);
#else
  return std::tanh(x);
#endif
}

// mean_{j != m} s_j, summing the others in index order, divided by M - 1 (float32).
MMMOD_HD float others_mean(const float* s, int64_t M, int64_t m) {
  float acc = 0.0f;
  bool first = true;
  for (int64_t j = 0; j < M; ++j) {
    if (j == m) continue;
    acc = first ? s[j] : acc + s[j];
    first = false;
  }
  return acc / static_cast<float>(M - 1);
}

// The rules are split around tanh so a backend can evaluate tanh with the exact implementation
// the reference uses on that device (the CPU op calls at::tanh, the CUDA kernel tanhf, as torch
// does): phase 1 gives the tanh arguments, phase 2 the coefficients from s and tanh(args).
MMMOD_HD void coefficient_tanh_args(const float* s, float* x, int64_t M, int rule, float alpha) {
  for (int64_t m = 0; m < M; ++m) x[m] = 0.0f;
  if (rule == kRuleOgm) {
    if (M == 2) {
      const float rho1 = s[1] / s[0];
      const float rho0 = 1.0f / rho1;
      x[0] = alpha * rho0;
      x[1] = alpha * rho1;
      return;
    }
    for (int64_t m = 0; m < M; ++m) x[m] = alpha * (s[m] / others_mean(s, M, m));
  } else if (rule == kRuleMlb) {
    for (int64_t m = 0; m < M; ++m) x[m] = alpha * (others_mean(s, M, m) / s[m] - 1.0f);
  }
}

MMMOD_HD void coefficient_finish(const float* s, const float* t, float* k, int64_t M, int rule,
                                 float beta_max) {
  bool any_nan = false;
  for (int64_t m = 0; m < M; ++m) any_nan = any_nan || (s[m] != s[m]);
  if (rule == kRuleNone) {
    for (int64_t m = 0; m < M; ++m) k[m] = 1.0f;
    return;
  }
  if (any_nan) {  // a NaN score surfaces as NaN everywhere, never as 1
    const float nan = quiet_nanf();
    for (int64_t m = 0; m < M; ++m) k[m] = nan;
    return;
  }
  if (rule == kRuleOgm) {
    if (M == 2) {  // the official rule: rho_1 > 1 damps modality 1, else (ties too) modality 0
      const float rho1 = s[1] / s[0];
      k[0] = rho1 > 1.0f ? 1.0f : 1.0f - t[0];
      k[1] = rho1 > 1.0f ? 1.0f - t[1] : 1.0f;
      return;
    }
    for (int64_t m = 0; m < M; ++m) {
      const float rho = s[m] / others_mean(s, M, m);
      k[m] = rho > 1.0f ? 1.0f - t[m] : 1.0f;
    }
    return;
  }
  for (int64_t m = 0; m < M; ++m) {  // MLB
    const float r = others_mean(s, M, m) / s[m];
    const float beta = r > 1.0f ? beta_max : 2.0f;
    k[m] = 1.0f + (beta - 1.0f) * t[m];
  }
}

#if defined(__CUDACC__)
// Both phases with tanhf in between (device code; M <= 64 per call of the CUDA op).
__device__ __forceinline__ void compute_coefficients(const float* s, float* k, int64_t M,
                                                     int rule, float alpha, float beta_max) {
  float x[64];
  coefficient_tanh_args(s, x, M, rule, alpha);
  for (int64_t m = 0; m < M; ++m) x[m] = coef_tanhf(x[m]);
  coefficient_finish(s, x, k, M, rule, beta_max);
}
#endif

}  // namespace mmmod
