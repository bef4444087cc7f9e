#pragma once
// Runtime CPU dispatch for the vectorised CPU loops. The loops are plain C++ with
// `#pragma omp simd`; the compiler emits one clone per instruction set and the loader picks the
// best one for the CPU at hand (GNU ifunc). A build made on an AVX-512 machine therefore still
// runs on a CPU with only AVX2 or only SSE2. Other compilers/architectures get the plain loop.
//
// AVX-512 VPOPCNTDQ (a vector popcount) belongs to no x86-64 level, so loops that count bits
// get one more version, FSSKERN_TARGET_VPOPCNT, chosen when cpu_has_vpopcnt(). FSSKERN_VPOPCNT=0
// in the environment turns it off (the tests run the other version that way).
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__)
#define FSSKERN_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define FSSKERN_TARGET_VPOPCNT __attribute__((target("arch=x86-64-v4,avx512vpopcntdq")))
inline bool cpu_has_vpopcnt() {
  static const bool has = [] {
    const char* setting = std::getenv("FSSKERN_VPOPCNT");
    return __builtin_cpu_supports("avx512vpopcntdq") && !(setting && std::strcmp(setting, "0") == 0);
  }();
  return has;
}
#else
#define FSSKERN_CPU_CLONES
#define FSSKERN_TARGET_VPOPCNT
inline bool cpu_has_vpopcnt() { return false; }
#endif
