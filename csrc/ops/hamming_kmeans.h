#pragma once
// hamming_kmeans: k-means over binary codes with the Hamming distance, UMTFSS's algorithm made
// deterministic. Per batch item, over its valid points:
//   - fewer valid points than clusters (n <= k): point r (in index order) is cluster r, its own
//     centroid; clusters n.. stay empty;
//   - otherwise centroids start as the codes of the k `init` points, and `iters` times: assign
//     every point to the nearest centroid (popcount of the xor, lowest cluster index on ties),
//     then set every centroid bit to the majority of its members' bits (a tie keeps the
//     previous bit, an empty cluster keeps its code). A final assignment pairs the returned
//     centroids with the returned assignment, and counts come from it.
// Invalid points are assigned -1. All integer arithmetic: CPU and CUDA give identical results.
#include <ATen/core/Tensor.h>

#include <cstdint>

#include "common/host_device.h"
#include "common/library.h"

namespace fsskern {

HOST_DEVICE int popcount64(uint64_t x) {
#if defined(__CUDA_ARCH__)
  return __popcll(x);
#else
  return __builtin_popcountll(x);
#endif
}

// Index of the centroid nearest to `code`; the lowest index wins ties.
template <typename Centroids>
HOST_DEVICE int64_t nearest_centroid(uint64_t code, const Centroids& centroids, int64_t k) {
  int best = 65;
  int64_t arg = 0;
  for (int64_t c = 0; c < k; ++c) {
    const int d = popcount64(code ^ static_cast<uint64_t>(static_cast<int64_t>(centroids[c])));
    if (d < best) {
      best = d;
      arg = c;
    }
  }
  return arg;
}

// A centroid from the per-bit counts of set bits among its `count` members.
HOST_DEVICE int64_t majority_code(int64_t previous, const int32_t* ones, int64_t count) {
  if (count == 0) return previous;
  const uint64_t prev = static_cast<uint64_t>(previous);
  uint64_t code = 0;
  for (int b = 0; b < 64; ++b) {
    const int64_t twice = 2 * static_cast<int64_t>(ones[b]);
    const uint64_t bit = twice > count ? 1u : (twice < count ? 0u : (prev >> b) & 1u);
    code |= bit << b;
  }
  return static_cast<int64_t>(code);
}

// What a backend supplies; the rest (the n <= k rows, the starting centroids, the iteration,
// the counts) is written once with tensor ops in hamming_kmeans.cpp. `active` (B,) uint8 marks
// the rows that cluster (more valid points than clusters); kernels leave the other rows alone.
struct KmeansKernels {
  // assign[b, n] = nearest centroid of codes[b, n], or -1 for an invalid point.
  void (*assign)(const at::Tensor& codes, const at::Tensor& valid, const at::Tensor& centroids,
                 const at::Tensor& active, at::Tensor& assign);
  // One majority-vote update of the centroids from the assignment.
  void (*update)(const at::Tensor& codes, const at::Tensor& assign, const at::Tensor& active, at::Tensor& centroids);
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> hamming_kmeans_impl(const KmeansKernels& kernels,
                                                                   const at::Tensor& codes, const at::Tensor& valid,
                                                                   const at::Tensor& init, int64_t k, int64_t iters);

template <const KmeansKernels& kernels>
void register_hamming_kmeans(torch::Library& m) {
  m.impl("hamming_kmeans", [](const at::Tensor& codes, const at::Tensor& valid, const at::Tensor& init, int64_t k,
                              int64_t iters) { return hamming_kmeans_impl(kernels, codes, valid, init, k, iters); });
}

}  // namespace fsskern
