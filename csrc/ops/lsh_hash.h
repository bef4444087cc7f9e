#pragma once
// lsh_hash: sign random projections packed into int64 codes, UMTFSS's convention:
//   bit i of code(x) = (x . plane_i[:E] > plane_i[E]),   least-significant bit first.
// The projection is one fused multiply-add per channel in increasing channel order, on CPU
// and CUDA alike: the same correctly rounded operations, so a point that sits within rounding of
// a hyperplane gets the same bit on both. The CPU kernel runs this order for 16 points at once
// (one vector lane per point), so it needs no horizontal sums.
//
// x may be any strided (M, N, E) view, e.g. channel-first feature maps seen as (maps, pixels,
// channels): the kernels read it in place. A float16/bfloat16 x is widened (exactly) to float32
// as it is read, against float32 planes: its codes are those of x.float().
#include <ATen/core/Tensor.h>

#include <cstdint>

#include "common/host_device.h"

namespace fsskern {

// The projection of one point whose channels lie `channel_stride` apart.
template <typename T, typename In>
HOST_DEVICE T lsh_projection(const In* x, int64_t channel_stride, const T* plane, int64_t E) {
  T acc = T(0);
  for (int64_t i = 0; i < E; ++i) acc = mul_add_fused(static_cast<T>(x[i * channel_stride]), plane[i], acc);
  return acc;
}

// The code of one point: planes is (bits, E + 1), the last column the threshold.
template <typename T, typename In>
HOST_DEVICE int64_t lsh_code(const In* x, int64_t channel_stride, const T* planes, int64_t E, int64_t bits) {
  uint64_t code = 0;
  for (int64_t b = 0; b < bits; ++b) {
    const T* plane = planes + b * (E + 1);
    if (lsh_projection(x, channel_stride, plane, E) > plane[E]) code |= uint64_t(1) << b;
  }
  return static_cast<int64_t>(code);
}

void check_lsh_hash_inputs(const at::Tensor& x, const at::Tensor& planes);

// The planes' dtype for x's: float64 for float64, else float32.
inline at::ScalarType lsh_planes_dtype(at::ScalarType x) { return x == at::kDouble ? at::kDouble : at::kFloat; }

// x as (M, N, E) (a 2-d x is one row of points), without copying.
at::Tensor lsh_hash_as_3d(const at::Tensor& x);

}  // namespace fsskern
