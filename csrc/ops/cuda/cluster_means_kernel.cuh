#pragma once
// CUDA kernel of cluster_means (launcher: cluster_means_kernel.cu).
#include <cstdint>

#include "common/divide.h"
#include "ops/cluster_means.h"

namespace fsskern {

// One block per (cluster, image); its threads split the channels and walk the points in order,
// so every sum is taken in the same order as on the CPU, with no atomics.
// grid = (k, B), block = min(C, 256) threads.
template <typename scalar_t, typename acc_t>
__global__ void cluster_means_kernel(const scalar_t* __restrict__ features, PointLayout layout,
                                     const int64_t* __restrict__ assign, scalar_t* __restrict__ means,
                                     int64_t* __restrict__ counts, int64_t k, double eps) {
  const int64_t c = blockIdx.x, b = blockIdx.y, N = layout.N, C = layout.C;
  const int64_t* a = assign + b * N;
  int64_t count = 0;
  for (int64_t n = 0; n < N; ++n) count += a[n] == c;
  if (threadIdx.x == 0) counts[b * k + c] = count;
  const acc_t denom = static_cast<acc_t>(count) + static_cast<acc_t>(eps);
  for (int64_t ch = threadIdx.x; ch < C; ch += blockDim.x) {
    acc_t sum = acc_t(0);
    for (int64_t n = 0; n < N; ++n)
      if (a[n] == c) sum += static_cast<acc_t>(features[layout.offset(b, n) + ch * layout.channel_stride]);
    means[(b * k + c) * C + ch] = static_cast<scalar_t>(divide_or_zero(sum, denom));
  }
}

}  // namespace fsskern
