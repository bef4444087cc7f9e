#pragma once
// CUDA kernels of masked_average_pool. Launchers: masked_average_pool_kernel.cu.
#include <cstdint>

#include "common/cuda_reduce.cuh"
#include "common/divide.h"
#include "common/resample.h"

namespace fsskern {

// One thread per destination pixel of every plane, grid-stride. kTranspose = false: dst
// (planes, dst_h, dst_w) is src (planes, src_h, src_w) sampled bilinear. kTranspose = true: dst
// collects src through the taps of sampling (dst_h, dst_w) to (src_h, src_w), the adjoint,
// written as a gather rather than an atomic scatter so results do not depend on thread order.
template <typename T, bool kTranspose>
__global__ void resample_kernel(const T* __restrict__ src, T* __restrict__ dst, int64_t planes, int64_t src_h,
                                int64_t src_w, int64_t dst_h, int64_t dst_w, bool align_corners) {
  const int64_t total = planes * dst_h * dst_w;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t p = idx / (dst_h * dst_w), rem = idx % (dst_h * dst_w);
    const T* plane = src + p * src_h * src_w;
    dst[idx] = kTranspose
                   ? bilinear_adjoint_at(plane, dst_h, dst_w, src_h, src_w, align_corners, rem / dst_w, rem % dst_w)
                   : bilinear_gather_at(plane, src_h, src_w, dst_h, dst_w, align_corners, rem / dst_w, rem % dst_w);
  }
}

// One warp per output (b, n, c): the warp strides over the P pixels of the feature row and the
// weight row together (both contiguous, so loads coalesce), then reduces with shuffles.
// Launch: block = 32 * kWarpsPerBlock threads, grid = (ceil(C / kWarpsPerBlock), N, B).
constexpr int kWeightedSumWarpsPerBlock = 8;

template <typename scalar_t, typename acc_t>
__global__ void weighted_sum_kernel(const scalar_t* __restrict__ features, const acc_t* __restrict__ weights,
                                    const acc_t* __restrict__ denom, scalar_t* __restrict__ out, int64_t C,
                                    int64_t N, int64_t P) {
  const int lane = threadIdx.x & 31;
  const int64_t c = int64_t(blockIdx.x) * kWeightedSumWarpsPerBlock + (threadIdx.x >> 5);
  const int64_t n = blockIdx.y, b = blockIdx.z;
  if (c >= C) return;  // c is the same for all lanes of a warp: whole warps leave together
  const scalar_t* f = features + (b * C + c) * P;
  const acc_t* w = weights + (b * N + n) * P;
  acc_t acc = acc_t(0);
  for (int64_t p = lane; p < P; p += 32) acc += static_cast<acc_t>(f[p]) * w[p];
  acc = warp_sum(acc);
  if (lane == 0) out[(b * N + n) * C + c] = static_cast<scalar_t>(divide_or_zero(acc, denom[b * N + n]));
}

}  // namespace fsskern
