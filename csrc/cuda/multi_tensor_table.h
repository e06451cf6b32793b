// Host side of the one CUDA metadata table (multi_tensor.h): the builder every CUDA op's glue
// fills, and the one uploader with its LRU cache of device copies. Host compiler only (ATen
// headers, no CUDA header); the kernels apply functors over the table (multi_tensor.cuh).
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <cstring>
#include <vector>

#include "cuda/multi_tensor.h"

namespace mmmod {
namespace mt {

// A table on the device: its int64 words and its counts (the kernels' launch arguments).
struct DeviceTable {
  at::Tensor words;
  int64_t ntensors = 0;
  int64_t nchunks = 0;
};

// Entries and chunks of one table, in the order they are added. The chunk size is the op's.
template <int Depth, int Extra>
class TableBuilder {
 public:
  using Entry = TensorListEntry<Depth, Extra>;

  explicit TableBuilder(int64_t chunk) : chunk_(chunk) {}

  // Appends a tensor position (Depth data pointers, its size, its Extra words) and its chunks
  // (none when numel is 0); returns its entry index.
  int64_t add(const std::array<const void*, Depth>& ptrs, int64_t numel,
              const std::array<int64_t, Extra>& extra) {
    Entry e;
    for (int d = 0; d < Depth; ++d) e.ptr[d] = reinterpret_cast<int64_t>(ptrs[d]);
    e.numel = numel;
    for (int x = 0; x < Extra; ++x) e.extra[x] = extra[x];
    e.first_chunk = static_cast<int64_t>(chunks_.size());
    e.chunk_count = chunks_of(numel, chunk_);
    const int64_t index = static_cast<int64_t>(entries_.size());
    for (int64_t c = 0; c < e.chunk_count; ++c) chunks_.push_back({index, c * chunk_});
    entries_.push_back(e);
    return index;
  }

  int64_t ntensors() const { return static_cast<int64_t>(entries_.size()); }
  int64_t nchunks() const { return static_cast<int64_t>(chunks_.size()); }

  // The table's words: header, entries, chunks (table_words<Depth, Extra> of them).
  std::vector<int64_t> words() const {
    std::vector<int64_t> w(static_cast<size_t>(table_words<Depth, Extra>(ntensors(), nchunks())));
    w[0] = ntensors();
    w[1] = nchunks();
    int64_t* p = w.data() + kHeaderWords;
    if (!entries_.empty()) std::memcpy(p, entries_.data(), entries_.size() * sizeof(Entry));
    p += entry_words<Depth, Extra>() * ntensors();
    if (!chunks_.empty()) std::memcpy(p, chunks_.data(), chunks_.size() * sizeof(ChunkEntry));
    return w;
  }

 private:
  int64_t chunk_;
  std::vector<Entry> entries_;
  std::vector<ChunkEntry> chunks_;
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
