// CUDA launcher and registration of cluster_means (kernel in the .cuh beside this).
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS  // per-operator ATen headers only (setup.py)
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/zeros.h>

#include "common/launch.cuh"
#include "common/library.h"
#include "ops/cluster_means.h"
#include "ops/cuda/cluster_means_kernel.cuh"

namespace fsskern {
namespace {

std::tuple<at::Tensor, at::Tensor> cluster_means_cuda(const at::Tensor& features, const at::Tensor& assign, int64_t k,
                                                      double eps) {
  check_cluster_means_inputs(features, assign, k, eps);
  const DeviceGuard guard(features.device());
  const auto layout = point_layout(features);
  const auto a = assign.contiguous();
  const int64_t B = layout.B, C = layout.C;
  at::Tensor means = at::zeros({B, k, C}, features.options());
  at::Tensor counts = at::zeros({B, k}, a.options());
  const LaunchConfig cfg{grid_dims(k, B), dim3(static_cast<unsigned>(std::clamp<int64_t>(C, 1, 256)))};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features.scalar_type(), "fsskern_cluster_means_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    launch(cluster_means_kernel<scalar_t, acc_t>, cfg, features.const_data_ptr<scalar_t>(), layout,
           a.const_data_ptr<int64_t>(), means.mutable_data_ptr<scalar_t>(), counts.mutable_data_ptr<int64_t>(), k, eps);
  });
  return {means, counts};
}

}  // namespace

TORCH_LIBRARY_IMPL(FSSKERN_NAMESPACE, FSSKERN_CUDA_KEY, m) { m.impl("cluster_means", &cluster_means_cuda); }

}  // namespace fsskern
