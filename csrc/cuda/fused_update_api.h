// Plain C interface between the torch glue of the fused modulated update (fused_update_cuda.cpp,
// host compiler) and its CUDA kernels (fused_update.cu, nvcc). Only fixed-width integers, doubles
// and raw pointers cross the launchers; streams travel as void* (cudaStream_t). No CUDA or torch header.
// dtype codes are cuda_api.h's (MMMOD_F32, MMMOD_F16, MMMOD_BF16, MMMOD_F64).
#pragma once

#include <stdint.h>

#include "cuda/multi_tensor.h"

#ifdef __cplusplus
extern "C" {
#endif

// Elements per chunk (one thread block per chunk; a multiple of 4, so a chunk of a tensor whose
// stream offset is a multiple of 4 starts on a Philox group). Smaller than MMMOD_CUDA_CHUNK: the
// update streams 3 to 5 arrays per element and has no per-chunk reduction, so more, shorter
// blocks keep every SM busy (22 M elements are ~1,400 blocks, not ~340).
#define MMMOD_FUSED_CHUNK 16384

#ifdef __cplusplus
}
#endif

// The op's table is the common one (multi_tensor.h) with four pointers per entry and four extra
// words. An empty tensor keeps its entry (so sigma[t] is entry t's) and owns no chunk, so
// nothing dereferences its pointers.
//   ptr:   param, grad (read only: the raw gradient; the modulated one is never stored), state1
//          (SGD: momentum buffer, 0 without momentum; Adam: exp_avg), state2 (Adam: exp_avg_sq;
//          SGD: 0): data pointers of contiguous tensors of one dtype
//   extra: offset (first element of the tensor in the modality's Philox stream), flag (SGD: 1
//          when the momentum buffer holds a value, else it starts as the grad), and the bits of
//          two doubles: neg_step_size (Adam: -(lr / (1 - beta1^t)), the Python float of torch's
//          step) and bc2_sqrt (Adam: (1 - beta2^t) ** 0.5, idem)
namespace mmmod {
namespace fused {
enum { kParam = 0, kGrad = 1, kState1 = 2, kState2 = 3, kDepth = 4 };
enum { kOffset = 0, kFlag = 1, kNegStepSize = 2, kBc2Sqrt = 3, kExtra = 4 };
using Table = mt::TensorListTable<kDepth, kExtra>;
}  // namespace fused
}  // namespace mmmod

#ifdef __cplusplus
extern "C" {
#endif

// The hyperparameters of one call, as the Python floats of torch's step (double); the kernels
// round them to the arithmetic type (float32, or float64 for float64 tensors) as torch's CUDA
// kernels do with a Python scalar.
typedef struct {
  double neg_lr;               // -lr
  double weight_decay;
  double momentum;
  double one_minus_dampening;  // 1 - dampening
  int32_t maximize, decay, use_momentum, nesterov;
} MmmodSgdScalars;

typedef struct {
  double weight_decay;
  double one_minus_beta1;  // lerp weight
  double beta2;
  double one_minus_beta2;  // addcmul value
  double eps;
  double decay_mul;        // 1 - lr * weight_decay (decoupled decay)
  int32_t maximize, decay, decoupled, pad;
} MmmodAdamScalars;

// int64 words of a table with ntensors tensors and nchunks chunks.
int64_t mmmod_fused_table_words(int64_t ntensors, int64_t nchunks);

// One launch over every chunk of the table: per element the modulated gradient
// k g + sigma[t] n (noise: sigma != 0 pointer) or k g, rounded to the tensor's dtype, then torch's
// foreach SGD / Adam arithmetic on the parameter and its state; with update_scale (a device
// float32, may be null) the parameter becomes p0 + u (p - p0). table, k, sigma, update_scale are
// device pointers read by the kernel (no host sync). Returns the launch error (0: none) or
// cudaErrorInvalidValue for an unknown dtype code.
int mmmod_cuda_fused_sgd(const void* table, int64_t ntensors, int64_t nchunks, int dtype,
                         const float* k, const float* sigma, const float* update_scale,
                         MmmodSgdScalars scalars, uint64_t seed, uint32_t step,
                         uint32_t modality, void* stream);

int mmmod_cuda_fused_adam(const void* table, int64_t ntensors, int64_t nchunks, int dtype,
                          const float* k, const float* sigma, const float* update_scale,
                          MmmodAdamScalars scalars, uint64_t seed, uint32_t step,
                          uint32_t modality, void* stream);

#ifdef __cplusplus
}
#endif
