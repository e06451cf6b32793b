// Operator schemas of the mmmod library (namespace "mmmod"); the checks live in checks.cpp.
//
// The ops are registered with the dispatcher so torch.compile and torch.library.opcheck see
// them; fake (meta) implementations are registered from Python (mmmod/_ext.py). No op reads a
// device value on the host: k and gate arrive as 0-d device tensors, seed/step/modality as
// integers (or the step as a 0-d device counter, modulate_.capturable).
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
  // The CUDA-graph capturable form of modulate_: `table` is the bucket's metadata table from
  // bucket_table (kept on the device by the caller and reused, so nothing is uploaded per call)
  // and `step_tensor`, when given, is a 0-d integer counter on the tensors' device whose value
  // mod 2^32 replaces `step`, read by the kernel (a graph replay sees the current count). The CPU
  // kernels take no table and read a CPU step_tensor; with neither given it is modulate_.
  m.def(
      "modulate_.capturable(Tensor(a!)[] tensors, int[] offsets, Tensor k, Tensor gate, "
      "bool noise, bool scaled, int seed, int step, int modality, Tensor? table=None, "
      "Tensor? step_tensor=None) -> ()");
  // The device metadata table (int64 words) of a bucket for modulate_.capturable: data pointers,
  // sizes, stream offsets and chunks of `tensors`. Valid while those tensors' storage lives where
  // it is now; CUDA only (the upload is refused while a CUDA graph is being captured).
  m.def("bucket_table(Tensor[] tensors, int[] offsets) -> Tensor");
  // Unbiased float64 std of each tensor (0 below two elements), deterministic: float64 [N].
  m.def("bucket_std(Tensor[] tensors) -> Tensor");
  // Fill a float32 tensor with the Philox noise of stream elements offset .. offset + numel - 1.
  m.def("philox_normal_(Tensor(a!) out, int seed, int step, int modality, int offset) -> ()");
}
