// Which SIMD bodies the kernels run (omnitalk/csrc/gemv.cpp, decode.cpp), decided once per process.
#pragma once

#include <cstdlib>
#include <string>

namespace omnitalk_isa {

// OMNITALK_KERNELS_ISA=avx2 runs the AVX2 bodies on an AVX-512 CPU (tests, comparisons).
inline bool has_avx512() {
  static const bool yes = [] {
    const char* want = std::getenv("OMNITALK_KERNELS_ISA");
    if (want && std::string(want) == "avx2") return false;
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl");
  }();
  return yes;
}

inline bool has_avx2() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }

// AVX-512 VNNI (vpdpbusd): int8 weights x 8-bit activations in gemv.cpp; off with OMNITALK_KERNELS_ISA=avx2.
inline bool has_vnni() {
  static const bool yes = has_avx512() && __builtin_cpu_supports("avx512vnni");
  return yes;
}

}  // namespace omnitalk_isa
