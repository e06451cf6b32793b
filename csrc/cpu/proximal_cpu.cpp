// CPU kernel of InfoReg's proximal correction (op proximal_, defined in mmmod/_ops/__init__.py;
// the reference is proximal_ in mmmod/reference/proximal.py).
//
// One pass over the modality's bucket: per element g <- T(float(g) + beta (float(p) - float(p0)))
// (float32 arithmetic, each operation rounded: the build passes -ffp-contract=off, so no FMA),
// and the square of the stored value accumulated in float64 for the Fisher increment
// sum over tensors of >= 2 dims of mean(g_new^2).
//
// Determinism: work is cut into fixed chunks of kChunkCpu elements of one tensor (never derived
// from the thread count); each chunk's sum of squares is taken in a fixed lane pattern, and the
// chunk sums are merged per tensor in chunk order, the tensor means in tensor order, after the
// parallel region. The result is bit-identical for any number of threads.
//
// beta == 0: nothing is stored (the gradients stay bit-identical, -0.0 and float64 values
// included); the Fisher increment is then taken from the gradients as they are. beta is a CPU
// tensor here, so reading it is a memory read, not a device sync.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common/ops.h"
#include "cpu/chunks.h"
#include "cpu/cpu_kernels.h"

namespace mmmod {
namespace proximal_cpu {
namespace {

constexpr int kLanes = 8;  // independent float64 accumulators per chunk (fixed pattern)

using cpu::Chunk;

// Sum of squares of one chunk in float64, lane j taking elements j, j + kLanes, ... then the
// lanes added pairwise in a fixed tree; with write, the corrected values are stored first.
template <typename T>
double chunk_pass(T* g, const T* p, const T* p0, int64_t n, float beta, bool write) {
  double acc[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  if (write) {
    for (; i + kLanes <= n; i += kLanes) {
      for (int j = 0; j < kLanes; ++j) {
        const float d = static_cast<float>(p[i + j]) - static_cast<float>(p0[i + j]);
        const float v = static_cast<float>(g[i + j]) + beta * d;
        const T r = static_cast<T>(v);
        g[i + j] = r;
        const double x = cpu::float64_of(r);
        acc[j] += x * x;
      }
    }
    for (int j = 0; i < n; ++i, ++j) {
      const float d = static_cast<float>(p[i]) - static_cast<float>(p0[i]);
      const T r = static_cast<T>(static_cast<float>(g[i]) + beta * d);
      g[i] = r;
      const double x = cpu::float64_of(r);
      acc[j] += x * x;
    }
  } else {
    for (; i + kLanes <= n; i += kLanes) {
      for (int j = 0; j < kLanes; ++j) {
        const double x = cpu::float64_of(g[i + j]);
        acc[j] += x * x;
      }
    }
    for (int j = 0; i < n; ++i, ++j) {
      const double x = cpu::float64_of(g[i]);
      acc[j] += x * x;
    }
  }
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

}  // namespace

at::Tensor proximal_cpu(at::TensorList grads, at::TensorList params, at::TensorList snapshots,
                        const at::Tensor& beta) {
  check_proximal_inputs(grads, params, snapshots, beta);
  const float b = beta.to(at::kFloat).item<float>();  // a CPU tensor: a memory read
  const bool write = b != 0.0f;                        // NaN beta writes NaN, as the reference
  const size_t nt = grads.size();
  // contiguous views of every operand (copies only for non-contiguous tensors, written back below)
  std::vector<at::Tensor> g(nt), p(nt), p0(nt);
  for (size_t t = 0; t < nt; ++t) {
    if (grads[t].numel() == 0) continue;
    g[t] = grads[t].contiguous();
    p[t] = params[t].contiguous();
    p0[t] = snapshots[t].contiguous();
  }
  const std::vector<Chunk> chunks = cpu::make_chunks(grads);
  std::vector<double> partial(chunks.size(), 0.0);
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const Chunk& ch = chunks[c];
      AT_DISPATCH_FLOATING_TYPES_AND2(
          at::kHalf, at::kBFloat16, g[ch.tensor].scalar_type(), "mmmod_proximal_cpu", [&] {
            partial[c] = chunk_pass<scalar_t>(g[ch.tensor].mutable_data_ptr<scalar_t>() + ch.start,
                                              p[ch.tensor].const_data_ptr<scalar_t>() + ch.start,
                                              p0[ch.tensor].const_data_ptr<scalar_t>() + ch.start,
                                              ch.len, b, write);
          });
    }
  });
  // fixed-order merge: chunks of a tensor in order, then the tensors' means in order
  double fisher = 0.0;
  size_t c = 0;
  for (size_t t = 0; t < nt; ++t) {
    const int64_t n = grads[t].numel();
    if (n == 0) continue;
    double sum = 0.0;
    for (; c < chunks.size() && chunks[c].tensor == static_cast<int64_t>(t); ++c) sum += partial[c];
    if (grads[t].dim() >= 2) fisher += sum / static_cast<double>(n);
    if (write && !g[t].is_same(grads[t])) grads[t].copy_(g[t]);
  }
  return at::scalar_tensor(fisher, beta.options().dtype(at::kDouble));
}

}  // namespace proximal_cpu
}  // namespace mmmod

TORCH_LIBRARY_IMPL(mmmod, CPU, m) {
  m.impl("proximal_", &mmmod::proximal_cpu::proximal_cpu);
}
