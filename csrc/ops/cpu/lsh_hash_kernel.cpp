// CPU kernel of lsh_hash: one task per block of points. Each 16-element chunk of a point is
// loaded once and fed to the accumulators of 16 planes (16 lanes = one AVX-512 register per
// plane, all 16 kept in registers); then the 16 planes' lanes are added pairwise, 8 apart,
// 4, 2, 1, for all planes at once with vector shuffles. That is lsh_hash.h's fixed summation
// schedule, so the codes equal the CUDA kernel's.
#include <ATen/Parallel.h>

#include <cstring>
#include <type_traits>

#include "common/cpu_dispatch.h"
#include "common/library.h"
#include "ops/lsh_hash.h"

namespace fsskern {
namespace {

// Planes are taken 16 at a time; `planes` is padded with zero planes to a multiple of 16,
// their bits never set.
constexpr int kPlanesPerPass = 16;
static_assert(kPlanesPerPass == kLshLanes, "the lane reduction below pairs planes with lanes");

// GCC vector extensions: 16 lanes of T, lowered to whatever the clone's instruction set has.
template <typename T>
struct LaneVector;
template <>
struct LaneVector<float> {
  typedef float type __attribute__((vector_size(64)));
  typedef int32_t index __attribute__((vector_size(64)));
};
template <>
struct LaneVector<double> {
  typedef double type __attribute__((vector_size(128)));
  typedef int64_t index __attribute__((vector_size(128)));
};

// out[b] = lsh_reduce_lanes(lanes[b]) for 16 planes b. Each step adds the lower and upper halves
// of every lane group of two planes' vectors into one vector, so after 4 steps one vector holds
// the 16 sums in plane order; every addition is lane[l] + lane[l + width] of one plane.
template <typename T>
inline void reduce_lanes_of_16_planes(typename LaneVector<T>::type* v, T* out) {
  using Index = typename LaneVector<T>::index;
  const Index lo8 = {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23};
  const Index lo4 = {0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27};
  const Index lo2 = {0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29};
  const Index lo1 = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30};
  int count = kLshLanes;
  for (const auto& [lo, width] : {std::pair{lo8, 8}, std::pair{lo4, 4}, std::pair{lo2, 2}, std::pair{lo1, 1}}) {
    count /= 2;
    for (int j = 0; j < count; ++j)
      v[j] = __builtin_shuffle(v[2 * j], v[2 * j + 1], lo) + __builtin_shuffle(v[2 * j], v[2 * j + 1], lo + width);
  }
  std::memcpy(out, &v[0], sizeof(v[0]));
}

// planes: (bits padded to 16, E padded to 16) row-major with zeros in the padding, so a point's
// last partial chunk, padded with zeros too, adds fma(0, 0, lane) = lane to the unused lanes:
// the same result as leaving them alone, with no tail loop to push the accumulators to memory.
// Blocks of 16 planes are the outer loop so that one block (16 KiB in fp32 at E = 256) stays
// in L1 while the points stream past it.
template <typename T>
FSSKERN_CPU_CLONES void hash_rows(const T* x, const T* planes, const T* thresholds, int64_t E, int64_t E_padded,
                                  int64_t bits, int64_t* codes, int64_t n) {
  using Lanes = typename LaneVector<T>::type;
  for (int64_t r = 0; r < n; ++r) codes[r] = 0;
  for (int64_t b0 = 0; b0 < bits; b0 += kPlanesPerPass) {
    const T* block = planes + b0 * E_padded;
    for (int64_t r = 0; r < n; ++r) {
      const T* p = x + r * E;
      T tail[kLshLanes] = {};
      for (int64_t i = E / kLshLanes * kLshLanes; i < E; ++i) tail[i % kLshLanes] = p[i];
      Lanes acc[kPlanesPerPass];
      for (int b = 0; b < kPlanesPerPass; ++b) acc[b] = Lanes{};
      for (int64_t i = 0; i < E_padded; i += kLshLanes) {
        const T* chunk = i + kLshLanes <= E ? p + i : tail;
#pragma GCC unroll 16
        for (int b = 0; b < kPlanesPerPass; ++b) {
#pragma omp simd
          for (int l = 0; l < kLshLanes; ++l)
            acc[b][l] = mul_add_fused(chunk[l], block[b * E_padded + i + l], acc[b][l]);
        }
      }
      T sums[kPlanesPerPass];
      reduce_lanes_of_16_planes<T>(acc, sums);
      uint64_t code = 0;
      for (int b = 0; b < kPlanesPerPass; ++b)
        if (b0 + b < bits && sums[b] > thresholds[b0 + b]) code |= uint64_t(1) << (b0 + b);
      codes[r] = static_cast<int64_t>(static_cast<uint64_t>(codes[r]) | code);
    }
  }
}

at::Tensor lsh_hash_cpu(const at::Tensor& x, const at::Tensor& planes) {
  check_lsh_hash_inputs(x, planes);
  const auto xc = x.contiguous();
  const auto pc = planes.contiguous();
  const int64_t N = xc.size(0), E = xc.size(1), bits = pc.size(0);
  at::Tensor codes = at::empty({N}, xc.options().dtype(at::kLong));
  // (bits, E) weights zero-padded to multiples of 16 planes and 16 channels, and thresholds.
  const int64_t padded = at::divup(bits, kPlanesPerPass) * kPlanesPerPass;
  const int64_t E_padded = at::divup(E, kLshLanes) * kLshLanes;
  const auto weights = at::zeros({padded, E_padded}, pc.options());
  weights.narrow(0, 0, bits).narrow(1, 0, E).copy_(pc.narrow(1, 0, E));
  const auto thresholds = pc.select(1, E).contiguous();
  AT_DISPATCH_FLOATING_TYPES(xc.scalar_type(), "fsskern_lsh_hash_cpu", [&] {
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    int64_t* out = codes.mutable_data_ptr<int64_t>();
    at::parallel_for(0, N, 256, [&](int64_t begin, int64_t end) {
      hash_rows(xp + begin * E, weights.const_data_ptr<scalar_t>(), thresholds.const_data_ptr<scalar_t>(), E,
                E_padded, bits, out + begin, end - begin);
    });
  });
  return codes;
}

}  // namespace

TORCH_LIBRARY_IMPL(FSSKERN_NAMESPACE, CPU, m) { m.impl("lsh_hash", &lsh_hash_cpu); }

}  // namespace fsskern
