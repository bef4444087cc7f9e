// CPU kernel of cluster_means: threads split the channels, so each thread sums its channel
// slice of every point into its clusters in point order (deterministic, no atomics).
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <vector>

#include "common/cpu_dispatch.h"
#include "common/divide.h"
#include "common/library.h"
#include "ops/cluster_means.h"

namespace fsskern {
namespace {

template <typename scalar_t, typename acc_t>
FSSKERN_CPU_CLONES void add_row(acc_t* acc, const scalar_t* row, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) acc[i] += static_cast<acc_t>(row[i]);
}

template <typename scalar_t>
void cluster_means_typed(const at::Tensor& features, const at::Tensor& assign, int64_t k, double eps,
                         at::Tensor& means, at::Tensor& counts) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = features.size(0), N = features.size(1), C = features.size(2);
  const scalar_t* f = features.const_data_ptr<scalar_t>();
  const int64_t* a = assign.const_data_ptr<int64_t>();
  int64_t* cnt = counts.mutable_data_ptr<int64_t>();
  scalar_t* out = means.mutable_data_ptr<scalar_t>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t n = 0; n < N; ++n)
      if (a[b * N + n] >= 0) cnt[b * k + a[b * N + n]] += 1;
  constexpr int64_t kChannels = 64;
  const int64_t chunks = at::divup(C, kChannels);
  at::parallel_for(0, B * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> sums(k * kChannels);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / chunks, c0 = (task % chunks) * kChannels, width = std::min(kChannels, C - c0);
      std::fill(sums.begin(), sums.end(), acc_t(0));
      for (int64_t n = 0; n < N; ++n) {
        const int64_t c = a[b * N + n];
        if (c >= 0) add_row(sums.data() + c * kChannels, f + (b * N + n) * C + c0, width);
      }
      for (int64_t c = 0; c < k; ++c) {
        const acc_t denom = static_cast<acc_t>(cnt[b * k + c]) + static_cast<acc_t>(eps);
        for (int64_t i = 0; i < width; ++i)
          out[(b * k + c) * C + c0 + i] = static_cast<scalar_t>(divide_or_zero(sums[c * kChannels + i], denom));
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> cluster_means_cpu(const at::Tensor& features, const at::Tensor& assign, int64_t k,
                                                     double eps) {
  check_cluster_means_inputs(features, assign, k, eps);
  const auto f = features.contiguous();
  const auto a = assign.contiguous();
  at::Tensor means = at::zeros({f.size(0), k, f.size(2)}, f.options());
  at::Tensor counts = at::zeros({f.size(0), k}, a.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f.scalar_type(), "fsskern_cluster_means_cpu",
                                  [&] { cluster_means_typed<scalar_t>(f, a, k, eps, means, counts); });
  return {means, counts};
}

}  // namespace

TORCH_LIBRARY_IMPL(FSSKERN_NAMESPACE, CPU, m) { m.impl("cluster_means", &cluster_means_cpu); }

}  // namespace fsskern
