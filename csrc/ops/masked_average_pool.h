#pragma once
// Masked average pooling, shared by the CPU and CUDA registrations: the input checks and the
// device-independent orchestration (dtype handling, denominators, the GEMM-shaped backward
// pieces) live once in masked_average_pool.cpp; a backend supplies only its two kernels.
#include <ATen/core/Tensor.h>
#include "common/library.h"

#include <string>
#include <tuple>

namespace fsskern {

enum class MapResize { Mask, Features };

struct MapKernels {
  // Bilinear resampling of (P, H, W) planes to (P, out_h, out_w). transpose=false samples the
  // planes (F.interpolate); transpose=true applies the adjoint of sampling an (out_h, out_w)
  // grid up or down to (H, W).
  at::Tensor (*resample)(const at::Tensor& planes, int64_t out_h, int64_t out_w, bool align_corners,
                         bool transpose);
  // out[b, n, c] = sum_p features[b, c, p] * weights[b, n, p] / denom[b, n]  (0 where denom == 0).
  // features (B, C, P) any float dtype, weights (B, N, P) and denom (B, N) in its opmath dtype,
  // out (B, N, C) in the features dtype; all contiguous.
  void (*weighted_sum)(const at::Tensor& features, const at::Tensor& weights, const at::Tensor& denom,
                       at::Tensor& out);
};

std::tuple<at::Tensor, at::Tensor> masked_average_pool_impl(const MapKernels& kernels, const at::Tensor& features,
                                                            const at::Tensor& masks, c10::string_view resize,
                                                            double eps);

at::Tensor masked_average_pool_backward_features_impl(const MapKernels& kernels, const at::Tensor& grad_prototypes,
                                                      const at::Tensor& features, const at::Tensor& masks,
                                                      const at::Tensor& area, c10::string_view resize, double eps);

at::Tensor masked_average_pool_backward_masks_impl(const MapKernels& kernels, const at::Tensor& grad_prototypes,
                                                   const std::optional<at::Tensor>& grad_area,
                                                   const at::Tensor& features, const at::Tensor& masks,
                                                   const at::Tensor& prototypes, const at::Tensor& area,
                                                   c10::string_view resize, double eps);

// Registers the three ops for one backend: TORCH_LIBRARY_IMPL(fsskern, CPU or CUDA, m) calls
// this with that backend's kernels, so CPU and CUDA share every line but the kernels.
template <const MapKernels& kernels>
void register_masked_average_pool(torch::Library& m) {
  m.impl("masked_average_pool", [](const at::Tensor& features, const at::Tensor& masks, c10::string_view resize,
                                   double eps) { return masked_average_pool_impl(kernels, features, masks, resize, eps); });
  m.impl("_masked_average_pool_backward_features",
         [](const at::Tensor& grad, const at::Tensor& features, const at::Tensor& masks, const at::Tensor& area,
            c10::string_view resize, double eps) {
           return masked_average_pool_backward_features_impl(kernels, grad, features, masks, area, resize, eps);
         });
  m.impl("_masked_average_pool_backward_masks",
         [](const at::Tensor& grad, const std::optional<at::Tensor>& grad_area, const at::Tensor& features,
            const at::Tensor& masks, const at::Tensor& prototypes, const at::Tensor& area, c10::string_view resize,
            double eps) {
           return masked_average_pool_backward_masks_impl(kernels, grad, grad_area, features, masks, prototypes, area,
                                                          resize, eps);
         });
}

}  // namespace fsskern
