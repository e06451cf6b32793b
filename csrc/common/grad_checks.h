// The gradient checks of mmmod.functional.check_grads, in C++ (csrc/common/checks.cpp), bound as
// mmmod._C.check_grads (csrc/module.cpp). Python's check_grads stays the definition: this fast
// path only answers "all clear", "these byte ranges overlap" or "run the full check", so every
// refusal is raised by the Python code with its exact message.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <utility>
#include <vector>

namespace mmmod {

// One gradient given to check_grads_fast: where it sits in grads (modality m, index i) and the
// tensor, borrowed from the caller for the duration of the call.
struct GradRef {
  int64_t m, i;
  const at::Tensor* tensor;
};

// What check_grads_fast found. `needs_full_check` >= 0: the index (into refs) of the first
// gradient that fails, or may fail, a per-tensor check; `overlapping` is then empty and the
// caller runs the full Python check, which raises the exact error. Otherwise every gradient
// passed, and `overlapping` lists the pairs of indices whose byte ranges overlap on one device,
// in the order mmmod.functional.check_no_overlap's sweep meets them: each pair may still be
// disjoint blocks of one buffer, which the caller decides (a pair is never accepted here).
struct GradCheckResult {
  int64_t needs_full_check = -1;
  std::vector<std::pair<int64_t, int64_t>> overlapping;
};

// mmmod.functional.self_overlaps: whether two elements of `t` may share memory (metadata rule).
bool self_overlaps(const at::Tensor& t);

// mmmod.functional.check_grads on tensors (entries that are not plain tensors are the caller's
// to send to the full check): layout, dtype, inference tensors (unless `inference_mode`),
// self-overlap, then the sorted sweep over byte ranges per device. Metadata only.
GradCheckResult check_grads_fast(const std::vector<GradRef>& refs, bool inference_mode);

}  // namespace mmmod
