// Input checks shared by the CPU (mmmod._C) and CUDA (mmmod._C_cuda) implementations.
#include <ATen/ATen.h>
#include <c10/util/SmallVector.h>

#include <algorithm>
#include <cstdint>
#include <exception>
#include <string>

#include "common/grad_checks.h"
#include "common/native_rules.h"
#include "common/ops.h"

namespace mmmod {

int checked_rule(int64_t rule) {
  if (rule >= 0 && rule < kNativeRuleCount) return static_cast<int>(rule);
  // the wording of mmmod.reference.native_rules.rule_of, codes listed from the one table
  std::string codes;
  for (int r = 0; r < kNativeRuleCount; ++r) {
    codes += (r > 0 ? ", " : "") + std::to_string(r) + " (" + kNativeRuleLabels[r] + ")";
  }
  TORCH_CHECK_VALUE(false, "mmmod.coefficients: unknown native rule code ", rule,
                    "; expected one of ", codes);
}

void check_scores_inputs(at::TensorList logits, const at::Tensor& labels) {
  TORCH_CHECK_VALUE(labels.dim() == 1, "mmmod.scores: labels must be 1-D, got ", labels.sizes());
  TORCH_CHECK_TYPE(!at::isFloatingType(labels.scalar_type()) &&
                       !at::isComplexType(labels.scalar_type()) &&
                       labels.scalar_type() != at::kBool,
                   "mmmod.scores: labels must be integers, got ", labels.scalar_type());
  for (size_t m = 0; m < logits.size(); ++m) {
    const auto& z = logits[m];
    TORCH_CHECK_VALUE(z.dim() == 2, "mmmod.scores: logits ", m, " must be 2-D [B, C], got ",
                      z.sizes());
    TORCH_CHECK_VALUE(z.size(0) == labels.size(0), "mmmod.scores: logits ", m,
                      " have batch size ", z.size(0), " but labels have ", labels.size(0));
    TORCH_CHECK_TYPE(at::isFloatingType(z.scalar_type()), "mmmod.scores: logits ", m,
                     " must be floating point, got ", z.scalar_type());
    TORCH_CHECK_VALUE(z.device() == labels.device(), "mmmod.scores: logits ", m, " are on ",
                      z.device(), " but labels are on ", labels.device());
  }
}

void check_bucket(at::TensorList tensors, at::IntArrayRef offsets, const at::Tensor& k,
                  const at::Tensor& gate) {
  TORCH_CHECK_VALUE(tensors.size() == offsets.size(), "mmmod.modulate_: ", tensors.size(),
                    " tensors but ", offsets.size(), " offsets");
  TORCH_CHECK_VALUE(k.numel() == 1 && k.scalar_type() == at::kFloat,
                    "mmmod.modulate_: k must be a one-element float32 tensor");
  TORCH_CHECK_VALUE(gate.numel() == 1 && gate.scalar_type() == at::kFloat,
                    "mmmod.modulate_: gate must be a one-element float32 tensor");
  if (tensors.empty()) return;
  const auto device = tensors[0].device();
  const auto dtype = tensors[0].scalar_type();
  TORCH_CHECK_VALUE(k.device() == device && gate.device() == device,
                    "mmmod.modulate_: k and gate must be on the tensors' device ", device);
  for (size_t i = 0; i < tensors.size(); ++i) {
    const auto& t = tensors[i];
    TORCH_CHECK_VALUE(t.device() == device && t.scalar_type() == dtype,
                      "mmmod.modulate_: a bucket holds one device and dtype; tensor ", i, " is ",
                      t.scalar_type(), " on ", t.device(), ", tensor 0 is ", dtype, " on ", device);
    TORCH_CHECK_VALUE(t.is_contiguous(), "mmmod.modulate_: tensor ", i, " is not contiguous");
    TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), "mmmod.modulate_: tensor ", i,
                     " has dtype ", t.scalar_type(), "; expected floating point");
    TORCH_CHECK_VALUE(offsets[i] >= 0, "mmmod.modulate_: negative stream offset ", offsets[i]);
  }
}

void check_step_tensor(const at::Tensor& step, const at::Device& device) {
  TORCH_CHECK_VALUE(step.dim() == 0, "mmmod.modulate_: step_tensor must be a 0-d tensor, got shape ",
                    step.sizes());
  TORCH_CHECK_TYPE(at::isIntegralType(step.scalar_type(), /*includeBool=*/false),
                   "mmmod.modulate_: step_tensor must hold an integer, got ", step.scalar_type());
  TORCH_CHECK_VALUE(step.device() == device, "mmmod.modulate_: step_tensor is on ", step.device(),
                    " but the bucket is on ", device);
}

// mmmod::modulate_sigma_ (csrc/cpu/cpu_kernels.cpp, csrc/cuda/cuda_ops.cpp); mirrored by
// mmmod.reference.check_sigma
void check_sigma(at::TensorList tensors, const at::Tensor& sigma) {
  TORCH_CHECK_TYPE(sigma.scalar_type() == at::kFloat,
                   "mmmod.modulate_sigma_: sigma must be float32 (one noise scale per tensor), got ",
                   sigma.scalar_type());
  TORCH_CHECK_VALUE(sigma.dim() == 1 && sigma.size(0) == static_cast<int64_t>(tensors.size()),
                    "mmmod.modulate_sigma_: sigma must have shape [", tensors.size(),
                    "] (one per tensor), got ", sigma.sizes());
  TORCH_CHECK_VALUE(tensors.empty() || sigma.device() == tensors[0].device(),
                    "mmmod.modulate_sigma_: sigma is on ", sigma.device(), " but the tensors are on ",
                    tensors[0].device());
}

// mmmod::_bucket_moments (csrc/cpu/cpu_kernels.cpp, csrc/cuda/cuda_ops.cpp)
void check_moments_inputs(at::TensorList tensors) {
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::ScalarType st = tensors[i].scalar_type();
    TORCH_CHECK_TYPE(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || st == at::kDouble,
                     "mmmod._bucket_moments: tensor ", i, " is ", st,
                     "; expected float32, float16, bfloat16 or float64");
    TORCH_CHECK_VALUE(st == tensors[0].scalar_type() && tensors[i].device() == tensors[0].device(),
                      "mmmod._bucket_moments: a bucket holds one dtype and device; tensor ", i,
                      " is ", st, " on ", tensors[i].device(), ", tensor 0 is ",
                      tensors[0].scalar_type(), " on ", tensors[0].device());
  }
}

// mmmod::fused_sgd_ / fused_adam_ (csrc/cpu/fused_update_cpu.cpp, csrc/cuda/fused_update_cuda.cpp)
namespace {

// xs[i] must be a contiguous tensor like params[i] (device, dtype, shape)
void check_fused_like(const char* op, const char* what, at::TensorList params, at::TensorList xs) {
  TORCH_CHECK_VALUE(xs.size() == params.size(), "mmmod.", op, ": ", params.size(), " params but ",
                    xs.size(), " ", what);
  for (size_t i = 0; i < xs.size(); ++i) {
    const at::Tensor& x = xs[i];
    const at::Tensor& p = params[i];
    TORCH_CHECK_VALUE(x.device() == p.device() && x.scalar_type() == p.scalar_type() &&
                          x.sizes() == p.sizes() && x.is_contiguous(),
                      "mmmod.", op, ": ", what, " ", i, " must be a contiguous ", p.scalar_type(),
                      " tensor of shape ", p.sizes(), " on ", p.device(), ", like param ", i,
                      "; got ", x.scalar_type(), " ", x.sizes(), " on ", x.device(),
                      x.is_contiguous() ? "" : " (not contiguous)");
  }
}

// One element, float32, on the bucket's device.
void check_fused_scalar(const char* op, const char* what, const at::Tensor& t,
                        const at::Device& device) {
  TORCH_CHECK_VALUE(t.numel() == 1 && t.scalar_type() == at::kFloat && t.device() == device,
                    "mmmod.", op, ": ", what, " must be a one-element float32 tensor on ", device,
                    "; got ", t.scalar_type(), " ", t.sizes(), " on ", t.device());
}

void check_fused_common(const char* op, at::TensorList params, at::TensorList grads,
                        at::IntArrayRef offsets, const at::Tensor& k,
                        const std::optional<at::Tensor>& sigma,
                        const std::optional<at::Tensor>& update_scale,
                        c10::DeviceType device_type) {
  TORCH_CHECK_VALUE(offsets.size() == params.size(), "mmmod.", op, ": ", params.size(),
                    " params but ", offsets.size(), " offsets");
  check_fused_like(op, "grads", params, grads);
  if (params.empty()) return;
  const at::Device device = params[0].device();
  const at::ScalarType dtype = params[0].scalar_type();
  TORCH_CHECK_VALUE(device.type() == device_type, "mmmod.", op, ": param 0 is on ", device,
                    "; the ", c10::DeviceTypeName(device_type), " kernel takes ",
                    c10::DeviceTypeName(device_type), " tensors");
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 ||
                       dtype == at::kDouble,
                   "mmmod.", op, ": param 0 has dtype ", dtype,
                   "; expected float32, float16, bfloat16 or float64");
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK_VALUE(p.device() == device && p.scalar_type() == dtype && p.is_contiguous(),
                      "mmmod.", op, ": param ", i, " must be a contiguous ", dtype,
                      " tensor on ", device, ", like param 0; got ", p.scalar_type(), " on ",
                      p.device(), p.is_contiguous() ? "" : " (not contiguous)");
    TORCH_CHECK_VALUE(offsets[i] >= 0, "mmmod.", op, ": offset ", i, " is ", offsets[i],
                      "; stream offsets are >= 0");
  }
  check_fused_scalar(op, "k", k, device);
  if (sigma.has_value()) {
    TORCH_CHECK_VALUE(sigma->scalar_type() == at::kFloat && sigma->device() == device &&
                          sigma->numel() == static_cast<int64_t>(params.size()),
                      "mmmod.", op, ": sigma must be a float32 tensor on ", device,
                      " with one value per param (", params.size(), "); got ",
                      sigma->scalar_type(), " ", sigma->sizes(), " on ", sigma->device());
  }
  if (update_scale.has_value()) check_fused_scalar(op, "update_scale", *update_scale, device);
}

}  // namespace

void check_fused_sgd_inputs(at::TensorList params, at::TensorList grads,
                            at::TensorList momentum_buffers, size_t buffer_ready_flags,
                            bool use_momentum, at::IntArrayRef offsets, const at::Tensor& k,
                            const std::optional<at::Tensor>& sigma,
                            const std::optional<at::Tensor>& update_scale,
                            c10::DeviceType device_type) {
  constexpr const char* op = "fused_sgd_";
  check_fused_common(op, params, grads, offsets, k, sigma, update_scale, device_type);
  if (!use_momentum) return;
  check_fused_like(op, "momentum_buffers", params, momentum_buffers);
  TORCH_CHECK_VALUE(buffer_ready_flags == params.size(), "mmmod.", op, ": ", params.size(),
                    " params but ", buffer_ready_flags, " buffer_ready flags");
}

void check_fused_adam_inputs(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                             at::TensorList exp_avg_sqs, at::ArrayRef<double> steps,
                             at::IntArrayRef offsets, const at::Tensor& k,
                             const std::optional<at::Tensor>& sigma,
                             const std::optional<at::Tensor>& update_scale,
                             c10::DeviceType device_type) {
  constexpr const char* op = "fused_adam_";
  check_fused_common(op, params, grads, offsets, k, sigma, update_scale, device_type);
  check_fused_like(op, "exp_avgs", params, exp_avgs);
  check_fused_like(op, "exp_avg_sqs", params, exp_avg_sqs);
  TORCH_CHECK_VALUE(steps.size() == params.size(), "mmmod.", op, ": ", params.size(),
                    " params but ", steps.size(), " steps");
  for (size_t i = 0; i < steps.size(); ++i) {
    TORCH_CHECK_VALUE(steps[i] >= 1.0, "mmmod.", op, ": step ", i, " is ", steps[i],
                      "; the count after this step's increment is at least 1");
  }
}

// mmmod::proximal_ (csrc/cpu/proximal_cpu.cpp, csrc/cuda/proximal_cuda.cpp); mirrored by mmmod/_ops/__init__.py
void check_proximal_inputs(at::TensorList grads, at::TensorList params, at::TensorList snapshots,
                  const at::Tensor& beta) {
  TORCH_CHECK_VALUE(grads.size() == params.size() && params.size() == snapshots.size(),
                    "mmmod.proximal_: ", grads.size(), " grads, ", params.size(), " params and ",
                    snapshots.size(), " snapshots; expected one of each per tensor");
  TORCH_CHECK_VALUE(beta.numel() == 1 && at::isFloatingType(beta.scalar_type()),
                    "mmmod.proximal_: beta must be a one-element floating-point tensor");
  for (size_t i = 0; i < grads.size(); ++i) {
    const auto &g = grads[i], &p = params[i], &p0 = snapshots[i];
    TORCH_CHECK_VALUE(g.sizes() == p.sizes() && p0.sizes() == p.sizes(), "mmmod.proximal_: tensor ",
                      i, ": grad ", g.sizes(), ", param ", p.sizes(), " and snapshot ", p0.sizes(),
                      " differ in shape");
    const auto dt = g.scalar_type();
    TORCH_CHECK_TYPE(p.scalar_type() == dt && p0.scalar_type() == dt &&
                         (dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 ||
                          dt == at::kDouble),
                     "mmmod.proximal_: tensor ", i, ": grad ", dt, ", param ", p.scalar_type(),
                     ", snapshot ", p0.scalar_type(),
                     "; expected one dtype among float32, float16, bfloat16, float64");
    TORCH_CHECK_VALUE(g.device() == beta.device() && p.device() == beta.device() &&
                          p0.device() == beta.device(),
                      "mmmod.proximal_: tensor ", i, ": grad on ", g.device(), ", param on ",
                      p.device(), ", snapshot on ", p0.device(), ", beta on ", beta.device(),
                      "; expected one device");
  }
}

// ---- the gradient checks (mmmod.functional.check_grads), fast path --------------------------
// Every rule below mirrors its Python definition in mmmod/functional.py; where they could
// differ (arithmetic overflow, tensors whose metadata is not plain), this side answers "run the
// full check" and the Python code decides. Nothing here refuses: a refusal's message is Python's.

bool self_overlaps(const at::Tensor& t) {
  if (t.is_contiguous() || t.numel() == 0) return false;
  // (stride, size) of the dims of more than one element, sorted as Python sorts those tuples
  c10::SmallVector<std::pair<int64_t, int64_t>, 8> dims;
  const auto sizes = t.sizes();
  const auto strides = t.strides();
  for (size_t d = 0; d < sizes.size(); ++d) {
    if (sizes[d] > 1) dims.emplace_back(strides[d], sizes[d]);
  }
  std::sort(dims.begin(), dims.end());
  int64_t span = 0;  // elements (minus one) covered by the dims seen so far
  for (const auto& [stride, size] : dims) {
    if (stride <= span) return true;
    int64_t step = 0;
    // past int64 the layout cannot describe a real buffer: "may overlap" sends it to Python
    if (__builtin_mul_overflow(size - 1, stride, &step) ||
        __builtin_add_overflow(span, step, &span)) {
      return true;
    }
  }
  return false;
}

namespace {

// mmmod.functional.GRAD_DTYPES
bool grad_dtype(at::ScalarType dt) {
  return dt == at::kHalf || dt == at::kBFloat16 || dt == at::kFloat || dt == at::kDouble;
}

struct Span {
  c10::DeviceType type;
  int64_t index;       // device index, 0 when the device has none (Python: d.index or 0)
  uint64_t lo, hi;     // byte range [lo, hi) (mmmod.functional._byte_range)
  int64_t m, i, ref;   // key (m, i) and the position in refs
};

// Python sorts the tuples (device type name, index, lo, hi, (m, i)): the same order
bool span_less(const Span& a, const Span& b) {
  if (a.type != b.type) {
    return c10::DeviceTypeName(a.type, /*lower_case=*/true) <
           c10::DeviceTypeName(b.type, /*lower_case=*/true);
  }
  if (a.index != b.index) return a.index < b.index;
  if (a.lo != b.lo) return a.lo < b.lo;
  if (a.hi != b.hi) return a.hi < b.hi;
  if (a.m != b.m) return a.m < b.m;
  return a.i < b.i;
}

// mmmod.functional._byte_range; false when it cannot be computed here (no plain storage,
// overflow), which sends the gradient to the full check
bool byte_range(const at::Tensor& t, uint64_t* lo, uint64_t* hi) {
  if (!t.has_storage()) return false;
  const void* ptr = nullptr;
  try {
    ptr = t.const_data_ptr();  // throws for storage that must not be accessed (functional, ...)
  } catch (const std::exception&) {
    return false;
  }
  const uint64_t es = static_cast<uint64_t>(t.element_size());
  uint64_t extent = 0;  // elements from the first to one past the last
  if (t.is_contiguous()) {
    extent = static_cast<uint64_t>(t.numel());
  } else {
    int64_t last = 0;
    const auto sizes = t.sizes();
    const auto strides = t.strides();
    for (size_t d = 0; d < sizes.size(); ++d) {
      int64_t step = 0;
      if (__builtin_mul_overflow(sizes[d] - 1, strides[d], &step) ||
          __builtin_add_overflow(last, step, &last)) {
        return false;
      }
    }
    if (last < 0) return false;  // a negative stride: not a layout torch makes; let Python judge
    extent = static_cast<uint64_t>(last) + 1;
  }
  *lo = reinterpret_cast<uintptr_t>(ptr);
  uint64_t bytes = 0;
  return !__builtin_mul_overflow(extent, es, &bytes) && !__builtin_add_overflow(*lo, bytes, hi);
}

}  // namespace

GradCheckResult check_grads_fast(const std::vector<GradRef>& refs, bool inference_mode) {
  GradCheckResult out;
  std::vector<Span> spans;
  spans.reserve(refs.size());
  for (size_t k = 0; k < refs.size(); ++k) {
    const at::Tensor& t = *refs[k].tensor;
    const bool plain = t.defined() && !t.unsafeGetTensorImpl()->is_python_dispatch() &&
                       !t.is_nested() &&
                       !t.unsafeGetTensorImpl()->has_symbolic_sizes_strides();
    if (!plain || t.layout() != c10::kStrided || t.is_sparse() || !grad_dtype(t.scalar_type()) ||
        (t.is_inference() && !inference_mode) || self_overlaps(t)) {
      out.needs_full_check = static_cast<int64_t>(k);
      return out;
    }
    if (t.device().type() == c10::DeviceType::Meta || t.numel() == 0) continue;
    Span s{t.device().type(), t.device().has_index() ? t.device().index() : 0, 0, 0,
           refs[k].m, refs[k].i, static_cast<int64_t>(k)};
    if (!byte_range(t, &s.lo, &s.hi)) {
      out.needs_full_check = static_cast<int64_t>(k);
      return out;
    }
    spans.push_back(s);
  }
  std::sort(spans.begin(), spans.end(), span_less);
  // the sweep of check_no_overlap: the spans still open (same device, ending past this start)
  // in the order they opened, each paired with the new one
  std::vector<const Span*> open;
  for (const Span& s : spans) {
    open.erase(std::remove_if(open.begin(), open.end(),
                              [&](const Span* o) {
                                return o->type != s.type || o->index != s.index || o->hi <= s.lo;
                              }),
               open.end());
    for (const Span* o : open) out.overlapping.emplace_back(o->ref, s.ref);
    open.push_back(&s);
  }
  return out;
}

}  // namespace mmmod
