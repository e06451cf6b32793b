// CUDA implementations of the mmmod ops (dispatch key CUDA): torch glue compiled by the host
// compiler with c10/ATen headers only (no CUDA headers); the kernels are behind the plain
// launchers of cuda_api.h (kernels.cu).
//
// No host sync: the metadata table (the common one, multi_tensor_table.h) is staged in pinned
// host memory and copied with non_blocking=true on the current stream (the caching host
// allocator keeps the staging buffer alive until the copy has run), or found in the uploader's
// cache of device tables; k and gate stay device tensors read by the kernels.
//
// CUDA graphs: a captured copy from a pinned staging buffer would be replayed from a buffer the
// host allocator has since reused, so every upload refuses to run while the stream is being
// captured. modulate_.capturable takes a table built beforehand (bucket_table, cached by the
// caller) and the step as a device counter, so a capturable step launches kernels only.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "cuda/cuda_api.h"
#include "cuda/cuda_glue.h"
#include "cuda/multi_tensor_table.h"
#include "common/ops.h"

namespace mmmod {
namespace cuda {
namespace {

void* current_stream(const at::Device& device) { return cuda_current_stream(device); }

using mt::DeviceTable;
using BucketBuilder = mt::TableBuilder<bucket::kDepth, bucket::kExtra>;

int64_t total_chunks(at::TensorList tensors) {
  int64_t n = 0;
  for (const auto& t : tensors) n += mt::chunks_of(t.numel(), MMMOD_CUDA_CHUNK);
  return n;
}

constexpr const char* kCaptureHint =
    "; use modulate_.capturable with a table from mmmod::bucket_table built before capture and a "
    "device step_tensor (what backend 'cuda' does with capturable=True)";

// The bucket's table (common layout, multi_tensor.h: pointer, size, stream offset, chunks; an
// empty tensor has no chunks, so no kernel touches it), uploaded without a sync; refused during
// stream capture. Reuse::kFresh for bucket_table, whose result the caller keeps.
DeviceTable upload_table(at::TensorList tensors, at::IntArrayRef offsets, const at::Device& device,
                         const char* what, mt::Reuse reuse = mt::Reuse::kCached) {
  BucketBuilder builder(MMMOD_CUDA_CHUNK);
  for (size_t i = 0; i < tensors.size(); ++i) {
    builder.add({tensors[i].data_ptr()}, tensors[i].numel(), {offsets.empty() ? 0 : offsets[i]});
  }
  return mt::upload(builder, device, what, kCaptureHint, reuse);
}

at::Tensor workspace(const DeviceTable& t, const at::Device& device) {
  const size_t bytes = mmmod_cuda_workspace_bytes(t.ntensors, t.nchunks);
  return at::empty({static_cast<int64_t>(bytes > 0 ? bytes : 1)},
                   at::TensorOptions().dtype(at::kByte).device(device));
}

}  // namespace

at::Tensor scores_cuda(at::TensorList logits, const at::Tensor& labels) {
  check_scores_inputs(logits, labels);
  c10::DeviceGuard guard(labels.device());
  const int64_t M = static_cast<int64_t>(logits.size());
  at::Tensor out = at::empty({M}, labels.options().dtype(at::kFloat));
  if (M == 0) return out;
  const int64_t B = labels.size(0);
  // every dtype is checked before the first launch, so a bad one writes nothing
  std::vector<int> codes;
  for (const auto& z : logits) codes.push_back(kernel_dtype(z.scalar_type(), "mmmod"));
  const at::Tensor y = labels.to(at::kLong).contiguous();
  void* stream = current_stream(labels.device());
  // the row blocks' partials of one call of up to MMMOD_CUDA_SCORES_MAX_M modalities; the calls
  // of a larger M run one after another on the stream, so they share it
  const size_t bytes = mmmod_cuda_scores_workspace_bytes(B, M);
  const at::Tensor partial = at::empty({static_cast<int64_t>(bytes > 0 ? bytes : 1)},
                                       at::TensorOptions().dtype(at::kByte).device(labels.device()));
  for (int64_t m0 = 0; m0 < M; m0 += MMMOD_CUDA_SCORES_MAX_M) {
    const int64_t count = std::min<int64_t>(M - m0, MMMOD_CUDA_SCORES_MAX_M);
    MmmodScoresModality mods[MMMOD_CUDA_SCORES_MAX_M];
    for (int64_t j = 0; j < count; ++j) {
      const at::Tensor& z = logits[m0 + j];
      mods[j] = {reinterpret_cast<int64_t>(z.const_data_ptr()), codes[m0 + j],
                 z.size(1), z.stride(0), z.stride(1)};
    }
    check_launch(mmmod_cuda_scores(mods, count, B, y.const_data_ptr<int64_t>(),
                                   out.mutable_data_ptr<float>() + m0, partial.data_ptr(), stream),
                 "mmmod", "scores");
  }
  return out;
}

at::Tensor coefficients_cuda(const at::Tensor& scores, int64_t rule, double alpha,
                             double beta_max) {
  const int code = checked_rule(rule);
  TORCH_CHECK_VALUE(scores.dim() == 1 && scores.size(0) >= 2,
                    "mmmod.coefficients: scores must be 1-D with M >= 2, got ", scores.sizes());
  TORCH_CHECK_VALUE(scores.size(0) <= 64, "mmmod.coefficients: at most 64 modalities on CUDA, got ",
                    scores.size(0));
  c10::DeviceGuard guard(scores.device());
  const at::Tensor s = scores.to(at::kFloat).contiguous();
  at::Tensor k = at::empty({s.size(0)}, s.options());
  check_launch(mmmod_cuda_coefficients(s.const_data_ptr<float>(), k.mutable_data_ptr<float>(), s.size(0),
                                       code, static_cast<float>(alpha), static_cast<float>(beta_max),
                                       current_stream(s.device())),
               "mmmod", "coefficients");
  return k;
}

void launch_modulate(at::TensorList tensors, const DeviceTable& t, const at::Tensor& k,
                     const at::Tensor& gate, bool noise, bool scaled, int64_t seed,
                     const int64_t* step_ptr, int64_t step, int64_t modality,
                     const at::Device& device) {
  if (t.nchunks == 0) return;
  at::Tensor ws = workspace(t, device);
  check_launch(mmmod_cuda_modulate(t.words.const_data_ptr(), t.ntensors, t.nchunks,
                                   kernel_dtype(tensors[0].scalar_type(), "mmmod"), k.const_data_ptr<float>(),
                                   gate.const_data_ptr<float>(), noise ? 1 : 0, scaled ? 1 : 0,
                                   static_cast<uint64_t>(seed), step_ptr, static_cast<uint32_t>(step),
                                   static_cast<uint32_t>(modality), ws.mutable_data_ptr(),
                                   current_stream(device)),
               "mmmod", "modulate_");
}

void modulate_cuda(at::TensorList tensors, at::IntArrayRef offsets, const at::Tensor& k,
                   const at::Tensor& gate, bool noise, bool scaled, int64_t seed, int64_t step,
                   int64_t modality) {
  check_bucket(tensors, offsets, k, gate);
  if (tensors.empty()) return;
  const at::Device device = tensors[0].device();
  c10::DeviceGuard guard(device);
  const DeviceTable t = upload_table(tensors, offsets, device, "modulate_");
  launch_modulate(tensors, t, k, gate, noise, scaled, seed, nullptr, step, modality, device);
}

at::Tensor bucket_table_cuda(at::TensorList tensors, at::IntArrayRef offsets) {
  TORCH_CHECK_VALUE(tensors.size() == offsets.size(), "mmmod.bucket_table: ", tensors.size(),
                    " tensors but ", offsets.size(), " offsets");
  TORCH_CHECK_VALUE(!tensors.empty(), "mmmod.bucket_table: no tensors");
  const at::Device device = tensors[0].device();
  for (size_t i = 0; i < tensors.size(); ++i) {
    TORCH_CHECK_VALUE(tensors[i].device() == device, "mmmod.bucket_table: tensor ", i, " is on ",
                      tensors[i].device(), ", tensor 0 on ", device);
    TORCH_CHECK_VALUE(tensors[i].is_contiguous(), "mmmod.bucket_table: tensor ", i,
                      " is not contiguous");
    TORCH_CHECK_VALUE(offsets[i] >= 0, "mmmod.bucket_table: negative stream offset ", offsets[i]);
  }
  c10::DeviceGuard guard(device);
  return upload_table(tensors, offsets, device, "bucket_table", mt::Reuse::kFresh).words;
}

// The bucket's table: `table` when given (checked as far as possible without reading it), else
// uploaded now (refused under capture).
DeviceTable given_or_uploaded_table(at::TensorList tensors, at::IntArrayRef offsets,
                                    const std::optional<at::Tensor>& table, const at::Device& device,
                                    const char* what) {
  if (!table.has_value()) return upload_table(tensors, offsets, device, what);
  // The table's contents are trusted to describe `tensors` (the caller keys its cache by their
  // data pointers, sizes and offsets); what can be checked without reading it is checked.
  DeviceTable t;
  t.ntensors = static_cast<int64_t>(tensors.size());
  t.nchunks = total_chunks(tensors);
  const int64_t words = mt::table_words<bucket::kDepth, bucket::kExtra>(t.ntensors, t.nchunks);
  TORCH_CHECK_VALUE(table->scalar_type() == at::kLong && table->dim() == 1 &&
                        table->is_contiguous() && table->device() == device &&
                        table->numel() == words,
                    "mmmod.", what, ": table must be the contiguous int64 [", words,
                    "] table of these tensors on ", device, " (from mmmod::bucket_table), got ",
                    table->scalar_type(), " ", table->sizes(), " on ", table->device());
  t.words = *table;
  return t;
}

// A capturable launch's step counter as int64 on the bucket's device (undefined: none given).
static at::Tensor device_step(const std::optional<at::Tensor>& step_tensor,
                              const at::Device& device) {
  if (!step_tensor.has_value()) return at::Tensor();
  check_step_tensor(*step_tensor, device);
  return step_tensor->to(at::kLong);  // no copy for an int64 counter (the usual case)
}

void modulate_capturable_cuda(at::TensorList tensors, at::IntArrayRef offsets, const at::Tensor& k,
                              const at::Tensor& gate, bool noise, bool scaled, int64_t seed,
                              int64_t step, int64_t modality,
                              const std::optional<at::Tensor>& table,
                              const std::optional<at::Tensor>& step_tensor) {
  check_bucket(tensors, offsets, k, gate);
  if (tensors.empty()) return;
  const at::Device device = tensors[0].device();
  c10::DeviceGuard guard(device);
  const at::Tensor step64 = device_step(step_tensor, device);
  const DeviceTable t = given_or_uploaded_table(tensors, offsets, table, device, "modulate_");
  launch_modulate(tensors, t, k, gate, noise, scaled, seed,
                  step64.defined() ? step64.const_data_ptr<int64_t>() : nullptr, step, modality,
                  device);
}

// modulate_sigma_: the noise kernel alone with each tensor's sigma given (float32 [T] on the
// device, read by the kernel with k and gate: no host sync). Capturable as modulate_.capturable
// is: with a table from bucket_table and a device step_tensor it launches one kernel only.
void modulate_sigma_cuda(at::TensorList tensors, at::IntArrayRef offsets, const at::Tensor& k,
                         const at::Tensor& gate, const at::Tensor& sigma, int64_t seed, int64_t step,
                         int64_t modality, const std::optional<at::Tensor>& table,
                         const std::optional<at::Tensor>& step_tensor) {
  check_bucket(tensors, offsets, k, gate);
  check_sigma(tensors, sigma);
  if (tensors.empty()) return;
  const at::Device device = tensors[0].device();
  c10::DeviceGuard guard(device);
  const at::Tensor step64 = device_step(step_tensor, device);
  const DeviceTable t = given_or_uploaded_table(tensors, offsets, table, device, "modulate_sigma_");
  if (t.nchunks == 0) return;
  const at::Tensor s = sigma.contiguous();  // a device copy at most, never a sync
  check_launch(mmmod_cuda_modulate_sigma(t.words.const_data_ptr(), t.ntensors, t.nchunks,
                                         kernel_dtype(tensors[0].scalar_type(), "mmmod"), k.const_data_ptr<float>(),
                                         gate.const_data_ptr<float>(), s.const_data_ptr<float>(),
                                         static_cast<uint64_t>(seed),
                                         step64.defined() ? step64.const_data_ptr<int64_t>() : nullptr,
                                         static_cast<uint32_t>(step), static_cast<uint32_t>(modality),
                                         current_stream(device)),
               "mmmod", "modulate_sigma_");
}

at::Tensor bucket_std_cuda(at::TensorList tensors) {
  TORCH_CHECK_VALUE(!tensors.empty(), "mmmod.bucket_std: no tensors");
  const at::Device device = tensors[0].device();
  c10::DeviceGuard guard(device);
  std::vector<at::Tensor> flat;
  for (const auto& x : tensors) {
    TORCH_CHECK_VALUE(x.scalar_type() == tensors[0].scalar_type() && x.device() == device,
                      "mmmod.bucket_std: tensors must share one dtype and device");
    flat.push_back(x.contiguous());
  }
  const DeviceTable t = upload_table(flat, {}, device, "bucket_std");
  at::Tensor out = at::empty({t.ntensors}, at::TensorOptions().dtype(at::kDouble).device(device));
  at::Tensor ws = workspace(t, device);
  check_launch(mmmod_cuda_bucket_std(t.words.const_data_ptr(), t.ntensors, t.nchunks,
                                     kernel_dtype(flat[0].scalar_type(), "mmmod"), ws.mutable_data_ptr(),
                                     out.mutable_data_ptr<double>(), current_stream(device)),
               "mmmod", "bucket_std");
  return out;
}

// _bucket_moments: float64 (count, mean, M2) rows [T, 3] on the tensors' device, one statistics
// launch and one merge launch (kernels.cu); the same checks as the CPU kernel, before any
// launch. A non-contiguous tensor is read through a contiguous copy (its logical order).
at::Tensor bucket_moments_cuda(at::TensorList tensors) {
  const int64_t T = static_cast<int64_t>(tensors.size());
  check_moments_inputs(tensors);
  // an empty list has no device, so it never dispatches here (the CPU kernel answers it)
  TORCH_CHECK_VALUE(T > 0, "mmmod._bucket_moments: no tensors");
  const at::Device device = tensors[0].device();
  c10::DeviceGuard guard(device);
  std::vector<at::Tensor> flat;
  for (const auto& x : tensors) flat.push_back(x.contiguous());
  const DeviceTable t = upload_table(flat, {}, device, "_bucket_moments");
  at::Tensor out = at::empty({T, 3}, at::TensorOptions().dtype(at::kDouble).device(device));
  at::Tensor ws = workspace(t, device);
  check_launch(mmmod_cuda_bucket_moments(t.words.const_data_ptr(), t.ntensors, t.nchunks,
                                         kernel_dtype(flat[0].scalar_type(), "mmmod"), ws.mutable_data_ptr(),
                                         out.mutable_data_ptr<double>(), current_stream(device)),
               "mmmod", "_bucket_moments");
  return out;
}

void philox_normal_cuda(const at::Tensor& out, int64_t seed, int64_t step, int64_t modality,
                        int64_t offset) {
  TORCH_CHECK_VALUE(out.scalar_type() == at::kFloat && out.is_contiguous(),
                    "mmmod.philox_normal_: out must be a contiguous float32 tensor");
  TORCH_CHECK_VALUE(offset >= 0, "mmmod.philox_normal_: negative offset");
  c10::DeviceGuard guard(out.device());
  check_launch(mmmod_cuda_philox_normal(out.mutable_data_ptr<float>(), out.numel(),
                                        static_cast<uint64_t>(seed), static_cast<uint32_t>(step),
                                        static_cast<uint32_t>(modality), static_cast<uint64_t>(offset),
                                        current_stream(out.device())),
               "mmmod", "philox_normal_");
}

}  // namespace cuda
}  // namespace mmmod

TORCH_LIBRARY_IMPL(mmmod, CUDA, m) {
  m.impl("scores", &mmmod::cuda::scores_cuda);
  m.impl("coefficients", &mmmod::cuda::coefficients_cuda);
  m.impl("modulate_", &mmmod::cuda::modulate_cuda);
  m.impl("modulate_.capturable", &mmmod::cuda::modulate_capturable_cuda);
  m.impl("modulate_sigma_", &mmmod::cuda::modulate_sigma_cuda);
  m.impl("bucket_table", &mmmod::cuda::bucket_table_cuda);
  m.impl("_bucket_std", &mmmod::cuda::bucket_std_cuda);
  m.impl("_bucket_moments", &mmmod::cuda::bucket_moments_cuda);
  m.impl("_philox_normal_", &mmmod::cuda::philox_normal_cuda);
}
