// CPU kernel of lsh_hash: one task per block of 16 points of one row of x. The block's points
// are the 16 lanes of a vector; for each channel in increasing order, one fused multiply-add
// per plane adds x[point, channel] * plane[channel] to that plane's vector. Every lane thus
// follows lsh_hash.h's order, so the codes equal the CUDA kernel's. Planes are taken 16 at a
// time so that their accumulators stay in registers (with AVX-512, 16 of the 32).
// Points adjacent in memory (channel-first maps) are read in place. Row-major points are first
// turned into vectors of channels, 16 x 16 tiles at a time in registers; anything else (other
// strides, a last partial block) is copied channel by channel into the same small buffer, and
// so is a float16/bfloat16 x, widened to float32 on the way.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS  // per-operator ATen headers only (setup.py)
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <cstring>
#include <vector>

#include "common/cpu_dispatch.h"
#include "common/library.h"
#include "common/transpose_tile.h"
#include "ops/lsh_hash.h"

namespace fsskern {
namespace {

constexpr int kPointsPerBlock = 16;
static_assert(kPointsPerBlock == kTile, "a block of points is one tile wide");
constexpr int kPlanesPerPass = 16;

// GCC vector extension: one lane per point of a block, lowered to the clone's instruction set.
template <typename T>
struct PointLanes {
  typedef T type __attribute__((vector_size(kPointsPerBlock * sizeof(T))));
};

// block: channel c of point l at block[c * ld + l]. weights: (E, padded) channel-major, planes
// zero-padded to a multiple of 16, so one channel's 16 plane weights share a cache line.
template <typename T>
FSSKERN_CPU_CLONES void hash_block(const T* block, int64_t ld, const T* weights, int64_t padded,
                                   const T* thresholds, int64_t E, int64_t bits, int points, int64_t* codes) {
  using Lanes = typename PointLanes<T>::type;
  uint64_t code[kPointsPerBlock] = {};
  for (int64_t b0 = 0; b0 < bits; b0 += kPlanesPerPass) {
    Lanes acc[kPlanesPerPass];
    for (auto& a : acc) a = Lanes{};
    for (int64_t c = 0; c < E; ++c) {
      Lanes x;
      for (int l = 0; l < kPointsPerBlock; ++l) x[l] = block[c * ld + l];
      // A block reads one cache line from each of E channel rows: too many streams for the
      // hardware prefetcher, so ask for the line 4 blocks ahead in the same row (1.5x faster).
      if (b0 == 0) __builtin_prefetch(block + c * ld + 4 * kPointsPerBlock);
      const T* w = weights + c * padded + b0;
#pragma GCC unroll 16
      for (int b = 0; b < kPlanesPerPass; ++b) {
#pragma omp simd
        for (int l = 0; l < kPointsPerBlock; ++l) acc[b][l] = mul_add_fused(x[l], w[b], acc[b][l]);
      }
    }
    for (int b = 0; b < kPlanesPerPass && b0 + b < bits; ++b)
      for (int l = 0; l < points; ++l)
        if (acc[b][l] > thresholds[b0 + b]) code[l] |= uint64_t(1) << (b0 + b);
  }
  for (int l = 0; l < points; ++l) codes[l] = static_cast<int64_t>(code[l]);
}

// 16 row-major points (rows point_stride apart, E a multiple of 16) into block[c * 16 + l],
// 16 x 16 tiles at a time through registers.
template <typename T>
FSSKERN_CPU_CLONES void transpose_points(const T* points, int64_t point_stride, int64_t E, T* block) {
  using Row = typename TileRow<T>::type;
  for (int64_t c0 = 0; c0 < E; c0 += kTile) {
    Row tile[kTile];
    for (int l = 0; l < kTile; ++l) std::memcpy(&tile[l], points + l * point_stride + c0, sizeof(Row));
    transpose_tile<T>(tile);
    for (int i = 0; i < kTile; ++i) std::memcpy(block + (c0 + i) * kPointsPerBlock, &tile[i], sizeof(Row));
  }
}

// Codes of x3 (M, N, E, any strides) against weights (E, padded) and thresholds (bits,), in T.
template <typename In>
void hash_points(const at::Tensor& x3, const at::Tensor& weights, const at::Tensor& thresholds, int64_t bits,
                 at::Tensor& codes) {
  using T = at::opmath_type<In>;
  const int64_t M = x3.size(0), N = x3.size(1), E = x3.size(2), padded = weights.size(1);
  const int64_t row_stride = x3.stride(0), point_stride = x3.stride(1), channel_stride = x3.stride(2);
  const int64_t blocks = at::divup(N, kPointsPerBlock);
  const In* xp = x3.const_data_ptr<In>();
  const T* wp = weights.const_data_ptr<T>();
  const T* tp = thresholds.const_data_ptr<T>();
  int64_t* out = codes.mutable_data_ptr<int64_t>();
  at::parallel_for(0, M * blocks, 8, [&](int64_t begin, int64_t end) {
    std::vector<T> buffer(E * kPointsPerBlock);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t m = task / blocks, n0 = task % blocks * kPointsPerBlock;
      const int points = static_cast<int>(std::min<int64_t>(kPointsPerBlock, N - n0));
      const In* first = xp + m * row_stride + n0 * point_stride;
      int64_t* block_codes = out + m * N + n0;
      if constexpr (std::is_same_v<In, T>) {  // read in place where the layout allows
        if (point_stride == 1 && points == kPointsPerBlock) {
          hash_block(first, channel_stride, wp, padded, tp, E, bits, points, block_codes);
          continue;
        }
        if (channel_stride == 1 && points == kPointsPerBlock && E % kTile == 0) {
          transpose_points(first, point_stride, E, buffer.data());
          hash_block(buffer.data(), kPointsPerBlock, wp, padded, tp, E, bits, points, block_codes);
          continue;
        }
      }
      for (int64_t c = 0; c < E; ++c)
        for (int l = 0; l < kPointsPerBlock; ++l)
          buffer[c * kPointsPerBlock + l] =
              l < points ? static_cast<T>(first[l * point_stride + c * channel_stride]) : T(0);
      hash_block(buffer.data(), kPointsPerBlock, wp, padded, tp, E, bits, points, block_codes);
    }
  });
}

at::Tensor lsh_hash_cpu(const at::Tensor& x, const at::Tensor& planes) {
  check_lsh_hash_inputs(x, planes);
  const auto x3 = lsh_hash_as_3d(x);
  const auto pc = planes.contiguous();
  const int64_t E = x3.size(2), bits = pc.size(0);
  at::Tensor codes = at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(at::kLong));
  if (codes.numel() == 0) return codes;
  // (E, bits padded to 16) weights, channel-major, and the thresholds.
  const int64_t padded = at::divup(bits, kPlanesPerPass) * kPlanesPerPass;
  const auto weights = at::zeros({E, padded}, pc.options());
  weights.narrow(1, 0, bits).copy_(pc.narrow(1, 0, E).t());
  const auto thresholds = pc.select(1, E).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fsskern_lsh_hash_cpu",
                                  [&] { hash_points<scalar_t>(x3, weights, thresholds, bits, codes); });
  return codes;
}

}  // namespace

TORCH_LIBRARY_IMPL(FSSKERN_NAMESPACE, CPU, m) { m.impl("lsh_hash", &lsh_hash_cpu); }

}  // namespace fsskern
