// The coefficient rules with a fused kernel, by code: the C++ and CUDA mirror of the one list,
// mmmod/reference/native_rules.py (class NativeRule). The codes are the `rule` argument of the
// coefficients op (mmmod/_ops/__init__.py) and of the CUDA launcher mmmod_cuda_coefficients.
// Change both together: mmmod._C.native_rules() exports the table below and
// tests/test_native_rules.py compares it with the Python enum (the kernels' refusal of an unknown
// code lists the codes as rule_of() does). Plain C++: included by .cu files too.
#pragma once

namespace mmmod {

enum NativeRule : int {
  kRuleNone = 0,  // k = 1 (NativeRule.NONE)
  kRuleOgm = 1,   // OGM / OGM-GE (NativeRule.OGM)
  kRuleMlb = 2,   // MLB (NativeRule.MLB)
};

constexpr int kNativeRuleCount = 3;

// NativeRule.label of every code, in code order.
constexpr const char* kNativeRuleLabels[kNativeRuleCount] = {"none", "ogm", "mlb"};

static_assert(kRuleNone == 0 && kRuleOgm == 1 && kRuleMlb == 2 && kRuleMlb + 1 == kNativeRuleCount,
              "the codes are mmmod.reference.native_rules.NativeRule's: 0 none, 1 ogm, 2 mlb");

}  // namespace mmmod
