#pragma once
// CUDA kernels of hamming_kmeans (launcher: hamming_kmeans_kernel.cu). Only integer arithmetic
// (popcounts, integer atomics), so every schedule of threads gives the CPU's exact result.
#include <cstdint>

#include "common/shared_memory.cuh"
#include "ops/hamming_kmeans.h"

namespace fsskern {

// grid = (ceil(N / blockDim), B); dynamic shared memory holds the k centroids of the row.
// Rows with no more valid points than clusters (active[b] == 0) keep their assignment.
__global__ void kmeans_assign_kernel(const int64_t* __restrict__ codes, const bool* __restrict__ valid,
                                     const int64_t* __restrict__ centroids, const uint8_t* __restrict__ active,
                                     int64_t* __restrict__ assign, int64_t N, int64_t k) {
  FSSKERN_DYNAMIC_SHARED(int64_t, local);
  const int64_t b = blockIdx.y;
  if (!active[b]) return;  // uniform over the block
  for (int64_t c = threadIdx.x; c < k; c += blockDim.x) local[c] = centroids[b * k + c];
  __syncthreads();
  const int64_t n = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (n >= N) return;
  const int64_t i = b * N + n;
  assign[i] = valid[i] ? nearest_centroid(static_cast<uint64_t>(codes[i]), local, k) : -1;
}

// Per (cluster, bit) counts of set bits and per-cluster member counts; zeroed by the launcher.
__global__ void kmeans_count_bits_kernel(const int64_t* __restrict__ codes, const int64_t* __restrict__ assign,
                                         const uint8_t* __restrict__ active, int32_t* __restrict__ ones,
                                         int32_t* __restrict__ members, int64_t B, int64_t N, int64_t k) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < B * N; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = i / N, c = assign[i];
    if (!active[b] || c < 0) continue;
    atomicAdd(members + b * k + c, 1);
    for (uint64_t bits = static_cast<uint64_t>(codes[i]); bits; bits &= bits - 1)
      atomicAdd(ones + (b * k + c) * 64 + (__ffsll(static_cast<long long>(bits)) - 1), 1);
  }
}

// One thread per (b, cluster): the majority vote.
__global__ void kmeans_update_kernel(const int32_t* __restrict__ ones, const int32_t* __restrict__ members,
                                     const uint8_t* __restrict__ active, int64_t* __restrict__ centroids, int64_t B,
                                     int64_t k) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < B * k; i += int64_t(gridDim.x) * blockDim.x) {
    if (active[i / k]) centroids[i] = majority_code(centroids[i], ones + i * 64, members[i]);
  }
}

}  // namespace fsskern
