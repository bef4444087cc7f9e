#pragma once
// Math that the CPU kernels (g++) and the CUDA kernels (nvcc) both use is written once, in
// headers, as HOST_DEVICE inline functions.
#include <cmath>
#include <type_traits>

#if defined(__CUDACC__)
#define HOST_DEVICE __host__ __device__ __forceinline__
#else
#define HOST_DEVICE inline
#endif

// a * b + c rounded after the multiply and after the add, as PyTorch's separate elementwise ops
// compute it. Fusing the two into one FMA changes the last bit, which min-max normalisation can
// blow up; the CPU build compiles with -ffp-contract=off, device code asks for it explicitly.
template <typename T>
HOST_DEVICE T mul_add_unfused(T a, T b, T c) {
#if defined(__CUDA_ARCH__)
  if constexpr (std::is_same_v<T, float>) {
    return __fadd_rn(__fmul_rn(a, b), c);
  } else {
    return __dadd_rn(__dmul_rn(a, b), c);
  }
#else
  return a * b + c;
#endif
}

// a * b + c rounded once (IEEE fused multiply-add) on every backend: std::fma on the CPU (the
// FMA instruction in the x86-64-v3/v4 clones, a correctly rounded library call otherwise), the
// fma instruction on the GPU. Bit-identical everywhere, and half the instructions of the above.
template <typename T>
HOST_DEVICE T mul_add_fused(T a, T b, T c) {
#if defined(__CUDA_ARCH__)
  return fma(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}
