// CPU kernel of cluster_means. Both paths sum every (cluster, channel) in point order, so they
// agree bit for bit with each other and with the CUDA kernel, for any thread count.
// - Channels adjacent in memory (points by channels): threads split the channels, and each adds
//   its slice of every point's row into the point's cluster.
// - Otherwise (channel-first maps): threads split the channels into groups of 16 and stream
//   those channels' rows pixel by pixel, adding each pixel's 16 values into its cluster's sums
//   (16 independent additions per pixel).
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

template <typename scalar_t, typename acc_t>
void write_means(const acc_t* sums, int64_t ld, const int64_t* counts, int64_t k, int64_t width, double eps,
                 scalar_t* out, int64_t C) {
  for (int64_t c = 0; c < k; ++c) {
    const acc_t denom = static_cast<acc_t>(counts[c]) + static_cast<acc_t>(eps);
    for (int64_t i = 0; i < width; ++i) out[c * C + i] = static_cast<scalar_t>(divide_or_zero(sums[c * ld + i], denom));
  }
}

template <typename scalar_t>
void means_by_rows(const scalar_t* f, const PointLayout& layout, const int64_t* a, const int64_t* counts, int64_t k,
                   double eps, scalar_t* out) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t kChannels = 64;
  const int64_t N = layout.N, C = layout.C, chunks = at::divup(C, kChannels);
  at::parallel_for(0, layout.B * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> sums(k * kChannels);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / chunks, c0 = (task % chunks) * kChannels, width = std::min(kChannels, C - c0);
      std::fill(sums.begin(), sums.end(), acc_t(0));
      for (int64_t n = 0; n < N; ++n) {
        const int64_t c = a[b * N + n];
        if (c >= 0) add_row(sums.data() + c * kChannels, f + layout.offset(b, n) + c0, width);
      }
      write_means(sums.data(), kChannels, counts + b * k, k, width, eps, out + b * k * C + c0, C);
    }
  });
}

template <typename scalar_t>
void means_by_channels(const scalar_t* f, const PointLayout& layout, const int64_t* a, const int64_t* counts,
                       int64_t k, double eps, scalar_t* out) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t kChannels = 16;
  const int64_t N = layout.N, C = layout.C, M = layout.pixels_per_shot, stride = layout.channel_stride;
  const int64_t chunks = at::divup(C, kChannels);
  at::parallel_for(0, layout.B * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> sums(k * kChannels);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / chunks, c0 = (task % chunks) * kChannels, width = std::min(kChannels, C - c0);
      std::fill(sums.begin(), sums.end(), acc_t(0));
      for (int64_t n0 = 0; n0 < N; n0 += M) {  // one shot's pixels, read row by row
        const scalar_t* shot = f + layout.offset(b, n0) + c0 * stride;
        const int64_t* shot_assign = a + b * N + n0;
        for (int64_t m = 0; m < M; ++m) {
          const int64_t c = shot_assign[m];
          if (c < 0) continue;
          const scalar_t* pixel = shot + m * layout.pixel_stride;
          acc_t* sum = sums.data() + c * kChannels;
          for (int64_t i = 0; i < kChannels; ++i)
            if (i < width) sum[i] += static_cast<acc_t>(pixel[i * stride]);
        }
      }
      write_means(sums.data(), kChannels, counts + b * k, k, width, eps, out + b * k * C + c0, C);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> cluster_means_cpu(const at::Tensor& features, const at::Tensor& assign, int64_t k,
                                                     double eps) {
  check_cluster_means_inputs(features, assign, k, eps);
  const auto layout = point_layout(features);
  const auto a = assign.contiguous();
  at::Tensor means = at::zeros({layout.B, k, layout.C}, features.options());
  at::Tensor counts = at::zeros({layout.B, k}, a.options());
  const int64_t* ap = a.const_data_ptr<int64_t>();
  int64_t* cnt = counts.mutable_data_ptr<int64_t>();
  for (int64_t b = 0; b < layout.B; ++b)
    for (int64_t n = 0; n < layout.N; ++n)
      if (ap[b * layout.N + n] >= 0) cnt[b * k + ap[b * layout.N + n]] += 1;
  if (layout.N == 0 || layout.C == 0) return {means, counts};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features.scalar_type(), "fsskern_cluster_means_cpu", [&] {
    const scalar_t* f = features.const_data_ptr<scalar_t>();
    scalar_t* out = means.mutable_data_ptr<scalar_t>();
    if (layout.channel_stride == 1) {
      means_by_rows(f, layout, ap, cnt, k, eps, out);
    } else {
      means_by_channels(f, layout, ap, cnt, k, eps, out);
    }
  });
  return {means, counts};
}

}  // namespace

TORCH_LIBRARY_IMPL(FSSKERN_NAMESPACE, CPU, m) { m.impl("cluster_means", &cluster_means_cpu); }

}  // namespace fsskern
