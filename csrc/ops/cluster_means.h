#pragma once
// cluster_means: the float mean of the features of every cluster, UMTFSS's prototypes:
//   means[b, c, :] = sum over points n with assign[b, n] == c of features[b, n, :] / (count + eps)
// with the pooling ops' division (divide_or_zero: a zero denominator gives a zero row).
// assign -1 marks a point that belongs to no cluster. Every sum is taken in point order, on
// every path and device. Backward is a gather, written once with ATen ops (cluster_means.cpp).
//
// features is read in place in either layout:
//   (B, N, C)     points by channels, any strides;
//   (B, S, C, M)  channel-first maps of S shots (FSS support features, pixels flattened), whose
//                 N = S * M points are numbered shot by shot, pixel by pixel.
#include <ATen/core/Tensor.h>

#include <cstdint>

#include "common/host_device.h"

namespace fsskern {

// Where point n of image b starts, and how far apart its channels are, in either layout.
struct PointLayout {
  int64_t B, N, C, pixels_per_shot;
  int64_t image_stride, shot_stride, pixel_stride, channel_stride;

  HOST_DEVICE int64_t offset(int64_t b, int64_t n) const {
    return b * image_stride + n / pixels_per_shot * shot_stride + n % pixels_per_shot * pixel_stride;
  }
};

PointLayout point_layout(const at::Tensor& features);

void check_cluster_means_inputs(const at::Tensor& features, const at::Tensor& assign, int64_t k, double eps);

}  // namespace fsskern
