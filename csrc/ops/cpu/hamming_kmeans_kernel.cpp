// CPU kernels of hamming_kmeans (orchestration: ../hamming_kmeans.cpp). The assignment splits the
// points over threads (each point's nearest centroid is a loop of xor + popcount, compiled to the
// POPCNT instruction in the x86-64-v3/v4 clones); the majority vote counts set bits per
// (cluster, bit) in point order.
#include <ATen/Parallel.h>

#include <vector>

#include "common/cpu_dispatch.h"
#include "ops/hamming_kmeans.h"

namespace fsskern {
namespace {

FSSKERN_CPU_CLONES void assign_points(const int64_t* codes, const bool* valid, const int64_t* centroids, int64_t k,
                                      int64_t* assign, int64_t begin, int64_t end) {
  for (int64_t n = begin; n < end; ++n)
    assign[n] = valid[n] ? nearest_centroid(static_cast<uint64_t>(codes[n]), centroids, k) : -1;
}

void assign_cpu(const at::Tensor& codes, const at::Tensor& valid, const at::Tensor& centroids,
                const at::Tensor& active, at::Tensor& assign) {
  const int64_t B = codes.size(0), N = codes.size(1), k = centroids.size(1);
  for (int64_t b = 0; b < B; ++b) {
    if (!active.const_data_ptr<uint8_t>()[b]) continue;
    at::parallel_for(0, N, 2048, [&](int64_t begin, int64_t end) {
      assign_points(codes.const_data_ptr<int64_t>() + b * N, valid.const_data_ptr<bool>() + b * N,
                    centroids.const_data_ptr<int64_t>() + b * k, k, assign.mutable_data_ptr<int64_t>() + b * N,
                    begin, end);
    });
  }
}

void update_cpu(const at::Tensor& codes, const at::Tensor& assign, const at::Tensor& active, at::Tensor& centroids) {
  const int64_t B = codes.size(0), N = codes.size(1), k = centroids.size(1);
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> ones(k * 64);
    std::vector<int64_t> members(k);
    for (int64_t b = begin; b < end; ++b) {
      if (!active.const_data_ptr<uint8_t>()[b]) continue;
      const int64_t* x = codes.const_data_ptr<int64_t>() + b * N;
      const int64_t* a = assign.const_data_ptr<int64_t>() + b * N;
      std::fill(ones.begin(), ones.end(), 0);
      std::fill(members.begin(), members.end(), 0);
      for (int64_t n = 0; n < N; ++n) {
        if (a[n] < 0) continue;
        members[a[n]] += 1;
        int32_t* o = ones.data() + a[n] * 64;
        for (uint64_t bits = static_cast<uint64_t>(x[n]); bits; bits &= bits - 1) o[__builtin_ctzll(bits)] += 1;
      }
      int64_t* cent = centroids.mutable_data_ptr<int64_t>() + b * k;
      for (int64_t c = 0; c < k; ++c) cent[c] = majority_code(cent[c], ones.data() + c * 64, members[c]);
    }
  });
}

constexpr KmeansKernels kCpuKernels{&assign_cpu, &update_cpu};

}  // namespace

TORCH_LIBRARY_IMPL(FSSKERN_NAMESPACE, CPU, m) { register_hamming_kmeans<kCpuKernels>(m); }

}  // namespace fsskern
