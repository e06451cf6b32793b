// multi_tensor_apply: one launch applies a functor to every chunk of a TensorListTable
// (multi_tensor.h), apex style. A fused op's CUDA side is a functor
//
//   struct MyFunctor {
//     __device__ void operator()(const Table& table, int64_t chunk, Args... args) const;
//   };
//
// called once per chunk by a block of Threads threads (block b takes chunks b, b + gridDim.x,
// ... so any chunk count fits one grid), plus its schema and its reference. The functor reads
// its chunk's entry (table.chunks[chunk], table.tensors[...]) and does the per-element work;
// reductions write one partial per chunk, merged by a separate fixed-order kernel, so results
// never depend on the grid or the GPU. nvcc only.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#include "cuda/multi_tensor.h"

namespace mmmod {
namespace mt {

template <int Threads, typename Table, typename Functor, typename... Args>
__global__ void __launch_bounds__(Threads) multi_tensor_kernel(Table table, Functor f, Args... args) {
  for (int64_t c = blockIdx.x; c < table.nchunks; c += gridDim.x) f(table, c, args...);
}

inline unsigned grid_for_chunks(int64_t nchunks) {
  const int64_t cap = 0x7fffffff;
  return static_cast<unsigned>(nchunks < 1 ? 1 : (nchunks > cap ? cap : nchunks));
}

// Launches f over every chunk of `table` on `stream` (nothing when it has no chunk) and returns
// the launch error (0: none).
template <int Threads, typename Table, typename Functor, typename... Args>
int multi_tensor_apply(const Table& table, cudaStream_t stream, Functor f, Args... args) {
  if (table.nchunks == 0) return 0;
  multi_tensor_kernel<Threads, Table, Functor, Args...>
      <<<grid_for_chunks(table.nchunks), Threads, 0, stream>>>(table, f, args...);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace mt
}  // namespace mmmod
