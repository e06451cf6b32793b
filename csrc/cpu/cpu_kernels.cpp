// CPU implementations of the mmmod ops (dispatch key CPU).
//
// The per-chunk work goes through a KernelTable (cpu_kernels.h): AVX-512 (vec_avx512.cpp) or
// AVX2 + FMA (vec_avx2.cpp) when the CPU and OS support it, else the portable scalar one below;
// MMMOD_CPU_KERNELS=scalar|avx2|avx512 caps the choice, MMMOD_CPU_SCALAR=1 forces the portable one
// (the choice is isa.cpp's). The chunks are chunks.h's.
//
// Determinism: work is split into fixed chunks of kChunkCpu elements of one tensor (never by
// thread count); threads claim chunks dynamically, per-chunk statistics are stored in their own
// slots and merged per tensor in chunk order, and a normal depends only on its stream position,
// so results are bit-identical for any number of threads and any scheduling.
//
// OGM-GE modulation of a bucket runs window by window: consecutive tensors of about kWindow
// elements (a tensor is never split) get their statistics pass and then, while that window is
// still in the last-level cache, the fused pass that generates the Philox normals block by block
// into an L1 buffer and applies g <- k g + sigma n. DRAM traffic stays at the 12 B/element floor
// or below and nothing of the gradients' size is allocated. modulate_sigma_ (sigma given) is that
// fused pass alone, over all chunks in parallel: 8 B/element.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <numeric>
#include <optional>
#include <utility>
#include <vector>

#include "common/coefficients.h"
#include "common/ops.h"
#include "common/philox.h"
#include "cpu/chunks.h"
#include "cpu/cpu_kernels.h"

namespace mmmod {
namespace cpu {

namespace {

// ---- the portable (scalar) kernel table ------------------------------------------------------
void normals_scalar(uint64_t seed, uint32_t step, uint32_t modality, uint64_t q0, int64_t ngroups,
                    float* z) {
  for (int64_t j = 0; j < ngroups; ++j) {
    const F32x4 v = philox_normal4(seed, step, modality, q0 + static_cast<uint64_t>(j));
    z[4 * j] = v.x;
    z[4 * j + 1] = v.y;
    z[4 * j + 2] = v.z;
    z[4 * j + 3] = v.w;
  }
}

void modulate_f32_scalar(float* x, const float* z, int64_t n, float k, float sigma) {
  for (int64_t i = 0; i < n; ++i) x[i] = modulate_value(x[i], k, sigma, z[i]);
}

void scale_f32_scalar(float* x, int64_t n, float k) {
  for (int64_t i = 0; i < n; ++i) x[i] = scale_value(x[i], k);
}

// The accumulation passes of the statistics (cpu_kernels.h): element i into float64 lane i % 16,
// in element order; n a multiple of 16. The AVX2 and AVX-512 tables do exactly this, four and
// eight lanes per register.
// The statistics read every value through float64_of (cpu_kernels.h).

// The one-pass sums about a shift c: s1 += d, s2 += d * d (separately rounded) for d = x - c.
template <typename T>
void lanes_shifted(const T* x, int64_t n, double c, double* s1, double* s2) {
  for (int64_t i = 0; i < n; i += kMomentLanes) {
    for (int j = 0; j < kMomentLanes; ++j) {
      const double d = float64_of<T>(x[i + j]) - c;
      s1[j] += d;
      s2[j] += d * d;
    }
  }
}

// The second pass of the two-pass fallback: a += (x - mean)^2.
template <typename T>
void lanes_sqdev(const T* x, int64_t n, double mean, double* a) {
  for (int64_t i = 0; i < n; i += kMomentLanes) {
    for (int j = 0; j < kMomentLanes; ++j) {
      const double d = float64_of<T>(x[i + j]) - mean;
      a[j] += d * d;
    }
  }
}

void lanes_shifted_f32_scalar(const float* x, int64_t n, double c, double* s1, double* s2) {
  lanes_shifted<float>(x, n, c, s1, s2);
}
void lanes_sqdev_f32_scalar(const float* x, int64_t n, double mean, double* a) {
  lanes_sqdev<float>(x, n, mean, a);
}

// MMPareto's pair moments (cpu_kernels.h): std::fma is the vector tables' single rounding
template <typename T>
void pair_lanes(const T* f, const T* s, int64_t n, double scale, double* aa, double* bb,
                double* ab) {
  const bool scaled = scale != 1.0;
  for (int64_t i = 0; i < n; i += kMomentLanes) {
    for (int j = 0; j < kMomentLanes; ++j) {
      double a = static_cast<double>(f[i + j]);
      if (scaled) a = a * scale;
      const double b = static_cast<double>(s[i + j]) - a;
      aa[j] = std::fma(a, a, aa[j]);
      bb[j] = std::fma(b, b, bb[j]);
      ab[j] = std::fma(a, b, ab[j]);
    }
  }
}
void pair_lanes_f32_scalar(const float* f, const float* s, int64_t n, double scale, double* aa,
                           double* bb, double* ab) {
  pair_lanes<float>(f, s, n, scale, aa, bb, ab);
}
void pair_lanes_f64_scalar(const double* f, const double* s, int64_t n, double scale, double* aa,
                           double* bb, double* ab) {
  pair_lanes<double>(f, s, n, scale, aa, bb, ab);
}

double row_lse_f32_scalar(const float* row, int64_t C) {
  double mx = -std::numeric_limits<double>::infinity();
  bool nan = false;
  for (int64_t c = 0; c < C; ++c) {
    const double v = static_cast<double>(row[c]);
    nan = nan || std::isnan(v);
    mx = v > mx ? v : mx;
  }
  if (nan) return std::numeric_limits<double>::quiet_NaN();
  if (std::isinf(mx)) mx = 0.0;  // torch's logsumexp: an infinite max is not subtracted
  double se = 0.0;
  for (int64_t c = 0; c < C; ++c) se += std::exp(static_cast<double>(row[c]) - mx);
  return mx + std::log(se);
}

const KernelTable kScalar = {"scalar", normals_scalar, modulate_f32_scalar, scale_f32_scalar,
                             lanes_shifted_f32_scalar, lanes_sqdev_f32_scalar, row_lse_f32_scalar,
                             pair_lanes_f32_scalar, pair_lanes_f64_scalar};

// Elements per window of the OGM-GE pass (statistics, then modulation while cached): 8 MiB of
// fp32, well inside a 32 MiB L3. MMMOD_CPU_WINDOW overrides it (0: the whole bucket at once). Only
// a plain decimal integer is accepted (atoll would read "1e6" as 1 and "abc" as 0, silently);
// kernels_for_op() checks it at every op's entry, before anything is written.
int64_t window_elements() {
  const char* e = std::getenv("MMMOD_CPU_WINDOW");
  if (e == nullptr || e[0] == '\0') return int64_t{1} << 21;
  bool digits = std::strlen(e) <= 18;  // at most 18 digits: no overflow of int64
  for (const char* c = e; digits && *c != '\0'; ++c) digits = *c >= '0' && *c <= '9';
  TORCH_CHECK_VALUE(digits, "MMMOD_CPU_WINDOW=", e,
                    " is not a plain non-negative integer of at most 18 digits (elements per OGM-GE "
                    "cache window; 0: the whole bucket at once)");
  const long long v = std::strtoll(e, nullptr, 10);
  return v == 0 ? std::numeric_limits<int64_t>::max() : static_cast<int64_t>(v);
}

}  // namespace

const KernelTable& scalar_kernels() { return kScalar; }

const KernelTable& kernels_for_op() {
  const KernelTable& K = kernels_from_env();  // may raise (a bad MMMOD_CPU_KERNELS)
  (void)window_elements();  // may raise (a malformed MMMOD_CPU_WINDOW), as above
  return K;
}

namespace {

// Chunks a thread claims at a time in the noise passes: longer sequential runs for the hardware
// prefetchers. Measured on the 2-core EPYC: the noise pass alone ~5 % faster than with single
// chunks, the pipelined OGM-GE pass 1 % (up to 8 % while the host ran slowly).
constexpr int64_t kNoiseGrain = 4;

// Fewest elements per thread of the noise-free scaling pass (below: fewer threads), and the
// smallest tensor it splits between threads.
constexpr int64_t kScaleMinShare = int64_t{1} << 16;
constexpr int64_t kScaleMinSplit = int64_t{1} << 12;

// f(c) for c in [0, n), spread over the intra-op threads, each claiming the next `grain` indices
// (so a descheduled thread does not hold up a fixed share). Results must not depend on who runs c.
template <typename F>
void for_each_index(int64_t n, const F& f, int64_t grain = 1) {
  if (n <= 0) return;
  const int64_t nt = std::min<int64_t>(at::get_num_threads(), n);
  if (nt <= 1 || at::in_parallel_region()) {
    for (int64_t c = 0; c < n; ++c) f(c);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, nt, 1, [&](int64_t, int64_t) {
    for (int64_t c0 = next.fetch_add(grain, std::memory_order_relaxed); c0 < n;
         c0 = next.fetch_add(grain, std::memory_order_relaxed)) {
      for (int64_t c = c0; c < std::min(n, c0 + grain); ++c) f(c);
    }
  });
}

// Calls f(i, n, z) for consecutive runs of elements i .. i + n - 1 of a range of len elements
// starting at stream position p0, z[j] being the normal of element i + j (runs of at most
// 4 * kBlockGroups elements; z lives in an L1-resident buffer).
template <typename F>
void for_each_noise_run(const KernelTable& K, uint64_t seed, uint32_t step, uint32_t modality,
                        uint64_t p0, int64_t len, F&& f) {
  alignas(64) float z[4 * kBlockGroups + kNormalsPad];
  uint64_t q = p0 >> 2;
  int64_t lead = static_cast<int64_t>(p0 & 3);
  int64_t i = 0;
  while (i < len) {
    const int64_t n = std::min<int64_t>(4 * kBlockGroups - lead, len - i);
    const int64_t ng = (lead + n + 3) >> 2;
    K.normals(seed, step, modality, q, ng, z);
    f(i, n, z + lead);
    i += n;
    q += static_cast<uint64_t>(ng);
    lead = 0;
  }
}

// The statistics pass of one chunk, (n, mean, M2) in float64, in one read of the chunk: the sums
// of d = x - c and of d^2 in 16 lanes about a shift c (the mean of the chunk's first 16 values),
// then mean = c + S1 / n and M2 = S2 - S1^2 / n. Its rounding error is that of the sums times
// 1 + n (mean - c)^2 / M2, so it is kept only where n (mean - c)^2 <= M2 (a factor of at most 2;
// the usual case, c being a sample of the chunk's own values); otherwise (a shift far from the
// mean against the spread, or a non-finite value) the mean and M2 come from the classic two
// passes (the plain sum, then the squares about the mean) while the chunk is still in the cache.
// The sums may be fed in slices (sum()), in element order, before finish(); slicing never changes
// a bit: every lane sees the same additions in the same order.
template <typename T>
struct ChunkStats {
  const KernelTable& K;
  const T* x;
  int64_t n, n16, done = 0;
  double shift = 0.0;
  double s1[kMomentLanes] = {0}, s2[kMomentLanes] = {0};

  ChunkStats(const KernelTable& k, const T* data, int64_t len)
      : K(k), x(data), n(len), n16(len - len % kMomentLanes) {
    const int64_t m = std::min<int64_t>(len, kMomentLanes);
    for (int64_t i = 0; i < m; ++i) shift += float64_of<T>(x[i]);
    shift /= static_cast<double>(m);
  }

  // the sums over up to `count` more elements (count a multiple of 16)
  void sum(int64_t count) {
    count = std::min(count, n16 - done);
    if (count <= 0) return;
    if constexpr (std::is_same<T, float>::value) {
      K.lanes_shifted_f32(x + done, count, shift, s1, s2);
    } else {
      lanes_shifted<T>(x + done, count, shift, s1, s2);
    }
    done += count;
  }

  // the shifted sums over the whole chunk's first n16 elements into a and b
  void lanes(double c, double* a, double* b) const {
    if constexpr (std::is_same<T, float>::value) {
      K.lanes_shifted_f32(x, n16, c, a, b);
    } else {
      lanes_shifted<T>(x, n16, c, a, b);
    }
  }

  Moments finish() {
    sum(n16);
    for (int64_t i = n16; i < n; ++i) {
      const double d = float64_of<T>(x[i]) - shift;
      s1[i - n16] += d;
      s2[i - n16] += d * d;
    }
    const double nd = static_cast<double>(n);
    const double S1 = moment_lanes_sum(s1);
    double mean = shift + S1 / nd;
    const double drift = S1 * (S1 / nd);  // n (mean - c)^2
    double m2 = moment_lanes_sum(s2) - drift;
    if (!(drift <= m2)) {  // also taken for NaN / inf: the two-pass mean and M2
      double a[kMomentLanes] = {0}, unused[kMomentLanes] = {0};
      lanes(0.0, a, unused);  // the plain sum: x - 0 is x
      for (int64_t i = n16; i < n; ++i) a[i - n16] += float64_of<T>(x[i]);
      mean = moment_lanes_sum(a) / nd;
      std::fill(a, a + kMomentLanes, 0.0);
      if constexpr (std::is_same<T, float>::value) {
        K.lanes_sqdev_f32(x, n16, mean, a);
      } else {
        lanes_sqdev<T>(x, n16, mean, a);
      }
      for (int64_t i = n16; i < n; ++i) {
        const double d = float64_of<T>(x[i]) - mean;
        a[i - n16] += d * d;
      }
      m2 = moment_lanes_sum(a);
    }
    return {nd, mean, m2};
  }
};

// (n, mean, M2) of one chunk.
template <typename T>
Moments chunk_moments(const KernelTable& K, const T* x, int64_t n) {
  return ChunkStats<T>(K, x, n).finish();
}

// Per-tensor moments of tensors [t0, t1) whose chunks are [c0, c1): per-chunk partials in
// parallel, merged in chunk order.
template <typename T>
void window_moments(const KernelTable& K, at::TensorList tensors, const std::vector<Chunk>& chunks,
                    int64_t c0, int64_t c1, std::vector<Moments>& part, std::vector<Moments>& out) {
  for_each_index(c1 - c0, [&](int64_t i) {
    const Chunk& ch = chunks[c0 + i];
    part[c0 + i] = chunk_moments<T>(K, tensors[ch.tensor].const_data_ptr<T>() + ch.start, ch.len);
  });
  for (int64_t c = c0; c < c1; ++c) {
    out[chunks[c].tensor] = moments_merge(out[chunks[c].tensor], part[c]);
  }
}

template <typename T>
std::vector<Moments> bucket_moments(const KernelTable& K, at::TensorList tensors,
                                    const std::vector<Chunk>& chunks) {
  std::vector<Moments> part(chunks.size()), out(tensors.size(), Moments{0, 0, 0});
  window_moments<T>(K, tensors, chunks, 0, static_cast<int64_t>(chunks.size()), part, out);
  return out;
}

// g <- k g + sigma n on one chunk; if stats is given, pass 1 of that (other) chunk's statistics
// is interleaved slice by slice with the noise blocks, so its loads overlap the noise arithmetic.
template <typename T>
void modulate_chunk(const KernelTable& K, T* x, int64_t len, uint64_t p0, float k, float sg,
                    uint64_t seed, uint32_t step, uint32_t modality, ChunkStats<T>* stats) {
  int64_t slice = 0;
  if (stats != nullptr) {
    const int64_t blocks = (static_cast<int64_t>(p0 & 3) + len + 4 * kBlockGroups - 1) / (4 * kBlockGroups);
    slice = (stats->n16 + blocks - 1) / blocks;
    slice = (slice + kMomentLanes - 1) / kMomentLanes * kMomentLanes;
  }
  for_each_noise_run(K, seed, step, modality, p0, len, [&](int64_t i, int64_t n, const float* z) {
    {
      // prefetch (for writing) a block ahead: the noise pass alone streams from memory, and in the
      // pipelined pass the window, read for its statistics a phase earlier, may have left the
      // shared last-level cache by now
      const char* ahead = reinterpret_cast<const char*>(x + i) + kStatsPrefetchBytes;
      const char* end = reinterpret_cast<const char*>(x + len);
      for (int64_t b = 0; b < n * static_cast<int64_t>(sizeof(T)) && ahead + b < end; b += 64) {
        __builtin_prefetch(ahead + b, 1);
      }
    }
    if constexpr (std::is_same<T, float>::value) {
      K.modulate_f32(x + i, z, n, k, sg);
    } else {
      T* y = x + i;
      for (int64_t j = 0; j < n; ++j) {
        y[j] = static_cast<T>(modulate_value(static_cast<float>(y[j]), k, sg, z[j]));
      }
    }
    if (stats != nullptr) stats->sum(slice);
  });
}

// OGM-GE on a bucket, software-pipelined over windows of whole tensors (about window_elements()
// each): phase p modulates window p - 1 (its sigmas are known) while it computes the statistics
// of window p, task t pairing modulation chunk t with statistics chunk t; after the phase the
// statistics of window p are merged per tensor in chunk order and its sigmas fixed. Window p's
// data is then read by the next phase while still in the last-level cache.
template <typename T>
void modulate_noise(const KernelTable& K, at::TensorList tensors, at::IntArrayRef offsets,
                    const std::vector<Chunk>& chunks, float k, float gate, bool scaled,
                    uint64_t seed, uint32_t step, uint32_t modality) {
  const int64_t nchunks = static_cast<int64_t>(chunks.size());
  const int64_t window = window_elements();
  std::vector<std::pair<int64_t, int64_t>> windows;  // chunk ranges
  for (int64_t c0 = 0; c0 < nchunks;) {
    int64_t c1 = c0, elems = 0;
    while (c1 < nchunks) {
      const int64_t t = chunks[c1].tensor;
      const int64_t n = tensors[t].numel();
      if (c1 > c0 && elems + n > window) break;
      elems += n;
      while (c1 < nchunks && chunks[c1].tensor == t) ++c1;
    }
    windows.emplace_back(c0, c1);
    c0 = c1;
  }
  std::vector<Moments> part(chunks.size()), mom(tensors.size(), Moments{0, 0, 0});
  std::vector<float> sigma(tensors.size(), 0.0f);
  const int64_t nw = static_cast<int64_t>(windows.size());
  for (int64_t p = 0; p <= nw; ++p) {
    const int64_t m0 = p > 0 ? windows[p - 1].first : 0, mn = p > 0 ? windows[p - 1].second - m0 : 0;
    const int64_t s0 = p < nw ? windows[p].first : 0, sn = p < nw ? windows[p].second - s0 : 0;
    for_each_index(std::max(mn, sn), [&](int64_t t) {
      // on this thread's stack: its lanes are rewritten at every noise block and must not share a
      // cache line with another thread's (two heap blocks could)
      std::optional<ChunkStats<T>> st;
      if (t < sn) {
        const Chunk& ch = chunks[s0 + t];
        st.emplace(K, tensors[ch.tensor].const_data_ptr<T>() + ch.start, ch.len);
      }
      if (t < mn) {
        const Chunk& ch = chunks[m0 + t];
        const uint64_t p0 = static_cast<uint64_t>(offsets[ch.tensor]) + static_cast<uint64_t>(ch.start);
        modulate_chunk<T>(K, tensors[ch.tensor].mutable_data_ptr<T>() + ch.start, ch.len, p0, k,
                          sigma[ch.tensor], seed, step, modality, st ? &*st : nullptr);
      }
      if (st) part[s0 + t] = st->finish();
    }, kNoiseGrain);
    if (p < nw) {
      for (int64_t c = s0; c < s0 + sn; ++c) {
        mom[chunks[c].tensor] = moments_merge(mom[chunks[c].tensor], part[c]);
      }
      for (int64_t t = chunks[s0].tensor; t <= chunks[s0 + sn - 1].tensor; ++t) {
        sigma[t] = sigma_from_moments(mom[t], scaled, k, gate);
      }
    }
  }
}

// modulate_sigma_: the noise pass alone, each tensor's sigma given (sharded OGM-GE takes its
// std from a collective), so there is no statistics pass to pipeline with: the chunks run in
// parallel, each through the same modulate_chunk (noise blocks from the KernelTable) as the
// statistics-driven pass, with the same stream positions, so the bits match modulate_ wherever
// the sigmas do.
template <typename T>
void modulate_given_sigma(const KernelTable& K, at::TensorList tensors, at::IntArrayRef offsets,
                          const std::vector<Chunk>& chunks, const std::vector<float>& sigma, float k,
                          uint64_t seed, uint32_t step, uint32_t modality) {
  for_each_index(static_cast<int64_t>(chunks.size()), [&](int64_t c) {
    const Chunk& ch = chunks[c];
    const uint64_t p0 = static_cast<uint64_t>(offsets[ch.tensor]) + static_cast<uint64_t>(ch.start);
    modulate_chunk<T>(K, tensors[ch.tensor].mutable_data_ptr<T>() + ch.start, ch.len, p0, k,
                      sigma[ch.tensor], seed, step, modality, nullptr);
  }, kNoiseGrain);
}

// A given sigma as sigma_from_moments finishes its own: not finite -> 0 (no noise), then one
// float32 multiply by the gate.
inline float gated_sigma(float sigma, float gate) {
  const float big = std::numeric_limits<float>::max();
  if (!(sigma <= big && sigma >= -big)) sigma = 0.0f;
  return sigma * gate;
}

template <typename T>
void modulate_impl(const KernelTable& K, at::TensorList tensors, at::IntArrayRef offsets, float k,
                   float gate, bool noise, bool scaled, uint64_t seed, uint32_t step,
                   uint32_t modality) {
  const std::vector<Chunk> chunks = make_chunks(tensors);
  const int64_t nchunks = static_cast<int64_t>(chunks.size());
  if (nchunks == 0) return;
  if (!noise) {
    // a pure streaming pass, elementwise (no split changes a bit). Each thread takes its share
    // of every tensor, as torch's own loops do (one contiguous piece of each, cut at multiples of
    // 16 elements; tensors below kScaleMinSplit go whole to the first thread), in tensor order
    // with no barrier in between: reads stay sequential for the hardware prefetchers, no atomic
    // is touched, and the tensors the caches still hold are shared out like the rest (a split of
    // the bucket's concatenation into one piece per thread left all of them to the last one).
    const int64_t total = std::accumulate(chunks.begin(), chunks.end(), int64_t{0},
                                          [](int64_t a, const Chunk& ch) { return a + ch.len; });
    const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), total / kScaleMinShare));
    auto scale_share = [&](int64_t p) {
      for (size_t t = 0; t < tensors.size(); ++t) {
        const int64_t n = tensors[t].numel();
        const bool split = n >= kScaleMinSplit;
        const int64_t a = split ? n * p / parts / 16 * 16 : (p == 0 ? 0 : n);
        const int64_t b = split ? (p + 1 == parts ? n : n * (p + 1) / parts / 16 * 16) : n;
        if (a >= b) continue;
        T* x = tensors[t].mutable_data_ptr<T>() + a;
        if constexpr (std::is_same<T, float>::value) {
          K.scale_f32(x, b - a, k);
        } else {
          for (int64_t i = 0; i < b - a; ++i) x[i] = static_cast<T>(scale_value(static_cast<float>(x[i]), k));
        }
      }
    };
    if (parts == 1 || at::in_parallel_region()) {
      for (int64_t p = 0; p < parts; ++p) scale_share(p);
    } else {
      at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
        for (int64_t p = p0; p < p1; ++p) scale_share(p);
      });
    }
    return;
  }
  modulate_noise<T>(K, tensors, offsets, chunks, k, gate, scaled, seed, step, modality);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// ops

at::Tensor scores_cpu(at::TensorList logits, const at::Tensor& labels) {
  check_scores_inputs(logits, labels);
  const KernelTable& K = kernels_for_op();
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
      constexpr bool direct = std::is_same<scalar_t, float>::value;
      for_each_index(nblk, [&](int64_t blk) {
        std::vector<float> buf;  // the row as float32 when it is not a contiguous float32 row
        double acc = 0.0;
        for (int64_t i = blk * kRows; i < std::min(B, (blk + 1) * kRows); ++i) {
          const int64_t yi = yp[i];
          if (yi < 0 || yi >= C) {
            acc += std::numeric_limits<double>::quiet_NaN();
            continue;
          }
          const scalar_t* row = zp + i * s0;
          const float* r;
          if (direct && s1 == 1) {
            r = reinterpret_cast<const float*>(row);
          } else {
            buf.resize(static_cast<size_t>(C));
            for (int64_t c = 0; c < C; ++c) buf[c] = static_cast<float>(row[c * s1]);
            r = buf.data();
          }
          const double lse = K.row_lse_f32(r, C);
          acc += std::exp(static_cast<double>(r[yi]) - lse);
        }
        part[blk] = acc;
      });
    });
    double total = 0.0;
    for (int64_t blk = 0; blk < nblk; ++blk) total += part[blk];
    op[m] = static_cast<float>(total);
  }
  return out;
}

at::Tensor coefficients_cpu(const at::Tensor& scores, int64_t rule, double alpha,
                            double beta_max) {
  const int code = checked_rule(rule);
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
  kernels_for_op();  // may raise: before anything is written
  if (tensors.empty()) return;
  modulate_values_cpu(tensors, offsets, k.item<float>(), gate.item<float>(), noise, scaled, seed,
                      step, modality);
}

void modulate_values_cpu(at::TensorList tensors, at::IntArrayRef offsets, float k, float gate,
                         bool noise, bool scaled, int64_t seed, int64_t step, int64_t modality) {
  if (tensors.empty()) return;
  const KernelTable& K = kernels_for_op();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tensors[0].scalar_type(), "mmmod_modulate_cpu", [&] {
    modulate_impl<scalar_t>(K, tensors, offsets, k, gate, noise, scaled, static_cast<uint64_t>(seed),
                            static_cast<uint32_t>(step), static_cast<uint32_t>(modality));
  });
}

// The step of a capturable call: the CPU counter's value when one is given (checked; a memory
// read, not a device sync), else `step`.
static int64_t host_step(int64_t step, const std::optional<at::Tensor>& step_tensor) {
  if (!step_tensor.has_value()) return step;
  check_step_tensor(*step_tensor, at::Device(at::kCPU));
  return step_tensor->to(at::kLong).item<int64_t>();
}

// modulate_.capturable on the CPU: the step counter is a CPU tensor, read here (a memory read,
// not a device sync); there is no device table.
void modulate_capturable_cpu(at::TensorList tensors, at::IntArrayRef offsets, const at::Tensor& k,
                             const at::Tensor& gate, bool noise, bool scaled, int64_t seed,
                             int64_t step, int64_t modality, const std::optional<at::Tensor>& table,
                             const std::optional<at::Tensor>& step_tensor) {
  TORCH_CHECK_VALUE(!table.has_value(),
                    "mmmod.modulate_: the CPU kernels take no device table (table must be None)");
  modulate_cpu(tensors, offsets, k, gate, noise, scaled, seed, host_step(step, step_tensor),
               modality);
}

// modulate_sigma_ on the CPU: sigma, k and gate are CPU tensors read here (memory reads, not
// device syncs); every check runs before the first write.
void modulate_sigma_cpu(at::TensorList tensors, at::IntArrayRef offsets, const at::Tensor& k,
                        const at::Tensor& gate, const at::Tensor& sigma, int64_t seed, int64_t step,
                        int64_t modality, const std::optional<at::Tensor>& table,
                        const std::optional<at::Tensor>& step_tensor) {
  check_bucket(tensors, offsets, k, gate);
  check_sigma(tensors, sigma);
  TORCH_CHECK_VALUE(!table.has_value(),
                    "mmmod.modulate_sigma_: the CPU kernels take no device table (table must be None)");
  step = host_step(step, step_tensor);
  const KernelTable& K = kernels_for_op();  // may raise: before anything is written
  if (tensors.empty()) return;
  const float kv = k.item<float>();
  const float gv = gate.item<float>();
  const at::Tensor s = sigma.contiguous();
  const float* sp = s.const_data_ptr<float>();
  std::vector<float> sg(tensors.size());
  for (size_t t = 0; t < tensors.size(); ++t) sg[t] = gated_sigma(sp[t], gv);
  const std::vector<Chunk> chunks = make_chunks(tensors);
  if (chunks.empty()) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tensors[0].scalar_type(), "mmmod_modulate_sigma_cpu", [&] {
    modulate_given_sigma<scalar_t>(K, tensors, offsets, chunks, sg, kv, static_cast<uint64_t>(seed),
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
  const KernelTable& K = kernels_for_op();
  double* op = out.mutable_data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, flat[0].scalar_type(), "mmmod_bucket_std_cpu", [&] {
    const std::vector<Moments> mom = bucket_moments<scalar_t>(K, flat, chunks);
    for (size_t t = 0; t < flat.size(); ++t) {
      op[t] = mom[t].n >= 2 ? std::sqrt(mom[t].m2 / (mom[t].n - 1.0)) : 0.0;
    }
  });
  return out;
}

// _bucket_moments: (count, mean, M2) of every tensor in float64, [T, 3], (0, 0, 0) for an empty
// tensor. The statistics pass of modulate_ (bucket_moments: fixed chunks of kChunkCpu elements
// in parallel, merged per tensor in chunk order), so the rows do not depend on the thread count
// and equal the moments behind modulate_'s own sigma. Sharded OGM-GE gathers these rows across
// the ranks holding a tensor's shards and merges them (mmmod/optim/sharding.py). A tensor of any
// layout is read in its logical (row-major) order, through a contiguous copy when it is not
// contiguous. Every input is checked before anything is computed.
at::Tensor bucket_moments_cpu(at::TensorList tensors) {
  const int64_t T = static_cast<int64_t>(tensors.size());
  check_moments_inputs(tensors);
  const KernelTable& K = kernels_for_op();  // may raise (a bad MMMOD_CPU_KERNELS)
  at::Tensor out = at::zeros({T, 3}, at::dtype(at::kDouble));
  if (T == 0) return out;
  std::vector<at::Tensor> flat;
  flat.reserve(tensors.size());
  for (const auto& t : tensors) flat.push_back(t.contiguous());
  const std::vector<Chunk> chunks = make_chunks(flat);
  double* op = out.mutable_data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, flat[0].scalar_type(), "mmmod_bucket_moments_cpu", [&] {
    const std::vector<Moments> mom = bucket_moments<scalar_t>(K, flat, chunks);
    for (int64_t t = 0; t < T; ++t) {
      op[3 * t] = mom[t].n;
      op[3 * t + 1] = mom[t].mean;
      op[3 * t + 2] = mom[t].m2;
    }
  });
  return out;
}

void philox_normal_cpu(const at::Tensor& out, int64_t seed, int64_t step, int64_t modality,
                       int64_t offset) {
  TORCH_CHECK_VALUE(out.scalar_type() == at::kFloat && out.is_contiguous(),
                    "mmmod.philox_normal_: out must be a contiguous float32 tensor");
  TORCH_CHECK_VALUE(offset >= 0, "mmmod.philox_normal_: negative offset");
  float* p = out.mutable_data_ptr<float>();
  const KernelTable& K = kernels_for_op();
  const std::vector<Chunk> chunks = make_chunks(out);
  for_each_index(static_cast<int64_t>(chunks.size()), [&](int64_t c) {
    const int64_t start = chunks[c].start;
    for_each_noise_run(K, static_cast<uint64_t>(seed), static_cast<uint32_t>(step),
                       static_cast<uint32_t>(modality),
                       static_cast<uint64_t>(offset) + static_cast<uint64_t>(start), chunks[c].len,
                       [&](int64_t i, int64_t m, const float* z) {
                         std::copy(z, z + m, p + start + i);
                       });
  });
}

}  // namespace cpu
}  // namespace mmmod

TORCH_LIBRARY_IMPL(mmmod, CPU, m) {
  m.impl("scores", &mmmod::cpu::scores_cpu);
  m.impl("coefficients", &mmmod::cpu::coefficients_cpu);
  m.impl("modulate_", &mmmod::cpu::modulate_cpu);
  m.impl("modulate_.capturable", &mmmod::cpu::modulate_capturable_cpu);
  m.impl("modulate_sigma_", &mmmod::cpu::modulate_sigma_cpu);
  m.impl("_bucket_std", &mmmod::cpu::bucket_std_cpu);
  m.impl("_bucket_moments", &mmmod::cpu::bucket_moments_cpu);
  m.impl("_philox_normal_", &mmmod::cpu::philox_normal_cpu);
}
