// The one device metadata table of the CUDA kernels (apex multi_tensor_apply style): a list of
// tensors cut into fixed-size chunks, one thread block per chunk. Plain C++ with fixed-width
// integers only, included by the torch glue (host compiler: multi_tensor_table.h builds and
// uploads it) and by the kernels (nvcc: multi_tensor.cuh applies a functor over it); no CUDA
// or torch header.
//
// Layout (int64 words): a header {ntensors, nchunks}, then ntensors TensorListEntry<Depth,
// Extra>, then nchunks ChunkEntry.
//   entry: ptr[Depth] (data pointers of the Depth contiguous tensors of one position: gradient,
//          parameter, state, ...; same size), numel, extra[Extra] (per-tensor words of the op:
//          a stream offset, a dtype code, a flag, the bits of a double), first_chunk,
//          chunk_count (its chunks are first_chunk .. first_chunk + chunk_count - 1).
//   chunk: {tensor, start}: index of its entry and its first element (64-bit).
// An empty tensor keeps its entry (entry t is the op's row t) and owns no chunk. The chunk size
// is the op's (a compile-time constant of its kernels), fixed so that per-tensor reductions are
// merged in the same order on every GPU.
//
// The modulate kernels' table (mmmod::bucket_table, seen by Python as
// mmmod._ops.table_words: 2 + 5 T + 2 C words) is TensorListEntry<1, 1>: {ptr, numel, offset,
// first_chunk, chunk_count}.
#pragma once

#include <stdint.h>
#include <string.h>

#if defined(__CUDACC__)
#define MMMOD_MT_HD __host__ __device__ __forceinline__
#else
#define MMMOD_MT_HD inline
#endif

namespace mmmod {
namespace mt {

template <int Depth, int Extra>
struct TensorListEntry {
  static_assert(Depth >= 1, "a table entry names at least one tensor");
  static_assert(Extra >= 1, "every op has at least one per-tensor word (offset, dtype, ...)");
  int64_t ptr[Depth];
  int64_t numel;
  int64_t extra[Extra];
  int64_t first_chunk;
  int64_t chunk_count;
};
static_assert(sizeof(TensorListEntry<1, 1>) == 5 * sizeof(int64_t), "entries are int64 words, no padding");

struct ChunkEntry {
  int64_t tensor;  // index into the entries
  int64_t start;   // first element of the chunk in that tensor
};

constexpr int64_t kHeaderWords = 2;

template <int Depth, int Extra>
constexpr int64_t entry_words() {
  return static_cast<int64_t>(sizeof(TensorListEntry<Depth, Extra>) / sizeof(int64_t));
}

// int64 words of a table of ntensors entries and nchunks chunks.
template <int Depth, int Extra>
constexpr int64_t table_words(int64_t ntensors, int64_t nchunks) {
  return kHeaderWords + entry_words<Depth, Extra>() * ntensors + 2 * nchunks;
}

// Chunks of a tensor of numel elements.
MMMOD_MT_HD int64_t chunks_of(int64_t numel, int64_t chunk) { return (numel + chunk - 1) / chunk; }

// The double whose bits an extra word holds (the builder stores doubles bit for bit).
MMMOD_MT_HD double word_as_double(int64_t w) {
  double d;
  memcpy(&d, &w, sizeof(d));
  return d;
}

MMMOD_MT_HD int64_t double_as_word(double d) {
  int64_t w;
  memcpy(&w, &d, sizeof(w));
  return w;
}

// A read-only view of a table in memory (device memory in a kernel, host memory in the host
// harnesses), passed to kernels by value.
template <int Depth, int Extra>
struct TensorListTable {
  using Entry = TensorListEntry<Depth, Extra>;
  const Entry* tensors;
  const ChunkEntry* chunks;
  int64_t ntensors;
  int64_t nchunks;

  // The view of `words`; ntensors and nchunks are the caller's (they equal the header's), so
  // nothing is read from the table to place its sections.
  static MMMOD_MT_HD TensorListTable view(const void* words, int64_t ntensors, int64_t nchunks) {
    const auto* w = static_cast<const int64_t*>(words);
    TensorListTable t;
    t.tensors = reinterpret_cast<const Entry*>(w + kHeaderWords);
    t.chunks = reinterpret_cast<const ChunkEntry*>(t.tensors + ntensors);
    t.ntensors = ntensors;
    t.nchunks = nchunks;
    return t;
  }
};

// Elements of chunk `ch` of tensor `te` for a chunk size of `chunk`.
template <typename Entry>
MMMOD_MT_HD int64_t chunk_len(const Entry& te, const ChunkEntry& ch, int64_t chunk) {
  const int64_t rest = te.numel - ch.start;
  return rest < chunk ? rest : chunk;
}

}  // namespace mt
}  // namespace mmmod
