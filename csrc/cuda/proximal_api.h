// Plain interface between the torch glue of InfoReg's proximal op (proximal_cuda.cpp, host
// compiler) and its CUDA kernels (proximal.cu, nvcc). Only fixed-width integers and raw pointers
// cross the launcher; streams travel as void* (cudaStream_t). No CUDA or torch header.
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "cuda/multi_tensor.h"

// Elements per chunk (one thread block per chunk); fixed, so the Fisher sums are combined in the
// same order on every GPU.
#define MMMOD_PROX_CHUNK 65536

// The op's table is the common one (multi_tensor.h) with three pointers per entry (gradient,
// parameter, snapshot: one size and dtype, so one chunk list serves all three) and two extra
// words: the dtype code (cuda_api.h's MMMOD_F32 ...) and the Fisher flag (1: the tensor has
// >= 2 dims and counts for the Fisher increment). Empty tensors are left out of it.
namespace mmmod {
namespace prox {
enum { kGrad = 0, kParam = 1, kSnapshot = 2, kDepth = 3 };
enum { kDtype = 0, kFisher = 1, kExtra = 2 };
using Table = mt::TensorListTable<kDepth, kExtra>;
}  // namespace prox
}  // namespace mmmod

#ifdef __cplusplus
extern "C" {
#endif

// For every tensor of the table: g <- T(float(g) + beta (float(p) - float(p0))) (each operation
// rounded, no FMA), not stored at all when *beta == 0; then out[0] = sum over tensors with
// fisher = 1 of (sum of the squares of the stored values, float64) / numel, in a fixed order.
// table, beta, partial (nchunks doubles of workspace) and out are device pointers; beta is read
// on the device (no host sync). Two launches.
int mmmod_cuda_proximal(const void* table, int64_t ntensors, int64_t nchunks, const float* beta,
                        double* partial, double* out, void* stream);

#ifdef __cplusplus
}
#endif
