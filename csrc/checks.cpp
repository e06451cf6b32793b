// Input checks shared by the CPU (mmmod._C) and CUDA (mmmod._C_cuda) implementations.
#include <ATen/ATen.h>

#include "ops.h"

namespace mmmod {

int method_code(const std::string& method) {
  if (method == "none") return 0;
  if (method == "ogm" || method == "ogm_ge") return 1;
  if (method == "mlb") return 2;
  TORCH_CHECK_VALUE(false, "mmmod: unknown method '", method,
                    "'; expected one of ogm, ogm_ge, mlb, none");
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

// mmmod::proximal_ (csrc/proximal_cpu.cpp, csrc/proximal_cuda.cpp); mirrored by mmmod/ops_proximal.py
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

}  // namespace mmmod
