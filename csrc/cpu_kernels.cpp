// CPU implementations of the mmmod ops (dispatch key CPU).
//
// Determinism: work is split into fixed chunks of kChunkCpu elements (never by thread count);
// per-chunk statistics are stored in their own slots and merged per tensor in chunk order, and
// the modulation is element-wise, so results are bit-identical for any number of threads.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "box_muller_vec.h"
#include "coefficients.h"
#include "cpu_kernels.h"
#include "ops.h"
#include "philox.h"

namespace mmmod {
namespace cpu {

void box_muller_batch_default(const float* ua, const float* ub, float* c, float* s, int64_t n) {
  box_muller_batch_vec(ua, ub, c, s, n);
}

namespace {

BoxMullerFn pick_box_muller() {
#if defined(MMMOD_HAVE_AVX2_TU) && (defined(__x86_64__) || defined(__i386__))
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    return box_muller_batch_avx2;
  }
#endif
  return box_muller_batch_default;
}

const BoxMullerFn box_muller_batch = pick_box_muller();

constexpr int64_t kGroups = 64;  // Philox counter groups (4 normals each) per noise block

// The 4 * kGroups normals of counter groups q0 .. q0 + kGroups - 1, in stream order.
void normals_block(uint64_t seed, uint32_t step, uint32_t modality, uint64_t q0, float* z) {
  alignas(64) float ua[2 * kGroups], ub[2 * kGroups], c[2 * kGroups], s[2 * kGroups];
  for (int64_t j = 0; j < kGroups; ++j) {
    const U32x4 w = philox_words(seed, step, modality, q0 + static_cast<uint64_t>(j));
    ua[2 * j] = uint32_to_uniform(w.x);
    ub[2 * j] = uint32_to_uniform(w.y);
    ua[2 * j + 1] = uint32_to_uniform(w.z);
    ub[2 * j + 1] = uint32_to_uniform(w.w);
  }
  box_muller_batch(ua, ub, c, s, 2 * kGroups);
  for (int64_t j = 0; j < kGroups; ++j) {
    z[4 * j] = c[2 * j];
    z[4 * j + 1] = s[2 * j];
    z[4 * j + 2] = c[2 * j + 1];
    z[4 * j + 3] = s[2 * j + 1];
  }
}

// Calls f(i, n, z) for runs of elements i .. i + n - 1 of a range starting at stream position p0,
// z[j] being the normal of element i + j.
template <typename F>
void for_each_noise_run(uint64_t seed, uint32_t step, uint32_t modality, uint64_t p0, int64_t len,
                        F&& f) {
  alignas(64) float z[4 * kGroups];
  uint64_t q = p0 >> 2;
  int64_t lead = static_cast<int64_t>(p0 & 3);
  int64_t i = 0;
  while (i < len) {
    normals_block(seed, step, modality, q, z);
    const int64_t n = std::min<int64_t>(4 * kGroups - lead, len - i);
    f(i, n, z + lead);
    i += n;
    q += kGroups;
    lead = 0;
  }
}

struct Chunk {
  int64_t tensor;
  int64_t start;
  int64_t len;
};

std::vector<Chunk> make_chunks(at::TensorList tensors) {
  std::vector<Chunk> chunks;
  for (size_t t = 0; t < tensors.size(); ++t) {
    const int64_t n = tensors[t].numel();
    for (int64_t s = 0; s < n; s += kChunkCpu) {
      chunks.push_back({static_cast<int64_t>(t), s, std::min(kChunkCpu, n - s)});
    }
  }
  return chunks;
}

// (n, mean, M2) of one chunk: two passes over cache-resident data, float64, fixed order.
template <typename T>
Moments chunk_moments(const T* x, int64_t n) {
  double a0 = 0, a1 = 0, a2 = 0, a3 = 0;
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    a0 += static_cast<double>(static_cast<float>(x[i]));
    a1 += static_cast<double>(static_cast<float>(x[i + 1]));
    a2 += static_cast<double>(static_cast<float>(x[i + 2]));
    a3 += static_cast<double>(static_cast<float>(x[i + 3]));
  }
  for (; i < n; ++i) a0 += static_cast<double>(static_cast<float>(x[i]));
  const double mean = ((a0 + a1) + (a2 + a3)) / static_cast<double>(n);
  double q0 = 0, q1 = 0, q2 = 0, q3 = 0;
  i = 0;
  for (; i + 4 <= n; i += 4) {
    const double d0 = static_cast<double>(static_cast<float>(x[i])) - mean;
    const double d1 = static_cast<double>(static_cast<float>(x[i + 1])) - mean;
    const double d2 = static_cast<double>(static_cast<float>(x[i + 2])) - mean;
    const double d3 = static_cast<double>(static_cast<float>(x[i + 3])) - mean;
    q0 += d0 * d0;
    q1 += d1 * d1;
    q2 += d2 * d2;
    q3 += d3 * d3;
  }
  for (; i < n; ++i) {
    const double d = static_cast<double>(static_cast<float>(x[i])) - mean;
    q0 += d * d;
  }
  return {static_cast<double>(n), mean, (q0 + q1) + (q2 + q3)};
}

// float64 input: statistics on the float64 values themselves (the reference's g.double()).
template <>
Moments chunk_moments<double>(const double* x, int64_t n) {
  double a0 = 0, a1 = 0;
  int64_t i = 0;
  for (; i + 2 <= n; i += 2) {
    a0 += x[i];
    a1 += x[i + 1];
  }
  for (; i < n; ++i) a0 += x[i];
  const double mean = (a0 + a1) / static_cast<double>(n);
  double q0 = 0, q1 = 0;
  i = 0;
  for (; i + 2 <= n; i += 2) {
    q0 += (x[i] - mean) * (x[i] - mean);
    q1 += (x[i + 1] - mean) * (x[i + 1] - mean);
  }
  for (; i < n; ++i) q0 += (x[i] - mean) * (x[i] - mean);
  return {static_cast<double>(n), mean, q0 + q1};
}

// Per-tensor moments of a bucket: per-chunk partials in parallel, merged in chunk order.
template <typename T>
std::vector<Moments> bucket_moments(at::TensorList tensors, const std::vector<Chunk>& chunks) {
  std::vector<Moments> part(chunks.size());
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) {
      const Chunk& ch = chunks[c];
      const T* x = tensors[ch.tensor].const_data_ptr<T>() + ch.start;
      part[c] = chunk_moments<T>(x, ch.len);
    }
  });
  std::vector<Moments> out(tensors.size(), Moments{0, 0, 0});
  for (size_t c = 0; c < chunks.size(); ++c) {
    out[chunks[c].tensor] = moments_merge(out[chunks[c].tensor], part[c]);
  }
  return out;
}

template <typename T>
void modulate_impl(at::TensorList tensors, at::IntArrayRef offsets, float k, float gate,
                   bool noise, bool scaled, uint64_t seed, uint32_t step, uint32_t modality) {
  const std::vector<Chunk> chunks = make_chunks(tensors);
  const int64_t nchunks = static_cast<int64_t>(chunks.size());
  if (nchunks == 0) return;
  if (!noise) {
    at::parallel_for(0, nchunks, 1, [&](int64_t b, int64_t e) {
      for (int64_t c = b; c < e; ++c) {
        const Chunk& ch = chunks[c];
        T* x = tensors[ch.tensor].mutable_data_ptr<T>() + ch.start;
        for (int64_t i = 0; i < ch.len; ++i) {
          x[i] = static_cast<T>(scale_value(static_cast<float>(x[i]), k));
        }
      }
    });
    return;
  }
  const std::vector<Moments> mom = bucket_moments<T>(tensors, chunks);
  std::vector<float> sigma(tensors.size());
  for (size_t t = 0; t < tensors.size(); ++t) sigma[t] = sigma_from_moments(mom[t], scaled, k, gate);
  at::parallel_for(0, nchunks, 1, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) {
      const Chunk& ch = chunks[c];
      T* x = tensors[ch.tensor].mutable_data_ptr<T>() + ch.start;
      const float sg = sigma[ch.tensor];
      const uint64_t p0 = static_cast<uint64_t>(offsets[ch.tensor]) + static_cast<uint64_t>(ch.start);
      for_each_noise_run(seed, step, modality, p0, ch.len, [&](int64_t i, int64_t n, const float* z) {
        T* y = x + i;
        for (int64_t j = 0; j < n; ++j) {
          y[j] = static_cast<T>(modulate_value(static_cast<float>(y[j]), k, sg, z[j]));
        }
      });
    }
  });
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// ops

at::Tensor scores_cpu(at::TensorList logits, const at::Tensor& labels) {
  check_scores_inputs(logits, labels);
  const int64_t M = static_cast<int64_t>(logits.size());
  at::Tensor out = at::empty({M}, labels.options().dtype(at::kFloat));
  const at::Tensor y = labels.to(at::kLong).contiguous();
  const int64_t* yp = y.const_data_ptr<int64_t>();
  const int64_t B = labels.size(0);
  constexpr int64_t kRows = 64;
  const int64_t nblk = (B + kRows - 1) / kRows;
  float* op = out.mutable_data_ptr<float>();
  for (int64_t m = 0; m < M; ++m) {
    const at::Tensor& z = logits[m];
    const int64_t C = z.size(1), s0 = z.stride(0), s1 = z.stride(1);
    std::vector<double> part(nblk, 0.0);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "mmmod_scores_cpu", [&] {
      const scalar_t* zp = z.const_data_ptr<scalar_t>();
      at::parallel_for(0, nblk, 1, [&](int64_t b, int64_t e) {
        for (int64_t blk = b; blk < e; ++blk) {
          double acc = 0.0;
          for (int64_t i = blk * kRows; i < std::min(B, (blk + 1) * kRows); ++i) {
            const int64_t yi = yp[i];
            if (yi < 0 || yi >= C) {
              acc += std::numeric_limits<double>::quiet_NaN();
              continue;
            }
            const scalar_t* row = zp + i * s0;
            // logsumexp as torch defines it: an infinite max is not subtracted
            double mx = -std::numeric_limits<double>::infinity();
            bool nan = false;
            for (int64_t c = 0; c < C; ++c) {
              const double v = static_cast<double>(static_cast<float>(row[c * s1]));
              nan = nan || std::isnan(v);
              mx = v > mx ? v : mx;
            }
            if (std::isinf(mx)) mx = 0.0;
            double se = 0.0;
            for (int64_t c = 0; c < C; ++c) {
              se += std::exp(static_cast<double>(static_cast<float>(row[c * s1])) - mx);
            }
            const double lse = nan ? std::numeric_limits<double>::quiet_NaN() : mx + std::log(se);
            acc += std::exp(static_cast<double>(static_cast<float>(row[yi * s1])) - lse);
          }
          part[blk] = acc;
        }
      });
    });
    double total = 0.0;
    for (int64_t blk = 0; blk < nblk; ++blk) total += part[blk];
    op[m] = static_cast<float>(total);
  }
  return out;
}

at::Tensor coefficients_cpu(const at::Tensor& scores, c10::string_view method, double alpha,
                            double beta_max) {
  const int code = method_code(std::string(method));
  TORCH_CHECK_VALUE(scores.dim() == 1 && scores.size(0) >= 2,
                    "mmmod.coefficients: scores must be 1-D with M >= 2, got ", scores.sizes());
  const at::Tensor s = scores.to(at::kFloat).contiguous();
  const int64_t M = s.size(0);
  at::Tensor x = at::empty({M}, s.options());
  coefficient_tanh_args(s.const_data_ptr<float>(), x.mutable_data_ptr<float>(), M, code,
                        static_cast<float>(alpha));
  // at::tanh: the very kernel the reference's torch.tanh runs, so k is bit-identical to it
  const at::Tensor t = at::tanh(x);
  at::Tensor k = at::empty({M}, s.options());
  coefficient_finish(s.const_data_ptr<float>(), t.const_data_ptr<float>(), k.mutable_data_ptr<float>(),
                     M, code, static_cast<float>(beta_max));
  return k;
}

void modulate_cpu(at::TensorList tensors, at::IntArrayRef offsets, const at::Tensor& k,
                  const at::Tensor& gate, bool noise, bool scaled, int64_t seed, int64_t step,
                  int64_t modality) {
  check_bucket(tensors, offsets, k, gate);
  if (tensors.empty()) return;
  const float kv = k.item<float>();
  const float gv = gate.item<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tensors[0].scalar_type(), "mmmod_modulate_cpu", [&] {
    modulate_impl<scalar_t>(tensors, offsets, kv, gv, noise, scaled, static_cast<uint64_t>(seed),
                            static_cast<uint32_t>(step), static_cast<uint32_t>(modality));
  });
}

at::Tensor bucket_std_cpu(at::TensorList tensors) {
  at::Tensor out = at::zeros({static_cast<int64_t>(tensors.size())}, at::dtype(at::kDouble));
  if (tensors.empty()) return out;
  std::vector<at::Tensor> flat;
  for (size_t i = 0; i < tensors.size(); ++i) {
    TORCH_CHECK_VALUE(tensors[i].scalar_type() == tensors[0].scalar_type(),
                      "mmmod.bucket_std: tensors must share one dtype");
    flat.push_back(tensors[i].contiguous());
  }
  const std::vector<Chunk> chunks = make_chunks(flat);
  double* op = out.mutable_data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, flat[0].scalar_type(), "mmmod_bucket_std_cpu", [&] {
    const std::vector<Moments> mom = bucket_moments<scalar_t>(flat, chunks);
    for (size_t t = 0; t < flat.size(); ++t) {
      op[t] = mom[t].n >= 2 ? std::sqrt(mom[t].m2 / (mom[t].n - 1.0)) : 0.0;
    }
  });
  return out;
}

void philox_normal_cpu(const at::Tensor& out, int64_t seed, int64_t step, int64_t modality,
                       int64_t offset) {
  TORCH_CHECK_VALUE(out.scalar_type() == at::kFloat && out.is_contiguous(),
                    "mmmod.philox_normal_: out must be a contiguous float32 tensor");
  TORCH_CHECK_VALUE(offset >= 0, "mmmod.philox_normal_: negative offset");
  const int64_t n = out.numel();
  float* p = out.mutable_data_ptr<float>();
  const int64_t nchunks = (n + kChunkCpu - 1) / kChunkCpu;
  at::parallel_for(0, nchunks, 1, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) {
      const int64_t start = c * kChunkCpu;
      const int64_t len = std::min(kChunkCpu, n - start);
      for_each_noise_run(static_cast<uint64_t>(seed), static_cast<uint32_t>(step),
                         static_cast<uint32_t>(modality),
                         static_cast<uint64_t>(offset) + static_cast<uint64_t>(start), len,
                         [&](int64_t i, int64_t m, const float* z) {
                           std::copy(z, z + m, p + start + i);
                         });
    }
  });
}

}  // namespace cpu
}  // namespace mmmod

TORCH_LIBRARY_IMPL(mmmod, CPU, m) {
  m.impl("scores", &mmmod::cpu::scores_cpu);
  m.impl("coefficients", &mmmod::cpu::coefficients_cpu);
  m.impl("modulate_", &mmmod::cpu::modulate_cpu);
  m.impl("bucket_std", &mmmod::cpu::bucket_std_cpu);
  m.impl("philox_normal_", &mmmod::cpu::philox_normal_cpu);
}
