// The builder of the one CUDA metadata table (multi_tensor.h): the entries and chunks of a list
// of tensor positions, as the words the uploader (multi_tensor_table.h) copies to the device.
// Standard C++ only (no ATen, no CUDA header), so tests/backends/test_multi_tensor_table.py
// compiles it on its own and checks the words it makes.
#pragma once

#include <stdint.h>

#include <array>
#include <cstring>
#include <vector>

#include "cuda/multi_tensor.h"

namespace mmmod {
namespace mt {

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

}  // namespace mt
}  // namespace mmmod
