// CPU kernel of lsh_hash: one task per block of points. Each 16-element chunk of a point is
// loaded once and fed to the accumulators of every plane (16 lanes = one AVX-512 register per
// plane), which is lsh_hash.h's fixed summation schedule, so the codes equal the CUDA kernel's.
#include <ATen/Parallel.h>

#include "common/cpu_dispatch.h"
#include "common/library.h"
#include "ops/lsh_hash.h"

namespace fsskern {
namespace {

// Planes are taken 8 at a time (a compile-time count, so the 8 x 16 accumulators stay in
// registers); `planes` is padded with zero planes to a multiple of 8, their bits never set.
constexpr int kPlanesPerPass = 8;

template <typename T>
FSSKERN_CPU_CLONES void hash_rows(const T* x, const T* planes, const T* thresholds, int64_t E, int64_t bits,
                                  int64_t* codes, int64_t n) {
  for (int64_t r = 0; r < n; ++r) {
    const T* p = x + r * E;
    uint64_t code = 0;
    for (int64_t b0 = 0; b0 < bits; b0 += kPlanesPerPass) {
      const T* block = planes + b0 * E;
      T acc[kPlanesPerPass][kLshLanes] = {};
      int64_t i = 0;
      for (; i + kLshLanes <= E; i += kLshLanes) {
        for (int b = 0; b < kPlanesPerPass; ++b) {
#pragma omp simd
          for (int l = 0; l < kLshLanes; ++l) acc[b][l] = mul_add_fused(p[i + l], block[b * E + i + l], acc[b][l]);
        }
      }
      for (int b = 0; b < kPlanesPerPass; ++b) {
        for (int l = 0; i + l < E; ++l) acc[b][l] = mul_add_fused(p[i + l], block[b * E + i + l], acc[b][l]);
        if (b0 + b < bits && lsh_reduce_lanes(acc[b]) > thresholds[b0 + b]) code |= uint64_t(1) << (b0 + b);
      }
    }
    codes[r] = static_cast<int64_t>(code);
  }
}

at::Tensor lsh_hash_cpu(const at::Tensor& x, const at::Tensor& planes) {
  check_lsh_hash_inputs(x, planes);
  const auto xc = x.contiguous();
  const auto pc = planes.contiguous();
  const int64_t N = xc.size(0), E = xc.size(1), bits = pc.size(0);
  at::Tensor codes = at::empty({N}, xc.options().dtype(at::kLong));
  // (bits, E) weights padded with zero planes to a multiple of kPlanesPerPass, and thresholds.
  const int64_t padded = at::divup(bits, kPlanesPerPass) * kPlanesPerPass;
  const auto weights = at::zeros({padded, E}, pc.options());
  weights.narrow(0, 0, bits).copy_(pc.narrow(1, 0, E));
  const auto thresholds = pc.select(1, E).contiguous();
  AT_DISPATCH_FLOATING_TYPES(xc.scalar_type(), "fsskern_lsh_hash_cpu", [&] {
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    int64_t* out = codes.mutable_data_ptr<int64_t>();
    at::parallel_for(0, N, 256, [&](int64_t begin, int64_t end) {
      hash_rows(xp + begin * E, weights.const_data_ptr<scalar_t>(), thresholds.const_data_ptr<scalar_t>(), E, bits,
                out + begin, end - begin);
    });
  });
  return codes;
}

}  // namespace

TORCH_LIBRARY_IMPL(FSSKERN_NAMESPACE, CPU, m) { m.impl("lsh_hash", &lsh_hash_cpu); }

}  // namespace fsskern
