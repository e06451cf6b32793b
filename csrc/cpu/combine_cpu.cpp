// CPU kernels of MMPareto's gradient combine (ops _pair_moments and combine_, defined in
// mmmod/_ops/__init__.py; the reference is mmmod/reference/combine.py, docs/semantics.md
// section 11).
//
// _pair_moments: one read of each (fused, summed) gradient pair; per element, in float64,
// a = double(g_mm) * fused_scale, b = double(g_sum) - a (each one rounding, as the reference;
// no multiplication when fused_scale is 1: the same bits), and the rows (|a|^2, |b|^2, a.b) of
// every tensor, each product added with one fused multiply-add (the kernel table's
// pair_lanes_*, cpu_kernels.h: the same bits in every table). combine_ (given those rows, or
// without them running that pass itself over the same operands): per modality (groups) its
// weights and its tensors' factors (mmpareto_weights / mmpareto_factors, the same float64
// operations in the same order), then one more read of the pair and the one write
// g_sum <- T(float(g_mm) * float(c_fused * fused_scale) + float(g_sum) * float(c_summed))
// (float64 arithmetic for float64 gradients; each operation rounded: the build passes
// -ffp-contract=off, so no FMA here), bit-identical to the reference.
//
// Determinism: work is cut into fixed chunks of kChunkCpu elements of one tensor (never derived
// from the thread count); element i of a chunk goes to float64 lane i % 16, the lanes are added
// in a fixed tree and the chunk sums merged per tensor in chunk order after the parallel region,
// so the moments are bit-identical for any number of threads and any kernel table. Where every
// product and partial sum is exact in float64 they are the reference's bits (any order gives
// them). factors and fused_scale are CPU tensors here: reading them is a memory read, not a
// device sync.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <optional>
#include <utility>
#include <type_traits>
#include <vector>

#include "common/combine_api.h"
#include "common/ops.h"
#include "cpu/chunks.h"
#include "cpu/cpu_kernels.h"

namespace mmmod {
namespace combine_cpu {
namespace {

// chunks per parallel task: a bucket below 16 chunks (256 Ki elements) runs on the calling
// thread, where waking the pool costs more than the pass (and far more on a loaded host)
constexpr int64_t kGrainChunks = 16;
// float16/bfloat16 elements converted to float32 at a time for the kernel table's float32 pass
// (a multiple of the 16 lanes, so every element keeps its lane)
constexpr int64_t kConvertBlock = 1024;
static_assert(kConvertBlock % cpu::kMomentLanes == 0, "blocks keep the lanes");

using cpu::Chunk;

// The combine's per-chunk loop is compiled once per ISA (AVX-512, AVX2, baseline) and the loader
// picks the widest the CPU has (GCC function multiversioning). The results do not depend on the
// pick: each element's operations are fixed by the source, and FMA contraction is off for the
// whole extension (-ffp-contract=off), so a wider vector only computes more elements at once.
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define MMMOD_PER_ISA __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define MMMOD_PER_ISA
#endif

// (|a|^2, |b|^2, a.b) of one chunk: the kernel table over the first n - n % 16 elements (float16
// and bfloat16 through float32 blocks: exact), the last few on the same lanes with std::fma (one
// rounding, as the table's FMA), then the 16 lanes in the statistics' fixed tree.
template <typename T>
std::array<double, 3> chunk_moments(const cpu::KernelTable& K, const T* f, const T* s, int64_t n,
                                    double scale) {
  double aa[cpu::kMomentLanes] = {0}, bb[cpu::kMomentLanes] = {0}, ab[cpu::kMomentLanes] = {0};
  const int64_t n16 = n - n % cpu::kMomentLanes;
  if constexpr (std::is_same_v<T, float>) {
    K.pair_lanes_f32(f, s, n16, scale, aa, bb, ab);
  } else if constexpr (std::is_same_v<T, double>) {
    K.pair_lanes_f64(f, s, n16, scale, aa, bb, ab);
  } else {
    float fb[kConvertBlock], sb[kConvertBlock];
    for (int64_t off = 0; off < n16; off += kConvertBlock) {
      const int64_t m = std::min(kConvertBlock, n16 - off);
      for (int64_t i = 0; i < m; ++i) {
        fb[i] = static_cast<float>(f[off + i]);
        sb[i] = static_cast<float>(s[off + i]);
      }
      K.pair_lanes_f32(fb, sb, m, scale, aa, bb, ab);
    }
  }
  for (int64_t i = n16; i < n; ++i) {
    const int64_t j = i - n16;
    double a = cpu::float64_of(f[i]);
    if (scale != 1.0) a = a * scale;
    const double b = cpu::float64_of(s[i]) - a;
    aa[j] = std::fma(a, a, aa[j]);
    bb[j] = std::fma(b, b, bb[j]);
    ab[j] = std::fma(a, b, ab[j]);
  }
  return {cpu::moment_lanes_sum(aa), cpu::moment_lanes_sum(bb), cpu::moment_lanes_sum(ab)};
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

// The contiguous data of every pair: the tensors' own (no handle copied: this runs once per
// modality and step over every encoder tensor), or contiguous copies of non-contiguous operands,
// kept alive here; `written` lists the summed tensors whose copy combine_ writes back.
struct Operands {
  std::vector<const void*> f;
  std::vector<void*> s;
  std::vector<at::Tensor> copies;
  std::vector<std::pair<size_t, at::Tensor>> written;
};

void operands(at::TensorList fused, at::TensorList summed, Operands& op) {
  const size_t nt = summed.size();
  op.f.assign(nt, nullptr);
  op.s.assign(nt, nullptr);
  for (size_t t = 0; t < nt; ++t) {
    if (summed[t].numel() == 0) continue;
    if (fused[t].is_contiguous()) {
      op.f[t] = fused[t].const_data_ptr();
    } else {
      op.copies.push_back(fused[t].contiguous());
      op.f[t] = op.copies.back().const_data_ptr();
    }
    if (summed[t].is_contiguous()) {
      op.s[t] = summed[t].data_ptr();
    } else {
      op.written.emplace_back(t, summed[t].contiguous());
      op.s[t] = op.written.back().second.data_ptr();
    }
  }
}

}  // namespace

namespace {

// The rows (|a|^2, |b|^2, a.b) of every tensor from its contiguous operands.
at::Tensor moments_of(const cpu::KernelTable& K, at::TensorList summed, const Operands& op,
                      const std::vector<Chunk>& chunks, double scale) {
  std::vector<std::array<double, 3>> partial(chunks.size());
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), kGrainChunks, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const Chunk& ch = chunks[c];
      AT_DISPATCH_FLOATING_TYPES_AND2(
          at::kHalf, at::kBFloat16, summed[ch.tensor].scalar_type(), "mmmod_pair_moments_cpu", [&] {
            const scalar_t* fp = static_cast<const scalar_t*>(op.f[ch.tensor]) + ch.start;
            const scalar_t* sp = static_cast<const scalar_t*>(op.s[ch.tensor]) + ch.start;
            partial[c] = chunk_moments<scalar_t>(K, fp, sp, ch.len, scale);
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

}  // namespace

at::Tensor pair_moments_cpu(at::TensorList fused, at::TensorList summed,
                            const std::optional<at::Tensor>& fused_scale) {
  check_pair_inputs("mmmod._pair_moments", fused, summed, fused_scale);
  const cpu::KernelTable& K = cpu::kernels_for_op();  // may raise: before anything is read
  Operands op;
  operands(fused, summed, op);
  return moments_of(K, summed, op, cpu::make_chunks(summed), scale_value(fused_scale));
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

at::Tensor combine_cpu(at::TensorList summed, at::TensorList fused,
                       const std::optional<at::Tensor>& moments, at::IntArrayRef groups,
                       double gamma, const std::optional<at::Tensor>& fused_scale) {
  check_pair_inputs("mmmod.combine_", fused, summed, fused_scale);
  if (moments.has_value()) check_combine_moments("mmmod.combine_", summed, *moments);
  check_combine_groups("mmmod.combine_", summed, groups);
  // no moments given: this call's own first pass over the same operands (no collective sits
  // between the two passes)
  const cpu::KernelTable* K = moments.has_value() ? nullptr : &cpu::kernels_for_op();  // may raise
  const double scale = scale_value(fused_scale);
  Operands op;
  operands(fused, summed, op);
  const std::vector<Chunk> chunks = cpu::make_chunks(summed);
  const at::Tensor mom = moments.has_value() ? moments->contiguous()
                                             : moments_of(*K, summed, op, chunks, scale);
  const int64_t ngroups = static_cast<int64_t>(groups.size());
  at::Tensor weights = at::empty({ngroups, 2}, mom.options());
  // per modality its weights and its tensors' factors, from its own rows
  std::vector<double> fac(2 * summed.size()), group_fac;
  int64_t start = 0;
  for (int64_t g = 0; g < ngroups; ++g) {
    weights_and_factors(mom.const_data_ptr<double>() + 3 * start, groups[g], gamma,
                        weights.mutable_data_ptr<double>() + 2 * g, group_fac);
    std::copy(group_fac.begin(), group_fac.end(), fac.begin() + 2 * start);
    start += groups[g];
  }
  const double* fp = fac.data();
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), kGrainChunks, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const Chunk& ch = chunks[c];
      const double ca = fp[2 * ch.tensor] * scale, cs = fp[2 * ch.tensor + 1];
      AT_DISPATCH_FLOATING_TYPES_AND2(
          at::kHalf, at::kBFloat16, summed[ch.tensor].scalar_type(), "mmmod_combine_cpu", [&] {
            scalar_t* sp = static_cast<scalar_t*>(op.s[ch.tensor]) + ch.start;
            const scalar_t* fptr = static_cast<const scalar_t*>(op.f[ch.tensor]) + ch.start;
            if constexpr (std::is_same_v<scalar_t, double>) {
              chunk_combine<scalar_t, double>(sp, fptr, ch.len, ca, cs);
            } else {
              chunk_combine<scalar_t, float>(sp, fptr, ch.len, static_cast<float>(ca),
                                             static_cast<float>(cs));
            }
          });
    }
  });
  for (auto& [t, copy] : op.written) summed[t].copy_(copy);
  return weights;
}

}  // namespace combine_cpu
}  // namespace mmmod

TORCH_LIBRARY_IMPL(mmmod, CPU, m) {
  m.impl("_pair_moments", &mmmod::combine_cpu::pair_moments_cpu);
  m.impl("combine_", &mmmod::combine_cpu::combine_cpu);
}
