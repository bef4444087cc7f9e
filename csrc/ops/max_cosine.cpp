// max_cosine: schema and input checks (math: max_cosine.h; kernels: cpu/, cuda/).
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS  // per-operator ATen headers only (setup.py)
#include "ops/max_cosine.h"

#include <vector>

#include "common/library.h"

namespace fsskern {

void check_max_cosine_inputs(const at::Tensor& query, const at::Tensor& support, const at::Tensor& weights,
                             double eps) {
  TORCH_CHECK(query.dim() == 3, "max_cosine: query must be 3-d (B, C, Nq), got shape ", query.sizes());
  TORCH_CHECK(support.dim() == 4, "max_cosine: support must be 4-d (B, K, C, Ns), got shape ", support.sizes());
  TORCH_CHECK(weights.dim() == 3, "max_cosine: support_weights must be 3-d (B, K, Ns), got shape ",
              weights.sizes());
  const auto dt = query.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
              "max_cosine: query must be float32, float64, float16 or bfloat16, got ", dt);
  TORCH_CHECK(support.scalar_type() == dt && weights.scalar_type() == dt,
              "max_cosine: query, support and support_weights must share a dtype, got ", dt, ", ",
              support.scalar_type(), ", ", weights.scalar_type());
  TORCH_CHECK(support.device() == query.device() && weights.device() == query.device(),
              "max_cosine: all inputs must be on one device, got ", query.device(), ", ", support.device(), ", ",
              weights.device());
  TORCH_CHECK(support.size(0) == query.size(0) && weights.size(0) == query.size(0),
              "max_cosine: batch sizes differ: query ", query.size(0), ", support ", support.size(0),
              ", support_weights ", weights.size(0));
  TORCH_CHECK(support.size(2) == query.size(1), "max_cosine: channel counts differ: query ", query.size(1),
              ", support ", support.size(2));
  TORCH_CHECK(weights.size(1) == support.size(1) && weights.size(2) == support.size(3),
              "max_cosine: support_weights must be (B, K, Ns) = ", support.size(0), ", ", support.size(1), ", ",
              support.size(3), ", got ", weights.sizes());
  TORCH_CHECK(support.size(3) > 0, "max_cosine: support must have at least one pixel");
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, "max_cosine: eps must be finite and >= 0, got ", eps);
}

void check_max_cosine_backward_inputs(const at::Tensor& grad_values, const at::Tensor& query,
                                      const at::Tensor& support, const at::Tensor& weights, const at::Tensor& indices,
                                      double eps) {
  check_max_cosine_inputs(query, support, weights, eps);
  // Autograd always passes the forward's own outputs; a direct call must not make the kernels read
  // grad_values or write grad_support out of bounds.
  const std::vector<int64_t> shape{support.size(0), support.size(1), query.size(2)};
  TORCH_CHECK(grad_values.sizes() == at::IntArrayRef(shape) && at::isFloatingType(grad_values.scalar_type()),
              "_max_cosine_backward: grad_values must be floating (B, K, Nq) = ", at::IntArrayRef(shape), ", got ",
              grad_values.scalar_type(), " ", grad_values.sizes());
  TORCH_CHECK(indices.sizes() == at::IntArrayRef(shape) && indices.scalar_type() == at::kLong,
              "_max_cosine_backward: indices must be int64 (B, K, Nq) = ", at::IntArrayRef(shape), ", got ",
              indices.scalar_type(), " ", indices.sizes());
  TORCH_CHECK(grad_values.device() == query.device() && indices.device() == query.device(),
              "_max_cosine_backward: all inputs must be on one device, got ", query.device(), ", ",
              grad_values.device(), ", ", indices.device());
  if (indices.numel() > 0)
    TORCH_CHECK(indices.ge(-1).logical_and(indices.lt(support.size(3))).all().item<bool>(),
                "_max_cosine_backward: indices must lie in [-1, ", support.size(3), ") (-1: no match)");
}

TORCH_LIBRARY_FRAGMENT(FSSKERN_NAMESPACE, m) {
  m.def("max_cosine(Tensor query, Tensor support, Tensor support_weights, float eps) -> (Tensor, Tensor)");
  // The same outputs by the certified bf16 search (cpu/max_cosine_bf16_search_kernel.cpp; other devices run
  // fsskern/ops/certified_search.py's composite).
  m.def(
      "max_cosine_bf16_search(Tensor query, Tensor support, Tensor support_weights, float eps) -> (Tensor, "
      "Tensor)");
  m.def(
      "_max_cosine_backward(Tensor grad_values, Tensor query, Tensor support, Tensor support_weights, "
      "Tensor indices, float eps) -> (Tensor, Tensor)");
}

}  // namespace fsskern
