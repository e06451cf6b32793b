// A fixed-order float64 sum over one thread block, for the kernels whose per-chunk and
// per-tensor sums must give the same bits on every GPU (combine.cu, proximal.cu): every thread
// stores its value in `sh` (Threads doubles of shared memory), then a halving tree with
// explicitly rounded additions (never an FMA). Every thread gets the total; `sh` may be reused
// by the caller's next call. (kernels.cu's statistics keep their own warp-shuffle tree.)
#pragma once

namespace mmmod {

template <int Threads>
__device__ double block_sum_tree(double v, double* sh) {
  static_assert((Threads & (Threads - 1)) == 0, "a halving tree needs a power-of-two block");
  sh[threadIdx.x] = v;
  __syncthreads();
  for (int s = Threads / 2; s > 0; s >>= 1) {
    if (static_cast<int>(threadIdx.x) < s) {
      sh[threadIdx.x] = __dadd_rn(sh[threadIdx.x], sh[threadIdx.x + s]);
    }
    __syncthreads();
  }
  const double out = sh[0];
  __syncthreads();  // sh is reused by the caller's next call
  return out;
}

}  // namespace mmmod
