#pragma once
// cluster_means: the float mean of the features of every cluster, UMTFSS's prototypes:
//   means[b, c, :] = sum over points n with assign[b, n] == c of features[b, n, :] / (count + eps)
// with the pooling ops' division (divide_or_zero: a zero denominator gives a zero row).
// assign -1 marks a point that belongs to no cluster. Backward is a gather, written once with
// ATen ops for every device (cluster_means.cpp).
#include <ATen/ATen.h>

namespace fsskern {

void check_cluster_means_inputs(const at::Tensor& features, const at::Tensor& assign, int64_t k, double eps);

}  // namespace fsskern
