// CPU kernel of cluster_means. Both paths sum every (cluster, channel) in point order, so they
// agree bit for bit with each other and with the CUDA kernel, for any thread count.
// - Channels adjacent in memory (points by channels): threads split the channels, and each adds
//   its slice of every point's row into the point's cluster.
// - Otherwise (channel-first maps): threads split the channels into groups of 16; tiles of 16
//   channels x 16 pixels are transposed in registers, so each pixel adds its 16 values to its
//   cluster's sums in one vector addition.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS  // per-operator ATen headers only (setup.py)
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/zeros.h>

#include <cstring>
#include <vector>

#include "common/cpu_dispatch.h"
#include "common/divide.h"
#include "common/library.h"
#include "common/transpose_tile.h"
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

// One task: 16 channels of image b, over every shot's pixels, 16 pixels at a time: the tile
// (16 channel rows x 16 pixels) is loaded, transposed in registers, and each pixel's 16 values
// added to its cluster's 16 sums in one vector addition.
template <typename scalar_t, typename acc_t>
FSSKERN_CPU_CLONES void sum_channel_group(const scalar_t* f, const PointLayout& layout, const int64_t* a, int64_t b,
                                          int64_t c0, int64_t width, acc_t* sums) {
  using Row = typename TileRow<acc_t>::type;
  const int64_t N = layout.N, M = layout.pixels_per_shot, stride = layout.channel_stride;
  for (int64_t n0 = 0; n0 < N; n0 += M) {  // one shot
    const scalar_t* shot = f + layout.offset(b, n0) + c0 * stride;
    const int64_t* shot_assign = a + b * N + n0;
    for (int64_t m0 = 0; m0 < M; m0 += kTile) {
      const int64_t pixels = std::min<int64_t>(kTile, M - m0);
      Row tile[kTile];
      if (width == kTile && pixels == kTile && layout.pixel_stride == 1) {
        for (int i = 0; i < kTile; ++i)
#pragma omp simd
          for (int l = 0; l < kTile; ++l) tile[i][l] = static_cast<acc_t>(shot[i * stride + m0 + l]);
      } else {  // an edge of the maps, or pixels not adjacent: zeros outside
        for (int i = 0; i < kTile; ++i)
          for (int l = 0; l < kTile; ++l)
            tile[i][l] = i < width && l < pixels ? static_cast<acc_t>(shot[i * stride + (m0 + l) * layout.pixel_stride])
                                                 : acc_t(0);
      }
      transpose_tile<acc_t>(tile);
      for (int64_t l = 0; l < pixels; ++l) {
        if (shot_assign[m0 + l] < 0) continue;
        acc_t* sum = sums + shot_assign[m0 + l] * kTile;  // (unaligned: memcpy, not a Row*)
        Row row;
        std::memcpy(&row, sum, sizeof(Row));
        row += tile[l];
        std::memcpy(sum, &row, sizeof(Row));
      }
    }
  }
}

template <typename scalar_t>
void means_by_channels(const scalar_t* f, const PointLayout& layout, const int64_t* a, const int64_t* counts,
                       int64_t k, double eps, scalar_t* out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = layout.C, chunks = at::divup(C, int64_t(kTile));
  at::parallel_for(0, layout.B * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> sums(k * kTile);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / chunks, c0 = (task % chunks) * kTile, width = std::min<int64_t>(kTile, C - c0);
      std::fill(sums.begin(), sums.end(), acc_t(0));
      sum_channel_group<scalar_t, acc_t>(f, layout, a, b, c0, width, sums.data());
      write_means(sums.data(), kTile, counts + b * k, k, width, eps,
                  out + b * k * C + c0, C);
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
