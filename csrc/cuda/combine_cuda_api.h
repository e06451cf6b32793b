// Plain C interface between the torch glue of MMPareto's combine ops (combine_cuda.cpp, host
// compiler) and their CUDA kernels (combine.cu, nvcc). Only fixed-width integers and raw
// pointers cross it; streams travel as void* (cudaStream_t). No CUDA or torch header.
#pragma once

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// dtype codes of the table's tensor entries (the same numbering as cuda_api.h)
enum { MMMOD_COMB_F32 = 0, MMMOD_COMB_F16 = 1, MMMOD_COMB_BF16 = 2, MMMOD_COMB_F64 = 3 };

// Elements per chunk (one thread block per chunk); fixed, so the moments are summed in the
// same order on every GPU.
#define MMMOD_COMB_CHUNK 65536

// The device table of one call: a header {ntensors, nchunks}, then ntensors MmmodCombTensor,
// then nchunks MmmodCombChunk (all int64 words). Every tensor of the op has an entry (an empty
// one has no chunk), so entry t is row t of the moments and factors.
typedef struct {
  int64_t fused;        // data pointers (contiguous tensors)
  int64_t summed;
  int64_t numel;
  int64_t first_chunk;  // its chunks are first_chunk .. first_chunk + chunk_count - 1
  int64_t chunk_count;
  int64_t dtype;        // MMMOD_COMB_*
} MmmodCombTensor;

typedef struct {
  int64_t tensor;  // index into the tensor entries
  int64_t start;   // first element of the chunk in that tensor
} MmmodCombChunk;

// int64 words of a table with ntensors tensors and nchunks chunks.
int64_t mmmod_comb_table_words(int64_t ntensors, int64_t nchunks);

// Whether work is being captured into a CUDA graph on this stream (*capturing = 0 or 1).
int mmmod_comb_stream_is_capturing(void* stream, int* capturing);

// moments[t] = (|a|^2, |b|^2, a.b) in float64, a = g_mm * scale (scale: device pointer to one
// double, or null for 1), b = g_sum - a; partial: 3 * nchunks doubles of workspace. Two launches.
int mmmod_cuda_pair_moments(const void* table, int64_t ntensors, int64_t nchunks,
                            const double* scale, double* partial, double* moments, void* stream);

// From moments [ntensors, 3]: weights [2] and factors [ntensors, 2] (workspace) as
// mmmod/reference/combine.py computes them, then g_sum <- c_fused (scale g_mm) + c_summed g_sum.
// Two launches.
int mmmod_cuda_combine(const void* table, int64_t ntensors, int64_t nchunks, const double* moments,
                       double gamma, const double* scale, double* factors, double* weights,
                       void* stream);

const char* mmmod_comb_error_string(int code);

#ifdef __cplusplus
}
#endif
