#pragma once
// Bilinear resampling written as a linear map, index for index the way ATen's
// upsample_bilinear2d computes it (area_pixel_compute_scale / _source_index, then
// guard_index_and_lambda), so results match F.interpolate to the last rounding.
//
// Besides the forward map (gather) we need its adjoint (transpose): masked average pooling in
// PANet mode pools the mask through the transposed upsampling instead of upsampling features,
// and every backward pass through a resize is an adjoint. CUDA evaluates the adjoint as a gather
// too (bilinear_adjoint_at: each output sums the few inputs whose taps touch it), deterministic and
// free of atomics; the CPU scatters each plane in turn (cpu/masked_average_pool_kernel.cpp,
// resample_adjoint), one thread per plane, deterministic as well.
#include <cstdint>
#include "common/host_device.h"

namespace fsskern {

template <typename T>
struct LinearTap {
  int64_t i0, i1;  // the two source indices (equal at the border)
  T l0, l1;        // their weights, l0 + l1 == 1
};

// Scale from destination to source coordinates, as ATen's area_pixel_compute_scale (no
// user-given scale factor: sizes only).
template <typename T>
HOST_DEVICE T resample_scale(int64_t in_size, int64_t out_size, bool align_corners) {
  if (align_corners) return out_size > 1 ? T(in_size - 1) / T(out_size - 1) : T(0);
  return T(in_size) / T(out_size);
}

template <typename T>
HOST_DEVICE LinearTap<T> linear_tap(int64_t o, int64_t in_size, int64_t out_size, bool align_corners) {
  const T scale = resample_scale<T>(in_size, out_size, align_corners);
  T src = align_corners ? scale * T(o) : scale * (T(o) + T(0.5)) - T(0.5);
  if (!align_corners && src < T(0)) src = T(0);
  int64_t i0 = static_cast<int64_t>(src);  // src >= 0, so truncation is floor
  if (i0 > in_size - 1) i0 = in_size - 1;
  T l1 = src - T(i0);
  l1 = l1 < T(0) ? T(0) : (l1 > T(1) ? T(1) : l1);
  LinearTap<T> tap;
  tap.i0 = i0;
  tap.i1 = i0 + (i0 < in_size - 1 ? 1 : 0);
  tap.l0 = T(1) - l1;
  tap.l1 = l1;
  return tap;
}

// Weight of source index i in destination index o (0 when the taps of o miss i).
template <typename T>
HOST_DEVICE T tap_weight(int64_t o, int64_t i, int64_t in_size, int64_t out_size, bool align_corners) {
  const LinearTap<T> t = linear_tap<T>(o, in_size, out_size, align_corners);
  return (t.i0 == i ? t.l0 : T(0)) + (t.i1 == i ? t.l1 : T(0));
}

// A range [lo, hi) of destination indices that contains every o whose taps touch source index
// i. Source coordinates are monotone in o and the taps of o lie within one unit of its source
// coordinate, so inverting the map at i - 1 and i + 1 (with a margin of one for rounding)
// bounds the set; callers test each candidate with tap_weight, so a loose bound is harmless.
HOST_DEVICE void adjoint_range(int64_t i, int64_t in_size, int64_t out_size, bool align_corners,
                               int64_t* lo, int64_t* hi) {
  const double scale = resample_scale<double>(in_size, out_size, align_corners);
  if (scale <= 0.0) {
    *lo = 0;
    *hi = out_size;
    return;
  }
  const double a = align_corners ? (i - 1) / scale : (i - 1 + 0.5) / scale - 0.5;
  const double b = align_corners ? (i + 1) / scale : (i + 1 + 0.5) / scale - 0.5;
  int64_t l = static_cast<int64_t>(a < 0.0 ? 0.0 : a) - 1;
  int64_t h = static_cast<int64_t>(b < 0.0 ? 0.0 : b) + 2;
  *lo = l < 0 ? 0 : l;
  *hi = h > out_size ? out_size : h;
}

// Forward map at one destination pixel: bilinear sample of src (in_h x in_w).
// The 2x2 combination in ATen's order (rows first, then columns).
template <typename T>
HOST_DEVICE T bilinear_combine(const T* src, int64_t in_w, const LinearTap<T>& ty, const LinearTap<T>& tx) {
  const T* r0 = src + ty.i0 * in_w;
  const T* r1 = src + ty.i1 * in_w;
  return ty.l0 * (tx.l0 * r0[tx.i0] + tx.l1 * r0[tx.i1]) + ty.l1 * (tx.l0 * r1[tx.i0] + tx.l1 * r1[tx.i1]);
}

template <typename T>
HOST_DEVICE T bilinear_gather_at(const T* src, int64_t in_h, int64_t in_w, int64_t out_h, int64_t out_w,
                                 bool align_corners, int64_t oy, int64_t ox) {
  return bilinear_combine(src, in_w, linear_tap<T>(oy, in_h, out_h, align_corners),
                          linear_tap<T>(ox, in_w, out_w, align_corners));
}

// Adjoint map at one source pixel (iy, ix): sum over destination pixels of src (out_h x out_w)
// times the weight with which (iy, ix) enters them.
template <typename T>
HOST_DEVICE T bilinear_adjoint_at(const T* src, int64_t in_h, int64_t in_w, int64_t out_h, int64_t out_w,
                                  bool align_corners, int64_t iy, int64_t ix) {
  int64_t y_lo, y_hi, x_lo, x_hi;
  adjoint_range(iy, in_h, out_h, align_corners, &y_lo, &y_hi);
  adjoint_range(ix, in_w, out_w, align_corners, &x_lo, &x_hi);
  T total = T(0);
  for (int64_t oy = y_lo; oy < y_hi; ++oy) {
    const T wy = tap_weight<T>(oy, iy, in_h, out_h, align_corners);
    if (wy == T(0)) continue;
    T row = T(0);
    for (int64_t ox = x_lo; ox < x_hi; ++ox) {
      const T wx = tap_weight<T>(ox, ix, in_w, out_w, align_corners);
      if (wx != T(0)) row += wx * src[oy * out_w + ox];
    }
    total += wy * row;
  }
  return total;
}

}  // namespace fsskern
