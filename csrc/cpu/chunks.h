// The one chunking of every CPU kernel: a bucket's tensors cut into fixed runs of kChunkCpu
// elements of one tensor, in tensor order then element order.
//
// Fixed (never derived from the number of threads), so per-tensor statistics and sums are merged
// in the same order everywhere and results do not depend on the thread count. An empty tensor
// owns no chunk. (The CUDA kernels' chunks are MMMOD_CUDA_CHUNK in cuda/cuda_api.h.)
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace mmmod {

// Elements per chunk of the CPU kernels; reported by build_info().
constexpr int64_t kChunkCpu = 1 << 14;

namespace cpu {

struct Chunk {
  int64_t tensor;  // index into the bucket's tensor list
  int64_t start;   // first element of the chunk in that tensor
  int64_t len;     // elements, 1 .. kChunkCpu
};

// Every chunk of `tensors` (their numel only is read), in tensor order then element order.
inline std::vector<Chunk> make_chunks(at::TensorList tensors) {
  std::vector<Chunk> chunks;
  for (size_t t = 0; t < tensors.size(); ++t) {
    const int64_t n = tensors[t].numel();
    for (int64_t s = 0; s < n; s += kChunkCpu) {
      chunks.push_back({static_cast<int64_t>(t), s, std::min(kChunkCpu, n - s)});
    }
  }
  return chunks;
}

}  // namespace cpu
}  // namespace mmmod
