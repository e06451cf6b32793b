// Plain C interface between the torch glue of InfoReg's proximal op (proximal_cuda.cpp, host
// compiler) and its CUDA kernels (proximal.cu, nvcc). Only fixed-width integers and raw pointers
// cross it; streams travel as void* (cudaStream_t). No CUDA or torch header is included.
#pragma once

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// dtype codes of the table's tensor entries (the same numbering as cuda_api.h)
enum { MMMOD_PROX_F32 = 0, MMMOD_PROX_F16 = 1, MMMOD_PROX_BF16 = 2, MMMOD_PROX_F64 = 3 };

// Elements per chunk (one thread block per chunk); fixed, so the Fisher sums are combined in the
// same order on every GPU.
#define MMMOD_PROX_CHUNK 65536

// The device table of one call: a header {ntensors, nchunks}, then ntensors MmmodProxTensor,
// then nchunks MmmodProxChunk (all int64 words). g, theta and the snapshot of a tensor share its
// size and dtype, so one chunk list serves all three.
typedef struct {
  int64_t grad;         // data pointers (contiguous tensors)
  int64_t param;
  int64_t snapshot;
  int64_t numel;        // > 0: empty tensors are left out of the table
  int64_t first_chunk;  // its chunks are first_chunk .. first_chunk + chunk_count - 1
  int64_t chunk_count;
  int64_t dtype;        // MMMOD_PROX_*
  int64_t fisher;       // 1: the tensor has >= 2 dims and counts for the Fisher increment
} MmmodProxTensor;

typedef struct {
  int64_t tensor;  // index into the tensor entries
  int64_t start;   // first element of the chunk in that tensor (64-bit: > 2^31 elements)
} MmmodProxChunk;

// int64 words of a table with ntensors tensors and nchunks chunks.
int64_t mmmod_prox_table_words(int64_t ntensors, int64_t nchunks);

// Whether work is being captured into a CUDA graph on this stream (*capturing = 0 or 1).
int mmmod_prox_stream_is_capturing(void* stream, int* capturing);

// For every tensor of the table: g <- T(float(g) + beta (float(p) - float(p0))) (each operation
// rounded, no FMA), not stored at all when *beta == 0; then out[0] = sum over tensors with
// fisher = 1 of (sum of the squares of the stored values, float64) / numel, in a fixed order.
// table, beta, partial (nchunks doubles of workspace) and out are device pointers; beta is read
// on the device (no host sync). Two launches.
int mmmod_cuda_proximal(const void* table, int64_t ntensors, int64_t nchunks, const float* beta,
                        double* partial, double* out, void* stream);

const char* mmmod_prox_error_string(int code);

#ifdef __cplusplus
}
#endif
