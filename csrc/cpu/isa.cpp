// Which CPU kernel table the ops run: the CPU's and OS's vector capabilities (cpuid, xgetbv) and
// the environment's cap on them (MMMOD_CPU_KERNELS, MMMOD_CPU_SCALAR). The kernels themselves are
// in cpu_kernels.cpp (portable table), vec_avx2.cpp and vec_avx512.cpp; this file runs no kernel.
#include <c10/util/Exception.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

#include "cpu/cpu_kernels.h"

namespace mmmod {
namespace cpu {

namespace {

struct CpuFeatures {
  bool avx2 = false;    // AVX2 + FMA, ymm state enabled by the OS
  bool avx512 = false;  // and avx512f/bw/dq/vl, opmask + zmm state enabled by the OS
};

CpuFeatures detect_features() {
  CpuFeatures f;
#if defined(MMMOD_X86_SIMD_TABLES)
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool fma = c & (1u << 12), osxsave = c & (1u << 27), avx = c & (1u << 28);
  if (!osxsave || !avx || __get_cpuid_max(0, nullptr) < 7) return f;
  // XCR0: which register state the OS saves on a context switch. A CPU can report AVX-512 while
  // the OS (or hypervisor) leaves the zmm state off; using it then faults.
  unsigned xlo = 0, xhi = 0;
  __asm__ volatile("xgetbv" : "=a"(xlo), "=d"(xhi) : "c"(0));
  const uint64_t xcr0 = (static_cast<uint64_t>(xhi) << 32) | xlo;
  const bool ymm_state = (xcr0 & 0x6) == 0x6;    // SSE + AVX
  const bool zmm_state = (xcr0 & 0xE6) == 0xE6;  // and opmask, ZMM_Hi256, Hi16_ZMM
  __cpuid_count(7, 0, a, b, c, d);
  const bool avx2 = b & (1u << 5), f512 = b & (1u << 16), dq = b & (1u << 17),
             bw = b & (1u << 30), vl = b & (1u << 31);
  f.avx2 = ymm_state && avx2 && fma;
  f.avx512 = f.avx2 && zmm_state && f512 && dq && bw && vl;
#endif
  return f;
}

const CpuFeatures& features() {
  static const CpuFeatures f = detect_features();
  return f;
}

// The ISA cap of the environment: 0 scalar, 1 AVX2, 2 AVX-512 (2 also for unset / auto); -1 for
// an unrecognised MMMOD_CPU_KERNELS value, returned in *value.
int kernels_cap(const char** value) {
  const char* s = std::getenv("MMMOD_CPU_SCALAR");
  if (s != nullptr && s[0] != '\0' && std::strcmp(s, "0") != 0) return 0;
  const char* e = std::getenv("MMMOD_CPU_KERNELS");
  if (e == nullptr || e[0] == '\0' || std::strcmp(e, "auto") == 0) return 2;
  if (std::strcmp(e, "scalar") == 0) return 0;
  if (std::strcmp(e, "avx2") == 0) return 1;
  if (std::strcmp(e, "avx512") == 0) return 2;
  *value = e;
  return -1;
}

const KernelTable& table_for_cap(int cap) {
#if defined(MMMOD_X86_SIMD_TABLES)
  if (cap >= 2 && features().avx512) return avx512_kernels();
  if (cap >= 1 && features().avx2) return avx2_kernels();
#endif
  (void)cap;
  return scalar_kernels();
}

}  // namespace

bool avx2_supported() { return features().avx2; }
bool avx512_supported() { return features().avx512; }

const KernelTable& active_kernels() {
  const char* bad = nullptr;
  const int cap = kernels_cap(&bad);
  return table_for_cap(cap < 0 ? 2 : cap);
}

const KernelTable& kernels_from_env() {
  const char* bad = nullptr;
  const int cap = kernels_cap(&bad);
  TORCH_CHECK_VALUE(cap >= 0, "MMMOD_CPU_KERNELS=", bad,
                    " is not a CPU kernel table: expected auto, scalar, avx2 or avx512");
  return table_for_cap(cap);
}

}  // namespace cpu
}  // namespace mmmod
