#pragma once
// Host-compiler stand-ins for the CUDA built-ins fsskern's kernels use. Included (through
// common/launch.cuh) when the .cu sources are compiled as C++ with FSSKERN_SIMT defined: the
// kernels and launchers then run on the CPU under the emulation runtime (runtime.h).
// Not covered: the memory model between blocks (blocks run one after another or in parallel
// with plain stores), timing, occupancy and register limits, texture/surface and tensor-core
// instructions, cooperative groups.
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "simt/runtime.h"
#include "simt/shared.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)

using fsskern::simt::dim3;

#define threadIdx (::fsskern::simt::current_thread().thread_idx)
#define blockIdx (::fsskern::simt::current_thread().block_idx)
#define blockDim (::fsskern::simt::current_thread().block_dim)
#define gridDim (::fsskern::simt::current_thread().grid_dim)
constexpr int warpSize = 32;

#define FSSKERN_SIMT_STR2(x) #x
#define FSSKERN_SIMT_STR(x) FSSKERN_SIMT_STR2(x)
#define FSSKERN_SIMT_SITE __FILE__ ":" FSSKERN_SIMT_STR(__LINE__)

#define __syncthreads() ::fsskern::simt::sync_threads(FSSKERN_SIMT_SITE)
#define __syncwarp(...) ::fsskern::simt::syncwarp(FSSKERN_SIMT_SITE, ##__VA_ARGS__)
#define __shfl_sync(mask, v, lane, ...) \
  ::fsskern::simt::shuffle(FSSKERN_SIMT_SITE, ::fsskern::simt::WarpOp::ShflIdx, mask, v, lane, ##__VA_ARGS__)
#define __shfl_up_sync(mask, v, delta, ...) \
  ::fsskern::simt::shuffle(FSSKERN_SIMT_SITE, ::fsskern::simt::WarpOp::ShflUp, mask, v, delta, ##__VA_ARGS__)
#define __shfl_down_sync(mask, v, delta, ...) \
  ::fsskern::simt::shuffle(FSSKERN_SIMT_SITE, ::fsskern::simt::WarpOp::ShflDown, mask, v, delta, ##__VA_ARGS__)
#define __shfl_xor_sync(mask, v, lane_mask, ...) \
  ::fsskern::simt::shuffle(FSSKERN_SIMT_SITE, ::fsskern::simt::WarpOp::ShflXor, mask, v, lane_mask, ##__VA_ARGS__)
#define __ballot_sync(mask, pred) \
  static_cast<unsigned>(::fsskern::simt::vote(FSSKERN_SIMT_SITE, ::fsskern::simt::WarpOp::Ballot, mask, pred))
#define __any_sync(mask, pred) \
  static_cast<int>(::fsskern::simt::vote(FSSKERN_SIMT_SITE, ::fsskern::simt::WarpOp::Any, mask, pred))
#define __all_sync(mask, pred) \
  static_cast<int>(::fsskern::simt::vote(FSSKERN_SIMT_SITE, ::fsskern::simt::WarpOp::All, mask, pred))

namespace fsskern {
namespace simt {

inline void syncwarp(const char* site, unsigned mask = 0xffffffffu) {
  warp_collective(site, WarpOp::Sync, mask, 0, 0, 32);
}

template <typename T>
T shuffle(const char* site, WarpOp op, unsigned mask, T v, int arg, int width = 32) {
  static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable_v<T>, "shuffles move up to 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  bits = warp_collective(site, op, mask, bits, arg, width);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

inline uint64_t vote(const char* site, WarpOp op, unsigned mask, bool pred) {
  return warp_collective(site, op, mask, pred ? 1 : 0, 0, 32);
}

// Global-memory atomics: blocks may run on different OS threads, so these are real atomics.
template <typename T>
T atomic_add(T* p, T v) {
  return std::atomic_ref<T>(*p).fetch_add(v);
}
template <typename T>
T atomic_cas(T* p, T expected, T desired) {
  std::atomic_ref<T>(*p).compare_exchange_strong(expected, desired);
  return expected;
}
template <typename T, typename Pick>
T atomic_update(T* p, T v, Pick pick) {
  std::atomic_ref<T> ref(*p);
  T old = ref.load();
  while (!ref.compare_exchange_weak(old, pick(old, v))) {
  }
  return old;
}

}  // namespace simt
}  // namespace fsskern

template <typename T>
T atomicAdd(T* p, T v) { return ::fsskern::simt::atomic_add(p, v); }
template <typename T>
T atomicExch(T* p, T v) { return std::atomic_ref<T>(*p).exchange(v); }
template <typename T>
T atomicCAS(T* p, T expected, T desired) { return ::fsskern::simt::atomic_cas(p, expected, desired); }
template <typename T>
T atomicMax(T* p, T v) { return ::fsskern::simt::atomic_update(p, v, [](T a, T b) { return a > b ? a : b; }); }
template <typename T>
T atomicMin(T* p, T v) { return ::fsskern::simt::atomic_update(p, v, [](T a, T b) { return a < b ? a : b; }); }

// Shared-memory atomics (&array[i] is a checked pointer): the block runs on one OS thread.
template <typename T>
T atomicAdd(::fsskern::simt::SharedPtr<T> p, T v) { T* raw = (*p).raw_for_atomic(); T old = *raw; *raw = old + v; return old; }
template <typename T>
T atomicExch(::fsskern::simt::SharedPtr<T> p, T v) { T* raw = (*p).raw_for_atomic(); T old = *raw; *raw = v; return old; }
template <typename T>
T atomicCAS(::fsskern::simt::SharedPtr<T> p, T expected, T desired) {
  T* raw = (*p).raw_for_atomic();
  T old = *raw;
  if (old == expected) *raw = desired;
  return old;
}
template <typename T>
T atomicMax(::fsskern::simt::SharedPtr<T> p, T v) { T* raw = (*p).raw_for_atomic(); T old = *raw; *raw = old > v ? old : v; return old; }
template <typename T>
T atomicMin(::fsskern::simt::SharedPtr<T> p, T v) { T* raw = (*p).raw_for_atomic(); T old = *raw; *raw = old < v ? old : v; return old; }

inline int __popc(unsigned int x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x)); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
template <typename T>
T __ldg(const T* p) { return *p; }

// Float intrinsics: IEEE round-to-nearest, no contraction (the build uses -ffp-contract=off).
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
