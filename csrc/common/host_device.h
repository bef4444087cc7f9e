#pragma once
// Math that the CPU kernels (g++) and the CUDA kernels (nvcc) both use is written once, in
// headers, as HOST_DEVICE inline functions.
#if defined(__CUDACC__)
#define HOST_DEVICE __host__ __device__ __forceinline__
#else
#define HOST_DEVICE inline
#endif
