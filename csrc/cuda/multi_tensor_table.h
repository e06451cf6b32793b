// Host side of the one CUDA metadata table (multi_tensor.h): the one uploader, with its LRU
// cache of device copies, of the tables every CUDA op's glue fills with TableBuilder
// (multi_tensor_builder.h). Host compiler only (ATen headers, no CUDA header); the kernels apply
// functors over the table (multi_tensor.cuh).
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "cuda/multi_tensor.h"
#include "cuda/multi_tensor_builder.h"

namespace mmmod {
namespace mt {

// A table on the device: its int64 words and its counts (the kernels' launch arguments).
struct DeviceTable {
  at::Tensor words;
  int64_t ntensors = 0;
  int64_t nchunks = 0;
};

// How upload_words treats a table it has uploaded before.
enum class Reuse { kCached, kFresh };

// `words` as an int64 tensor on `device`, enqueued on its current stream without a host sync.
// Refused while that stream is being captured into a CUDA graph (a captured copy would be
// replayed from a pinned staging block recycled since), with "mmmod.<op>: ..." and
// `capture_hint` appended to the message. Reuse::kCached: a table with the same words, device
// and stream uploaded before is returned from an LRU cache of device copies (never written by
// a kernel), else staged in pinned host memory, copied non_blocking and cached; Reuse::kFresh:
// always a new upload the caller owns (mmmod::bucket_table's result).
at::Tensor upload_words(const std::vector<int64_t>& words, const at::Device& device, const char* op,
                        const char* capture_hint, Reuse reuse);

// Device tables the LRU cache holds at most (each at most kCacheMaxWords words).
constexpr size_t kCacheEntries = 64;
constexpr size_t kCacheMaxWords = size_t(1) << 20;

template <int Depth, int Extra>
DeviceTable upload(const TableBuilder<Depth, Extra>& b, const at::Device& device, const char* op,
                   const char* capture_hint = "", Reuse reuse = Reuse::kCached) {
  DeviceTable t;
  t.ntensors = b.ntensors();
  t.nchunks = b.nchunks();
  t.words = upload_words(b.words(), device, op, capture_hint, reuse);
  return t;
}

}  // namespace mt
}  // namespace mmmod
