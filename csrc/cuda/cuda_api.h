// Plain C interface between the torch glue (cuda_ops.cpp, compiled by the host compiler) and the
// CUDA kernels (kernels.cu, compiled by nvcc). Only fixed-width integers and raw pointers cross
// the launchers; streams travel as void* (cudaStream_t). Nothing here includes a CUDA or torch header.
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "cuda/multi_tensor.h"

#ifdef __cplusplus
extern "C" {
#endif

enum { MMMOD_F32 = 0, MMMOD_F16 = 1, MMMOD_BF16 = 2, MMMOD_F64 = 3 };

// Elements per chunk of the CUDA kernels (one thread block per chunk); fixed, so per-tensor
// statistics are combined in the same order on every GPU.
#define MMMOD_CUDA_CHUNK 65536

#ifdef __cplusplus
}
#endif

// The metadata table of one bucket on the device is the common one (multi_tensor.h) with one
// pointer per entry (the gradient) and one extra word, the first element of the tensor in the
// modality's Philox stream: {ptr, numel, offset, first_chunk, chunk_count}, chunks of
// MMMOD_CUDA_CHUNK elements (an empty tensor owns none). It describes only where the data lives
// (pointers, sizes, stream offsets), never seed/step/modality, so one table can be built once
// per bucket, kept on the device and reused by every step and by CUDA-graph replays
// (mmmod::bucket_table; its size is mmmod._ops.table_words: 2 + 5 T + 2 C words).
namespace mmmod {
namespace bucket {
enum { kGrad = 0, kDepth = 1 };
enum { kOffset = 0, kExtra = 1 };
using Table = mt::TensorListTable<kDepth, kExtra>;
static_assert(mt::table_words<kDepth, kExtra>(1, 1) == 2 + 5 + 2,
              "the bucket table's word count is mmmod._ops.table_words'");
}  // namespace bucket
}  // namespace mmmod

#ifdef __cplusplus
extern "C" {
#endif

// Bytes of device workspace the launchers below need for a table of this size.
size_t mmmod_cuda_workspace_bytes(int64_t ntensors, int64_t nchunks);

// Whether work is being captured into a CUDA graph on this stream (*capturing = 0 or 1).
int mmmod_cuda_stream_is_capturing(void* stream, int* capturing);

// g <- k g (+ gate sigma n) in place for every tensor of the table. table, k, gate, workspace
// are device pointers; k and gate are read on the device (no host sync). The Philox counter word
// 2 is step_ptr[0] mod 2^32 when step_ptr (a device int64) is not null, read by the kernel (so a
// CUDA-graph replay sees the counter's current value), else step.
int mmmod_cuda_modulate(const void* table, int64_t ntensors, int64_t nchunks, int dtype,
                        const float* k, const float* gate, int noise, int scaled, uint64_t seed,
                        const int64_t* step_ptr, uint32_t step, uint32_t modality,
                        void* workspace, void* stream);

// g <- k g + gate sigma[t] n in place for every tensor t of the table, with sigma given
// (float32 [ntensors] on the device: each tensor's noise scale before the gate; a non-finite
// entry gets no noise): the noise pass of mmmod_cuda_modulate without its statistics, same
// bits for the same sigma. k, gate, sigma, step_ptr as there; no workspace.
int mmmod_cuda_modulate_sigma(const void* table, int64_t ntensors, int64_t nchunks, int dtype,
                              const float* k, const float* gate, const float* sigma, uint64_t seed,
                              const int64_t* step_ptr, uint32_t step, uint32_t modality,
                              void* stream);

// Unbiased float64 std of every tensor of the table into out[ntensors] (device).
int mmmod_cuda_bucket_std(const void* table, int64_t ntensors, int64_t nchunks, int dtype,
                          void* workspace, double* out, void* stream);

// (count, mean, M2) of every tensor of the table in float64 into out[3 * ntensors] (device,
// row-major [ntensors, 3]; (0, 0, 0) for an empty tensor): the statistics launch of
// mmmod_cuda_modulate, then one block per tensor merging its chunks in the std kernel's fixed
// order (no atomics: the same bits on every run and GPU). workspace as mmmod_cuda_modulate's.
int mmmod_cuda_bucket_moments(const void* table, int64_t ntensors, int64_t nchunks, int dtype,
                              void* workspace, double* out, void* stream);

// Scores of up to MMMOD_CUDA_SCORES_MAX_M modalities per call (two launches: a warp per row,
// then one block per modality adding the row blocks' partials in a fixed order; no atomics).
#define MMMOD_CUDA_SCORES_MAX_M 16

// One modality's logits: a [B, C] matrix of dtype (an MMMOD_* code) with element strides s0, s1.
typedef struct {
  int64_t ptr;  // device data pointer
  int64_t dtype;
  int64_t C;
  int64_t s0;
  int64_t s1;
} MmmodScoresModality;

// Bytes of device workspace mmmod_cuda_scores needs for batch size B and M modalities (M is
// capped at MMMOD_CUDA_SCORES_MAX_M: one workspace serves every call of a larger M).
size_t mmmod_cuda_scores_workspace_bytes(int64_t B, int64_t M);

// out[m] = sum_i softmax(z_m)[i, labels[i]] in float64 per row, written as float32, for
// m < M <= MMMOD_CUDA_SCORES_MAX_M (host array mods, passed to the kernel by value); NaN for a
// label outside [0, C_m) or a NaN in the row; zeros for B == 0. labels: device int64 [B],
// contiguous; workspace: device, mmmod_cuda_scores_workspace_bytes(B, M) bytes.
int mmmod_cuda_scores(const MmmodScoresModality* mods, int64_t M, int64_t B, const int64_t* labels,
                      float* out, void* workspace, void* stream);

// k[M] from scores s[M] by rule (a NativeRule code, common/native_rules.h), on the device.
int mmmod_cuda_coefficients(const float* s, float* k, int64_t M, int rule, float alpha,
                            float beta_max, void* stream);

// out[i] = normal of stream element offset + i, i < n.
int mmmod_cuda_philox_normal(float* out, int64_t n, uint64_t seed, uint32_t step,
                             uint32_t modality, uint64_t offset, void* stream);

const char* mmmod_cuda_error_string(int code);

#ifdef __cplusplus
}
#endif
