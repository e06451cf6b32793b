// Metadata checks of MMPareto's combine ops (declared in combine_api.h).
#include <ATen/ATen.h>

#include "common/combine_api.h"

namespace mmmod {

void check_pair_inputs(const char* op, at::TensorList fused, at::TensorList summed,
                       const std::optional<at::Tensor>& fused_scale) {
  TORCH_CHECK_VALUE(fused.size() == summed.size(), op, ": ", fused.size(),
                    " fused gradients for ", summed.size(), " summed ones");
  for (size_t i = 0; i < summed.size(); ++i) {
    const auto &a = fused[i], &s = summed[i];
    TORCH_CHECK_VALUE(a.sizes() == s.sizes(), op, ": tensor ", i, ": fused gradient ", a.sizes(),
                      " vs summed gradient ", s.sizes());
    const auto dt = s.scalar_type();
    TORCH_CHECK_TYPE(a.scalar_type() == dt && (dt == at::kFloat || dt == at::kHalf ||
                                               dt == at::kBFloat16 || dt == at::kDouble),
                     op, ": tensor ", i, ": fused gradient ", a.scalar_type(),
                     ", summed gradient ", dt,
                     "; expected one dtype among float32, float16, bfloat16, float64");
    TORCH_CHECK_VALUE(a.device() == summed[0].device() && s.device() == summed[0].device(), op,
                      ": tensor ", i, ": fused gradient on ", a.device(), ", summed gradient on ",
                      s.device(), "; expected one device (", summed[0].device(), ")");
  }
  if (fused_scale.has_value()) {
    TORCH_CHECK_TYPE(fused_scale->numel() == 1 && fused_scale->scalar_type() == at::kDouble, op,
                     ": fused_scale must be a one-element float64 tensor, got ",
                     fused_scale->scalar_type(), " ", fused_scale->sizes());
    TORCH_CHECK_VALUE(summed.empty() || fused_scale->device() == summed[0].device(), op,
                      ": fused_scale is on ", fused_scale->device(), ", the gradients on ",
                      summed[0].device());
  }
}

void check_combine_moments(const char* op, at::TensorList summed, const at::Tensor& moments) {
  const int64_t n = static_cast<int64_t>(summed.size());
  TORCH_CHECK_TYPE(moments.scalar_type() == at::kDouble, op, ": moments must be float64, got ",
                   moments.scalar_type());
  TORCH_CHECK_VALUE(moments.dim() == 2 && moments.size(0) == n && moments.size(1) == 3, op,
                    ": moments must have shape [", n,
                    ", 3] (one (|a|^2, |b|^2, a.b) row per tensor), got ", moments.sizes());
  TORCH_CHECK_VALUE(n == 0 || moments.device() == summed[0].device(), op, ": moments are on ",
                    moments.device(), ", the gradients on ", summed[0].device());
}

void check_combine_groups(const char* op, at::TensorList summed, at::IntArrayRef groups) {
  int64_t total = 0;
  bool positive = !groups.empty();
  for (const int64_t g : groups) {
    positive = positive && g >= 1;
    total += g;
  }
  TORCH_CHECK_VALUE(positive, op,
                    ": groups must list each modality's number of tensors (each at least 1), got ",
                    groups);
  TORCH_CHECK_VALUE(total == static_cast<int64_t>(summed.size()), op, ": groups ", groups,
                    " add up to ", total, " tensors, the gradients are ", summed.size());
}

}  // namespace mmmod
