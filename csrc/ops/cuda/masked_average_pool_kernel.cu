// CUDA launchers and registration of masked_average_pool (kernels in the .cuh beside this).
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS  // per-operator ATen headers only (setup.py)
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>

#include "common/launch.cuh"
#include "ops/cuda/masked_average_pool_kernel.cuh"
#include "ops/masked_average_pool.h"

namespace fsskern {
namespace {

constexpr int kThreads = 256;

LaunchConfig elementwise_config(int64_t total) {
  // Grid-stride kernels: cap the grid, each thread walks the rest.
  const int64_t blocks = std::min<int64_t>(ceil_div(total, kThreads), 65535);
  return {grid_dims(blocks), dim3(kThreads)};
}

at::Tensor resample_cuda(const at::Tensor& planes, int64_t out_h, int64_t out_w, bool align_corners,
                         bool transpose) {
  const DeviceGuard guard(planes.device());
  const auto src = planes.contiguous();
  const int64_t P = src.size(0), H = src.size(1), W = src.size(2);
  auto dst = at::empty({P, out_h, out_w}, src.options());
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "fsskern_resample_cuda", [&] {
    launch(transpose ? resample_kernel<scalar_t, true> : resample_kernel<scalar_t, false>,
           elementwise_config(P * out_h * out_w), src.const_data_ptr<scalar_t>(), dst.mutable_data_ptr<scalar_t>(), P,
           H, W, out_h, out_w, align_corners);
  });
  return dst;
}

void weighted_sum_cuda(const at::Tensor& features, const at::Tensor& weights, const at::Tensor& denom,
                       at::Tensor& out) {
  const DeviceGuard guard(features.device());
  const int64_t B = features.size(0), C = features.size(1), P = features.size(2), N = weights.size(1);
  const LaunchConfig cfg{grid_dims(ceil_div(C, kWeightedSumWarpsPerBlock), N, B), dim3(32 * kWeightedSumWarpsPerBlock)};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features.scalar_type(), "fsskern_weighted_sum_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    launch(weighted_sum_kernel<scalar_t, acc_t>, cfg, features.const_data_ptr<scalar_t>(),
           weights.const_data_ptr<acc_t>(), denom.const_data_ptr<acc_t>(), out.mutable_data_ptr<scalar_t>(), C, N, P);
  });
}

constexpr MapKernels kCudaKernels{&resample_cuda, &weighted_sum_cuda};

}  // namespace

TORCH_LIBRARY_IMPL(FSSKERN_NAMESPACE, FSSKERN_CUDA_KEY, m) { register_masked_average_pool<kCudaKernels>(m); }

}  // namespace fsskern
