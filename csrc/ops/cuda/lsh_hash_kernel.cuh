#pragma once
// CUDA kernel of lsh_hash. Launcher: lsh_hash_kernel.cu.
#include <cstdint>

#include "ops/lsh_hash.h"

namespace fsskern {

// One thread per point; the projection order is lsh_hash.h's, as on the CPU.
template <typename T>
__global__ void lsh_hash_kernel(const T* __restrict__ x, const T* __restrict__ planes, int64_t* __restrict__ codes,
                                int64_t N, int64_t E, int64_t bits) {
  for (int64_t n = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; n < N; n += int64_t(gridDim.x) * blockDim.x)
    codes[n] = lsh_code(x + n * E, planes, E, bits);
}

}  // namespace fsskern
