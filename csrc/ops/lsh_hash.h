#pragma once
// lsh_hash: sign random projections packed into int64 codes, UMTFSS's convention:
//   bit i of code(x) = (x . plane_i[:E] > plane_i[E]),   least-significant bit first.
// The projection is a dot product in a fixed order (16 interleaved partial sums of fused
// multiply-adds, combined pairwise): the same correctly rounded operations on CPU and CUDA, so a
// point that sits within rounding of a hyperplane gets the same bit on both.
#include <ATen/ATen.h>

#include <cstdint>

#include "common/host_device.h"

namespace fsskern {

constexpr int kLshLanes = 16;

// Lane l accumulates x[i] * plane[i] for i = l (mod 16), in increasing i; then the lanes are
// added pairwise (8 apart, 4 apart, 2, 1). The CPU kernel runs this schedule for all planes of a
// point at once (cpu/lsh_hash_kernel.cpp); any implementation must keep it to stay bit-identical.
template <typename T>
HOST_DEVICE T lsh_reduce_lanes(T* lane) {
  for (int width = kLshLanes / 2; width > 0; width /= 2)
    for (int l = 0; l < width; ++l) lane[l] = lane[l] + lane[l + width];
  return lane[0];
}

template <typename T>
HOST_DEVICE T lsh_projection(const T* x, const T* plane, int64_t E) {
  T lane[kLshLanes];
  for (int l = 0; l < kLshLanes; ++l) lane[l] = T(0);
  for (int64_t i = 0; i < E; ++i) lane[i % kLshLanes] = mul_add_fused(x[i], plane[i], lane[i % kLshLanes]);
  return lsh_reduce_lanes(lane);
}

// The code of one point: planes is (bits, E + 1), the last column the threshold.
template <typename T>
HOST_DEVICE int64_t lsh_code(const T* x, const T* planes, int64_t E, int64_t bits) {
  uint64_t code = 0;
  for (int64_t b = 0; b < bits; ++b) {
    const T* plane = planes + b * (E + 1);
    if (lsh_projection(x, plane, E) > plane[E]) code |= uint64_t(1) << b;
  }
  return static_cast<int64_t>(code);
}

void check_lsh_hash_inputs(const at::Tensor& x, const at::Tensor& planes);

}  // namespace fsskern
