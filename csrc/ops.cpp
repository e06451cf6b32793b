// Operator schemas of the mmmod library (namespace "mmmod"); the checks live in checks.cpp.
//
// The ops are registered with the dispatcher so torch.compile and torch.library.opcheck see
// them; fake (meta) implementations are registered from Python (mmmod/_ext.py). No op reads a
// device value on the host: k and gate arrive as 0-d device tensors, seed/step/modality as
// integers.
#include <ATen/ATen.h>
#include <torch/library.h>

TORCH_LIBRARY(mmmod, m) {
  // s_m = sum_i softmax(logits[m])[i, labels[i]] as float32 [M]; NaN for out-of-range labels.
  m.def("scores(Tensor[] logits, Tensor labels) -> Tensor");
  // k [M] float32 from scores [M] (method: ogm, ogm_ge, mlb, none); NaN if any score is NaN.
  m.def("coefficients(Tensor scores, str method, float alpha, float beta_max) -> Tensor");
  // In place: g <- k g (+ gate sigma n) for one modality's bucket (see mmmod/reference).
  m.def(
      "modulate_(Tensor(a!)[] tensors, int[] offsets, Tensor k, Tensor gate, bool noise, "
      "bool scaled, int seed, int step, int modality) -> ()");
  // Unbiased float64 std of each tensor (0 below two elements), deterministic: float64 [N].
  m.def("bucket_std(Tensor[] tensors) -> Tensor");
  // Fill a float32 tensor with the Philox noise of stream elements offset .. offset + numel - 1.
  m.def("philox_normal_(Tensor(a!) out, int seed, int step, int modality, int offset) -> ()");
}
