#pragma once
// Warp and block sums used by the reduction kernels.
#if defined(FSSKERN_SIMT)
#include "simt/simt.h"
#endif

namespace fsskern {

constexpr unsigned kFullWarpMask = 0xffffffffu;

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(kFullWarpMask, v, offset);
  return v;  // complete in lane 0
}

// Butterfly sum: every lane gets the total.
template <typename T>
__device__ __forceinline__ T warp_all_sum(T v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullWarpMask, v, offset);
  return v;
}

// Sum over the whole block; every thread must call it (it has barriers) and gets the total.
// `scratch` is a shared array of one T per warp (32 is enough for blocks up to 1024 threads).
template <typename T, typename Scratch>
__device__ T block_sum(T v, Scratch&& scratch) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int num_warps = (blockDim.x + 31) >> 5;
  v = warp_sum(v);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  T total = T(0);
  for (int w = 0; w < num_warps; ++w) total += static_cast<T>(scratch[w]);
  return total;
}

}  // namespace fsskern
