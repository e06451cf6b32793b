// Plain C interface between the torch glue of MMPareto's combine ops (combine_cuda.cpp, host
// compiler) and their CUDA kernels (combine.cu, nvcc). Only fixed-width integers and raw
// pointers cross the launchers; streams travel as void* (cudaStream_t). No CUDA or torch header.
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "cuda/multi_tensor.h"

#ifdef __cplusplus
extern "C" {
#endif

// Elements per chunk (one thread block per chunk); fixed, so the moments are summed in the
// same order on every GPU.
#define MMMOD_COMB_CHUNK 65536

#ifdef __cplusplus
}
#endif

// The ops' table is the common one (multi_tensor.h) with two pointers per entry (the fused
// gradient g_mm and the summed one g_sum, one size and dtype) and one extra word, the dtype code
// (cuda_api.h's MMMOD_F32 ...). Every tensor of the op has an entry (an empty one has no chunk),
// so entry t is row t of the moments and factors.
namespace mmmod {
namespace comb {
enum { kFused = 0, kSummed = 1, kDepth = 2 };
enum { kDtype = 0, kExtra = 1 };
using Table = mt::TensorListTable<kDepth, kExtra>;
}  // namespace comb
}  // namespace mmmod

#ifdef __cplusplus
extern "C" {
#endif

// moments[t] = (|a|^2, |b|^2, a.b) in float64, a = g_mm * scale (scale: device pointer to one
// double, or null for 1), b = g_sum - a; partial: 3 * nchunks doubles of workspace. Two launches.
int mmmod_cuda_pair_moments(const void* table, int64_t ntensors, int64_t nchunks,
                            const double* scale, double* partial, double* moments, void* stream);

// From moments [ntensors, 3]: per modality (groups[g] consecutive tensors, a host array of
// ngroups counts adding up to ntensors) its weights [ngroups, 2] and its tensors' factors
// [ntensors, 2] (workspace) as mmmod/reference/combine.py computes them, then
// g_sum <- c_fused (scale g_mm) + c_summed g_sum. ngroups + 1 launches.
int mmmod_cuda_combine(const void* table, int64_t ntensors, int64_t nchunks, const double* moments,
                       const int64_t* groups, int64_t ngroups, double gamma, const double* scale,
                       double* factors, double* weights, void* stream);

#ifdef __cplusplus
}
#endif
