#pragma once
// CUDA kernel of lsh_hash. Launcher: lsh_hash_kernel.cu.
#include <cstdint>

#include "ops/lsh_hash.h"

namespace fsskern {

// One thread per point of x seen as (M, N, E) with strides; the projection order is
// lsh_hash.h's, as on the CPU. In channel-first maps neighbouring threads read neighbouring
// pixels, so the loads coalesce.
template <typename T, typename In>
__global__ void lsh_hash_kernel(const In* __restrict__ x, const T* __restrict__ planes, int64_t* __restrict__ codes,
                                int64_t M, int64_t N, int64_t E, int64_t row_stride, int64_t point_stride,
                                int64_t channel_stride, int64_t bits) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < M * N; i += int64_t(gridDim.x) * blockDim.x)
    codes[i] = lsh_code(x + i / N * row_stride + i % N * point_stride, channel_stride, planes, E, bits);
}

}  // namespace fsskern
