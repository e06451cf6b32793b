// MMPareto's pair moments (KernelTable::pair_lanes_f32 / _f64, cpu_kernels.h) written once for
// any vector width: vec_avx2.cpp and vec_avx512.cpp include this inside their own anonymous
// namespace, under their target pragma, and instantiate it with their register type (below), so
// each gets its own ISA's copy with internal linkage (nothing shared between the objects).
//
// Lanes: the 16 float64 lanes of the portable table, kWidth per register, element i into lane
// i % 16; each product added with one fused multiply-add. The same operations per lane in every
// table: the same bits.
//
// V provides: Reg (kWidth doubles), kWidth, set1, loadu / storeu (doubles), widen (kWidth floats
// to doubles, exact), mul, sub, fmadd. No include here: the includer has <immintrin.h>,
// cpu_kernels.h and <type_traits>.
#pragma once

template <class V, bool Scaled, typename T>
void pair_lanes_body(const T* f, const T* s, int64_t n, double scale, double* aa, double* bb,
                     double* ab) {
  constexpr int R = kMomentLanes / V::kWidth;  // registers per sum
  const typename V::Reg sc = V::set1(scale);
  typename V::Reg A[R], B[R], X[R];
  for (int r = 0; r < R; ++r) {
    A[r] = V::loadu(aa + V::kWidth * r);
    B[r] = V::loadu(bb + V::kWidth * r);
    X[r] = V::loadu(ab + V::kWidth * r);
  }
  for (int64_t i = 0; i < n; i += kMomentLanes) {
    // two streams of reads and little arithmetic per line: the hardware prefetchers alone leave
    // ~20 % of a DRAM-sized pass on the table (measured: 4.3 -> 3.4 ms for 5.9 M float pairs)
    _mm_prefetch(reinterpret_cast<const char*>(f + i) + kStatsPrefetchBytes, _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(s + i) + kStatsPrefetchBytes, _MM_HINT_T0);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      typename V::Reg a, g;
      if constexpr (std::is_same_v<T, float>) {
        a = V::widen(f + i + V::kWidth * r);
        g = V::widen(s + i + V::kWidth * r);
      } else {
        a = V::loadu(f + i + V::kWidth * r);
        g = V::loadu(s + i + V::kWidth * r);
      }
      if constexpr (Scaled) a = V::mul(a, sc);
      const typename V::Reg b = V::sub(g, a);
      A[r] = V::fmadd(a, a, A[r]);
      B[r] = V::fmadd(b, b, B[r]);
      X[r] = V::fmadd(a, b, X[r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    V::storeu(aa + V::kWidth * r, A[r]);
    V::storeu(bb + V::kWidth * r, B[r]);
    V::storeu(ab + V::kWidth * r, X[r]);
  }
}

// The table's entry: a scale of 1 multiplies nothing (the same bits, one operation less).
template <class V, typename T>
void pair_lanes(const T* f, const T* s, int64_t n, double scale, double* aa, double* bb,
                double* ab) {
  if (scale == 1.0) {
    pair_lanes_body<V, false>(f, s, n, scale, aa, bb, ab);
  } else {
    pair_lanes_body<V, true>(f, s, n, scale, aa, bb, ab);
  }
}
