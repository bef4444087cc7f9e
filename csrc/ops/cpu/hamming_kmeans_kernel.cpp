// CPU kernel of hamming_kmeans. Batch items are independent; within one, the assignment splits
// the points over threads (each point's nearest centroid is a loop of xor + popcount, compiled
// to the POPCNT instruction in the x86-64-v3/v4 clones), and the majority vote counts set bits
// per (cluster, bit) in a fixed order.
#include <ATen/Parallel.h>

#include <vector>

#include "common/cpu_dispatch.h"
#include "common/library.h"
#include "ops/hamming_kmeans.h"

namespace fsskern {
namespace {

FSSKERN_CPU_CLONES void assign_points(const int64_t* codes, const bool* valid, const int64_t* centroids, int64_t k,
                                      int64_t* assign, int64_t begin, int64_t end) {
  for (int64_t n = begin; n < end; ++n)
    assign[n] = valid[n] ? nearest_centroid(static_cast<uint64_t>(codes[n]), centroids, k) : -1;
}

void assign_all(const int64_t* codes, const bool* valid, const int64_t* centroids, int64_t k, int64_t* assign,
                int64_t N) {
  at::parallel_for(0, N, 2048, [&](int64_t begin, int64_t end) {
    assign_points(codes, valid, centroids, k, assign, begin, end);
  });
}

// Majority vote of every cluster's members, bit by bit.
void update_centroids(const int64_t* codes, const int64_t* assign, int64_t N, int64_t k, int64_t* centroids,
                      std::vector<int32_t>& ones, std::vector<int64_t>& counts) {
  std::fill(ones.begin(), ones.end(), 0);
  std::fill(counts.begin(), counts.end(), 0);
  for (int64_t n = 0; n < N; ++n) {
    if (assign[n] < 0) continue;
    counts[assign[n]] += 1;
    int32_t* o = ones.data() + assign[n] * 64;
    for (uint64_t bits = static_cast<uint64_t>(codes[n]); bits; bits &= bits - 1) o[__builtin_ctzll(bits)] += 1;
  }
  for (int64_t c = 0; c < k; ++c) centroids[c] = majority_code(centroids[c], ones.data() + c * 64, counts[c]);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> hamming_kmeans_cpu(const at::Tensor& codes, const at::Tensor& valid,
                                                                  const at::Tensor& init, int64_t k, int64_t iters) {
  check_hamming_kmeans_inputs(codes, valid, init, k, iters);
  const auto cc = codes.contiguous();
  const auto vc = valid.contiguous();
  const auto ic = init.contiguous();
  const int64_t B = cc.size(0), N = cc.size(1);
  at::Tensor assign = at::empty({B, N}, cc.options());
  at::Tensor centroids = at::zeros({B, k}, cc.options());
  at::Tensor counts = at::zeros({B, k}, cc.options());
  for (int64_t b = 0; b < B; ++b) {
    const int64_t* x = cc.const_data_ptr<int64_t>() + b * N;
    const bool* v = vc.const_data_ptr<bool>() + b * N;
    int64_t* a = assign.mutable_data_ptr<int64_t>() + b * N;
    int64_t* cent = centroids.mutable_data_ptr<int64_t>() + b * k;
    int64_t* cnt = counts.mutable_data_ptr<int64_t>() + b * k;
    int64_t n_valid = 0;
    for (int64_t n = 0; n < N; ++n) n_valid += v[n];
    if (n_valid <= k) {  // every valid point is its own cluster
      int64_t r = 0;
      for (int64_t n = 0; n < N; ++n) {
        a[n] = v[n] ? r : -1;
        if (v[n]) {
          cent[r] = x[n];
          cnt[r] = 1;
          ++r;
        }
      }
      continue;
    }
    const int64_t* start = ic.const_data_ptr<int64_t>() + b * k;
    for (int64_t c = 0; c < k; ++c) cent[c] = x[start[c]];
    std::vector<int32_t> ones(k * 64);
    std::vector<int64_t> members(k);
    for (int64_t it = 0; it < iters; ++it) {
      assign_all(x, v, cent, k, a, N);
      update_centroids(x, a, N, k, cent, ones, members);
    }
    assign_all(x, v, cent, k, a, N);
    for (int64_t n = 0; n < N; ++n)
      if (a[n] >= 0) cnt[a[n]] += 1;
  }
  return {assign, centroids, counts};
}

}  // namespace

TORCH_LIBRARY_IMPL(FSSKERN_NAMESPACE, CPU, m) { m.impl("hamming_kmeans", &hamming_kmeans_cpu); }

}  // namespace fsskern
