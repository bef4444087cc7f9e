// masked_average_pool: schema, input checks and the device-independent orchestration.
//
//   prototypes[b, n, :] = sum_p features[b, :, p] * weight[b, n, p] / (area[b, n] + eps)
//
// resize="mask" (PFENet/BAM/UMTFSS): weight = mask resized bilinear, align_corners=True, to the
//   feature grid; area = sum(weight).
// resize="features" (PANet/DPCL): the reference upsamples the features (bilinear,
//   align_corners=False) to the mask grid and pools there. Pooling is linear, so that equals
//   pooling the features with weight = U^T mask, U the upsampling map: the mask is pushed through
//   the transposed interpolation onto the feature grid and the upsampled features never exist.
//   area = sum(mask) (== sum(weight): the rows of U sum to one).
// A zero denominator (all-zero mask and eps = 0) gives a zero prototype, never NaN.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS  // per-operator ATen headers only (setup.py)
#include "ops/masked_average_pool.h"

#include <ATen/TensorOperators.h>
#include <ATen/ops/baddbmm.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <cmath>

namespace fsskern {
namespace {

MapResize parse_resize(c10::string_view resize) {
  if (resize == "mask") return MapResize::Mask;
  if (resize == "features") return MapResize::Features;
  TORCH_CHECK(false, "masked_average_pool: resize must be 'mask' or 'features', got '", resize, "'");
}

at::ScalarType opmath_of(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

bool is_feature_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

void check_inputs(const at::Tensor& features, const at::Tensor& masks, double eps) {
  TORCH_CHECK(features.dim() == 4, "masked_average_pool: features must be 4-d (B, C, h, w), got shape ",
              features.sizes());
  TORCH_CHECK(masks.dim() == 4, "masked_average_pool: masks must be 4-d (B, N, H, W), got shape ", masks.sizes());
  TORCH_CHECK(is_feature_dtype(features.scalar_type()),
              "masked_average_pool: features must be float32, float64, float16 or bfloat16, got ",
              features.scalar_type());
  const auto mt = masks.scalar_type();
  TORCH_CHECK(mt == at::kBool || mt == at::kByte || is_feature_dtype(mt),
              "masked_average_pool: masks must be bool, uint8 or floating point, got ", mt);
  TORCH_CHECK(features.device() == masks.device(), "masked_average_pool: features and masks must be on the same ",
              "device, got ", features.device(), " and ", masks.device());
  TORCH_CHECK(features.size(0) == masks.size(0), "masked_average_pool: features and masks disagree on the batch ",
              "size: ", features.size(0), " vs ", masks.size(0));
  TORCH_CHECK(features.size(2) > 0 && features.size(3) > 0,
              "masked_average_pool: features must have a non-empty spatial size, got ", features.sizes());
  TORCH_CHECK(masks.size(2) > 0 && masks.size(3) > 0,
              "masked_average_pool: masks must have a non-empty spatial size, got ", masks.sizes());
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, "masked_average_pool: eps must be finite and >= 0, got ", eps);
}

// The pooling weights on the feature grid, (B, N, h * w) in opmath.
at::Tensor pooling_weights(const MapKernels& kernels, const at::Tensor& masks_opmath, int64_t h, int64_t w,
                           MapResize mode) {
  const int64_t B = masks_opmath.size(0), N = masks_opmath.size(1);
  const auto planes = masks_opmath.reshape({B * N, masks_opmath.size(2), masks_opmath.size(3)});
  const auto weights = mode == MapResize::Mask ? kernels.resample(planes, h, w, /*align_corners=*/true, false)
                                               : kernels.resample(planes, h, w, /*align_corners=*/false, true);
  return weights.view({B, N, h * w});
}

// d prototype / d numerator: grad / denominator, 0 where the denominator is 0 (as in forward).
at::Tensor scaled_grad(const at::Tensor& grad_prototypes, const at::Tensor& area, double eps) {
  const auto denom = (area + eps).unsqueeze(-1);
  const auto g = grad_prototypes.to(area.scalar_type());
  return at::where(denom != 0, g / denom, at::zeros_like(g));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> masked_average_pool_impl(const MapKernels& kernels, const at::Tensor& features,
                                                            const at::Tensor& masks, c10::string_view resize,
                                                            double eps) {
  check_inputs(features, masks, eps);
  const MapResize mode = parse_resize(resize);
  const int64_t B = features.size(0), C = features.size(1), h = features.size(2), w = features.size(3);
  const int64_t N = masks.size(1);
  const auto opmath = opmath_of(features.scalar_type());
  auto prototypes = at::zeros({B, N, C}, features.options());
  if (B * N == 0) return {prototypes, at::zeros({B, N}, features.options().dtype(opmath))};

  const auto m = masks.to(opmath).contiguous();
  const auto weights = pooling_weights(kernels, m, h, w, mode);
  const auto area = (mode == MapResize::Mask ? weights : m.view({B, N, -1})).sum(-1);
  if (C > 0) kernels.weighted_sum(features.contiguous().view({B, C, h * w}), weights, area + eps, prototypes);
  return {prototypes, area};
}

at::Tensor masked_average_pool_backward_features_impl(const MapKernels& kernels, const at::Tensor& grad_prototypes,
                                                      const at::Tensor& features, const at::Tensor& masks,
                                                      const at::Tensor& area, c10::string_view resize, double eps) {
  check_inputs(features, masks, eps);
  const MapResize mode = parse_resize(resize);
  const int64_t B = features.size(0), C = features.size(1), h = features.size(2), w = features.size(3);
  if (features.numel() == 0 || masks.size(1) == 0) return at::zeros(features.sizes(), features.options());  // contiguous, as the fake
  const auto weights = pooling_weights(kernels, masks.to(area.scalar_type()).contiguous(), h, w, mode);
  const auto gs = scaled_grad(grad_prototypes, area, eps);  // (B, N, C)
  return at::bmm(gs.transpose(1, 2), weights).view({B, C, h, w}).to(features.scalar_type());
}

at::Tensor masked_average_pool_backward_masks_impl(const MapKernels& kernels, const at::Tensor& grad_prototypes,
                                                   const std::optional<at::Tensor>& grad_area,
                                                   const at::Tensor& features, const at::Tensor& masks,
                                                   const at::Tensor& prototypes, const at::Tensor& area,
                                                   c10::string_view resize, double eps) {
  check_inputs(features, masks, eps);
  const MapResize mode = parse_resize(resize);
  const int64_t B = features.size(0), C = features.size(1), h = features.size(2), w = features.size(3);
  const int64_t N = masks.size(1), H = masks.size(2), W = masks.size(3);
  if (B * N == 0) return at::zeros(masks.sizes(), masks.options());  // contiguous, as the fake
  const auto opmath = area.scalar_type();
  const auto gs = scaled_grad(grad_prototypes, area, eps);  // (B, N, C)
  // d/d area of sum / (area + eps) is -prototype / (area + eps); plus whatever flowed into area.
  auto grad_area_total = -(gs * prototypes.to(opmath)).sum(-1);
  if (grad_area.has_value() && grad_area->defined()) grad_area_total = grad_area_total + grad_area->to(opmath);
  // Gradient w.r.t. the weights on the feature grid. The area term is added here in both modes:
  // in "mask" mode area = sum(weight); in "features" mode area = sum(mask), and pushing a
  // constant through the adjoint of U^T (that is, through U) leaves it the same constant.
  auto grad_weights = grad_area_total.unsqueeze(-1).expand({B, N, h * w}).contiguous();
  if (C > 0) grad_weights = at::baddbmm(grad_weights, gs, features.reshape({B, C, h * w}).to(opmath));
  const auto planes = grad_weights.view({B * N, h, w});
  const auto grad_masks = mode == MapResize::Mask ? kernels.resample(planes, H, W, /*align_corners=*/true, true)
                                                  : kernels.resample(planes, H, W, /*align_corners=*/false, false);
  return grad_masks.view({B, N, H, W}).to(masks.scalar_type());
}

TORCH_LIBRARY_FRAGMENT(FSSKERN_NAMESPACE, m) {
  m.def("masked_average_pool(Tensor features, Tensor masks, str resize, float eps) -> (Tensor, Tensor)");
  m.def(
      "_masked_average_pool_backward_features(Tensor grad_prototypes, Tensor features, Tensor masks, Tensor area, "
      "str resize, float eps) -> Tensor");
  m.def(
      "_masked_average_pool_backward_masks(Tensor grad_prototypes, Tensor? grad_area, Tensor features, "
      "Tensor masks, Tensor prototypes, Tensor area, str resize, float eps) -> Tensor");
}

}  // namespace fsskern
