// CPU kernels of MMPareto's gradient combine (ops _pair_moments and combine_, defined in
// mmmod/_ops/__init__.py; the reference is mmmod/reference/combine.py, docs/semantics.md
// section 11).
//
// _pair_moments: one read of each (fused, summed) gradient pair; per element, in float64,
// a = double(g_mm) * fused_scale, b = double(g_sum) - a (each one rounding, as the reference),
// and the rows (|a|^2, |b|^2, a.b) of every tensor. combine_: from those rows the modality's
// weights and each tensor's factors (mmpareto_weights / mmpareto_factors, the same float64
// operations in the same order), then one more read of the pair and the one write
// g_sum <- T(float(g_mm) * float(c_fused * fused_scale) + float(g_sum) * float(c_summed))
// (float64 arithmetic for float64 gradients; each operation rounded: the build passes
// -ffp-contract=off, so no FMA), bit-identical to the reference.
//
// Determinism: work is cut into fixed chunks of kChunkCpu elements of one tensor (never derived
// from the thread count); a chunk's sums are taken in a fixed lane pattern and the chunk sums
// merged per tensor in chunk order after the parallel region, so the moments are bit-identical
// for any number of threads. factors and fused_scale are CPU tensors here: reading them is a
// memory read, not a device sync.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

#include "common/combine_api.h"
#include "common/ops.h"
#include "cpu/chunks.h"

namespace mmmod {
namespace combine_cpu {
namespace {

constexpr int kLanes = 8;  // independent float64 accumulators per chunk and moment
// chunks per parallel task: a bucket below 16 chunks (256 Ki elements) runs on the calling
// thread, where waking the pool costs more than the pass (and far more on a loaded host)
constexpr int64_t kGrainChunks = 16;

using cpu::Chunk;

// The two per-chunk loops are compiled once per ISA (AVX-512, AVX2, baseline) and the loader
// picks the widest the CPU has (GCC/Clang function multiversioning). The results do not depend on
// the pick: each lane's operations and their order are fixed by the source, and FMA contraction
// is off for the whole extension (-ffp-contract=off), so a wider vector only computes more lanes
// at once. These loops are outside the MMMOD_CPU_KERNELS table (nothing to cap: same bits).
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define MMMOD_PER_ISA __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define MMMOD_PER_ISA
#endif

template <typename T>
inline double as_double(T v) {
  return static_cast<double>(static_cast<float>(v));
}
template <>
inline double as_double<double>(double v) {
  return v;
}

inline double lanes_sum(const double* acc) {
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

// (|a|^2, |b|^2, a.b) of one chunk: lane j takes elements j, j + kLanes, ..., then the lanes
// are added in a fixed tree.
template <typename T>
std::array<double, 3> chunk_moments(const T* f, const T* s, int64_t n, double scale) {
  double aa[kLanes] = {0}, bb[kLanes] = {0}, ab[kLanes] = {0};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const double a = as_double(f[i + j]) * scale;
      const double b = as_double(s[i + j]) - a;
      aa[j] += a * a;
      bb[j] += b * b;
      ab[j] += a * b;
    }
  }
  for (int j = 0; i < n; ++i, ++j) {
    const double a = as_double(f[i]) * scale;
    const double b = as_double(s[i]) - a;
    aa[j] += a * a;
    bb[j] += b * b;
    ab[j] += a * b;
  }
  return {lanes_sum(aa), lanes_sum(bb), lanes_sum(ab)};
}

// The same for float32 and float64 with the kLanes lanes as one vector of 8 doubles (GCC/Clang
// vector extensions: lane j of each operation is the scalar loop's lane j, in the same order, so
// the bits are the scalar loop's; the compiler picks the registers per ISA clone).
typedef double Lanes __attribute__((vector_size(8 * sizeof(double))));
typedef float LanesF32 __attribute__((vector_size(8 * sizeof(float))));
static_assert(kLanes == 8, "the vector lanes are the scalar loop's kLanes");

template <typename T>
inline Lanes load_lanes(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    LanesF32 v;
    std::memcpy(&v, p, sizeof(v));
    return __builtin_convertvector(v, Lanes);  // exact
  } else {
    Lanes v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  }
}

template <typename T>
MMMOD_PER_ISA std::array<double, 3> chunk_moments_vec(const T* f, const T* s, int64_t n, double scale) {
  Lanes aa = {0}, bb = {0}, ab = {0};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const Lanes a = load_lanes(f + i) * scale;
    const Lanes b = load_lanes(s + i) - a;
    aa += a * a;
    bb += b * b;
    ab += a * b;
  }
  double ra[kLanes], rb[kLanes], rab[kLanes];
  std::memcpy(ra, &aa, sizeof(ra));
  std::memcpy(rb, &bb, sizeof(rb));
  std::memcpy(rab, &ab, sizeof(rab));
  for (int j = 0; i < n; ++i, ++j) {
    const double a = static_cast<double>(f[i]) * scale;
    const double b = static_cast<double>(s[i]) - a;
    ra[j] += a * a;
    rb[j] += b * b;
    rab[j] += a * b;
  }
  return {lanes_sum(ra), lanes_sum(rb), lanes_sum(rab)};
}

template <typename T, typename W>
MMMOD_PER_ISA void chunk_combine(T* s, const T* f, int64_t n, W ca, W cs) {
  for (int64_t i = 0; i < n; ++i) {
    const W x = static_cast<W>(f[i]) * ca;
    const W y = static_cast<W>(s[i]) * cs;
    s[i] = static_cast<T>(x + y);
  }
}

double scale_value(const std::optional<at::Tensor>& fused_scale) {
  // a CPU tensor: a memory read
  return fused_scale.has_value() ? fused_scale->to(at::kDouble).reshape({}).item<double>() : 1.0;
}

// the chunks of every non-empty tensor, with contiguous operands (copies of non-contiguous ones)
void plan(at::TensorList fused, at::TensorList summed, std::vector<at::Tensor>& f,
          std::vector<at::Tensor>& s, std::vector<Chunk>& chunks) {
  const size_t nt = summed.size();
  f.resize(nt);
  s.resize(nt);
  for (size_t t = 0; t < nt; ++t) {
    const int64_t n = summed[t].numel();
    if (n == 0) continue;
    f[t] = fused[t].contiguous();
    s[t] = summed[t].contiguous();
  }
  chunks = cpu::make_chunks(summed);
}

}  // namespace

at::Tensor pair_moments_cpu(at::TensorList fused, at::TensorList summed,
                            const std::optional<at::Tensor>& fused_scale) {
  check_pair_inputs("mmmod._pair_moments", fused, summed, fused_scale);
  const double scale = scale_value(fused_scale);
  std::vector<at::Tensor> f, s;
  std::vector<Chunk> chunks;
  plan(fused, summed, f, s, chunks);
  std::vector<std::array<double, 3>> partial(chunks.size());
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), kGrainChunks, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const Chunk& ch = chunks[c];
      AT_DISPATCH_FLOATING_TYPES_AND2(
          at::kHalf, at::kBFloat16, s[ch.tensor].scalar_type(), "mmmod_pair_moments_cpu", [&] {
            const scalar_t* fp = f[ch.tensor].const_data_ptr<scalar_t>() + ch.start;
            const scalar_t* sp = s[ch.tensor].const_data_ptr<scalar_t>() + ch.start;
            if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>) {
              partial[c] = chunk_moments_vec<scalar_t>(fp, sp, ch.len, scale);
            } else {
              partial[c] = chunk_moments<scalar_t>(fp, sp, ch.len, scale);
            }
          });
    }
  });
  const int64_t nt = static_cast<int64_t>(summed.size());
  at::Tensor out = at::zeros({nt, 3}, at::TensorOptions().dtype(at::kDouble));
  double* o = out.mutable_data_ptr<double>();
  // fixed-order merge: the chunks of a tensor in order
  for (size_t c = 0; c < chunks.size(); ++c) {
    double* row = o + 3 * chunks[c].tensor;
    for (int k = 0; k < 3; ++k) row[k] += partial[c][k];
  }
  return out;
}

// mmmod/reference/combine.py: ordered_sum, min_norm_weights, mmpareto_weights and
// mmpareto_factors, operation for operation (Python's left-to-right evaluation order)
void weights_and_factors(const double* mom, int64_t n, double gamma, double* weights,
                         std::vector<double>& factors) {
  double aa = 0.0, bb = 0.0, ab = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    aa = aa + mom[3 * i];
    bb = bb + mom[3 * i + 1];
    ab = ab + mom[3 * i + 2];
  }
  const double inner = (bb - ab) / ((aa + bb) - 2.0 * ab);
  const double c = ab >= aa ? 0.999 : (ab >= bb ? 0.001 : inner);
  const double w_mm = ab > 0 ? 0.5 : c;
  const double w_m = ab > 0 ? 0.5 : 1.0 - c;
  weights[0] = w_mm;
  weights[1] = w_m;
  factors.resize(2 * n);
  for (int64_t i = 0; i < n; ++i) {
    const double a2 = mom[3 * i], b2 = mom[3 * i + 1], x = mom[3 * i + 2];
    double new2 = 4.0 * (((w_mm * w_mm) * a2 + (w_m * w_m) * b2) + ((2.0 * w_mm) * w_m) * x);
    if (new2 < 0.0) new2 = 0.0;  // clamp_min(0): NaN stays NaN
    const double sum2 = (a2 + b2) + 2.0 * x;
    const bool grow = (sum2 > new2) && (new2 > 0.0);
    const double d = (grow ? std::sqrt(sum2 / new2) : 1.0) * gamma;
    factors[2 * i] = (2.0 * d) * (w_mm - w_m);
    factors[2 * i + 1] = (2.0 * d) * w_m;
  }
}

at::Tensor combine_cpu(at::TensorList summed, at::TensorList fused, const at::Tensor& moments,
                       double gamma, const std::optional<at::Tensor>& fused_scale) {
  check_pair_inputs("mmmod.combine_", fused, summed, fused_scale);
  check_combine_moments("mmmod.combine_", summed, moments);
  const double scale = scale_value(fused_scale);
  const at::Tensor mom = moments.contiguous();
  at::Tensor weights = at::empty({2}, moments.options());
  std::vector<double> fac;
  weights_and_factors(mom.const_data_ptr<double>(), static_cast<int64_t>(summed.size()), gamma,
                      weights.mutable_data_ptr<double>(), fac);
  const double* fp = fac.data();
  std::vector<at::Tensor> f, s;
  std::vector<Chunk> chunks;
  plan(fused, summed, f, s, chunks);
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), kGrainChunks, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const Chunk& ch = chunks[c];
      const double ca = fp[2 * ch.tensor] * scale, cs = fp[2 * ch.tensor + 1];
      AT_DISPATCH_FLOATING_TYPES_AND2(
          at::kHalf, at::kBFloat16, s[ch.tensor].scalar_type(), "mmmod_combine_cpu", [&] {
            scalar_t* sp = s[ch.tensor].mutable_data_ptr<scalar_t>() + ch.start;
            const scalar_t* fptr = f[ch.tensor].const_data_ptr<scalar_t>() + ch.start;
            if constexpr (std::is_same_v<scalar_t, double>) {
              chunk_combine<scalar_t, double>(sp, fptr, ch.len, ca, cs);
            } else {
              chunk_combine<scalar_t, float>(sp, fptr, ch.len, static_cast<float>(ca),
                                             static_cast<float>(cs));
            }
          });
    }
  });
  for (size_t t = 0; t < summed.size(); ++t) {
    if (s[t].defined() && !s[t].is_same(summed[t])) summed[t].copy_(s[t]);
  }
  return weights;
}

}  // namespace combine_cpu
}  // namespace mmmod

TORCH_LIBRARY_IMPL(mmmod, CPU, m) {
  m.impl("_pair_moments", &mmmod::combine_cpu::pair_moments_cpu);
  m.impl("combine_", &mmmod::combine_cpu::combine_cpu);
}
