// cluster_means: schema, input checks, and the backward (a gather, the same for every device).
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS  // per-operator ATen headers only (setup.py)
#include "ops/cluster_means.h"

#include <ATen/TensorOperators.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/full_like.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>

#include <algorithm>
#include <cmath>

#include "common/library.h"

namespace fsskern {

PointLayout point_layout(const at::Tensor& f) {
  if (f.dim() == 3) return {f.size(0), f.size(1), f.size(2), std::max<int64_t>(f.size(1), 1),
                            f.stride(0), 0, f.stride(1), f.stride(2)};
  return {f.size(0), f.size(1) * f.size(3), f.size(2), std::max<int64_t>(f.size(3), 1),
          f.stride(0), f.stride(1), f.stride(3), f.stride(2)};
}

void check_cluster_means_inputs(const at::Tensor& features, const at::Tensor& assign, int64_t k, double eps) {
  TORCH_CHECK(features.dim() == 3 || features.dim() == 4,
              "cluster_means: features must be 3-d (B, N, C) or 4-d channel-first maps (B, S, C, M), got shape ",
              features.sizes());
  const auto dt = features.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
              "cluster_means: features must be float32, float64, float16 or bfloat16, got ", dt);
  const int64_t N = point_layout(features).N;
  TORCH_CHECK(assign.dim() == 2 && assign.scalar_type() == at::kLong && assign.size(0) == features.size(0) &&
                  assign.size(1) == N,
              "cluster_means: assign must be int64 (B, N) = (", features.size(0), ", ", N, "), got ",
              assign.scalar_type(), " of shape ", assign.sizes());
  TORCH_CHECK(assign.device() == features.device(), "cluster_means: features and assign must be on one device");
  TORCH_CHECK(k >= 1, "cluster_means: k must be >= 1, got ", k);
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, "cluster_means: eps must be finite and >= 0, got ", eps);
  if (assign.numel() > 0) {  // a bad index would write out of bounds: checked on every device
    TORCH_CHECK(assign.ge(-1).logical_and(assign.lt(k)).all().item<bool>(),
                "cluster_means: assign must lie in [-1, ", k, ") (-1: no cluster)");
  }
}

namespace {

at::Tensor cluster_means_backward(const at::Tensor& grad_means, const at::Tensor& features, const at::Tensor& assign,
                                  const at::Tensor& counts, double eps) {
  const auto layout = point_layout(features);
  const int64_t B = layout.B, N = layout.N, C = layout.C;
  const auto opmath = features.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto denom = (counts.to(opmath) + eps).unsqueeze(-1);
  auto g = grad_means.to(opmath);
  g = at::where(denom != 0, g / denom, at::zeros_like(g));
  // A zero row at index k collects the points that belong to no cluster.
  g = at::cat({g, at::zeros({B, 1, C}, g.options())}, 1);
  const auto index = at::where(assign < 0, at::full_like(assign, counts.size(1)), assign);
  const auto grad = g.gather(1, index.unsqueeze(-1).expand({B, N, C})).to(features.scalar_type());
  if (features.dim() == 3) return grad;
  return grad.view({B, features.size(1), features.size(3), C}).permute({0, 1, 3, 2}).contiguous();
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(FSSKERN_NAMESPACE, m) {
  m.def("cluster_means(Tensor features, Tensor assign, int k, float eps) -> (Tensor, Tensor)");
  m.def("_cluster_means_backward(Tensor grad_means, Tensor features, Tensor assign, Tensor counts, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(FSSKERN_NAMESPACE, CompositeExplicitAutograd, m) {
  m.impl("_cluster_means_backward", &cluster_means_backward);
}

}  // namespace fsskern
