#pragma once
// The pooling ops' division: sum / denominator, and 0 where the denominator is 0 (an empty mask
// or cluster with eps = 0 gives a zero prototype, never NaN). One definition for masked average
// pooling and cluster means, on CPU and CUDA.
#include "common/host_device.h"

namespace fsskern {

template <typename T>
HOST_DEVICE T divide_or_zero(T sum, T denominator) {
  return denominator != T(0) ? sum / denominator : T(0);
}

}  // namespace fsskern
