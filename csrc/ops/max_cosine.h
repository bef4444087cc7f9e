#pragma once
// max_cosine: the fused core of the PFENet/BAM prior mask. For every query pixel i and every
// shot k, the maximum over support pixels j of
//     cos(w_j s_j, q_i) = (w_j s_j . q_i) / (|w_j s_j| |q_i| + eps)
// with w the support mask on the support feature grid, and the index of the maximiser.
//
// The reference multiplies the support features by the mask and takes the max over ALL support
// pixels; masked-out pixels are zero vectors whose cosine is 0 / (0 + eps) = 0 exactly. The
// kernels visit only foreground pixels (w_j != 0) and start from that background value instead,
// so the result is max(0, max over foreground) whenever any pixel is masked out, as in the
// reference, and signed features keep the same numbers. Non-finite inputs give the reference's
// NaNs: a non-finite |q_i| makes the background cosine NaN, and a non-finite masked-out support
// pixel makes that shot's whole row NaN (0 * Inf).
//
// float16/bfloat16 inputs are read as they are and computed in float32; the values come back
// in float32 (as autocast returns cosine_similarity), the gradients in the inputs' dtype.
//
// This header holds the math both backends share; checks and schema: max_cosine.cpp.
#include <ATen/core/Tensor.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>

#include "common/host_device.h"

namespace fsskern {

// The dtype of the values and of every computation: float64 for float64 inputs, else float32.
inline at::ScalarType max_cosine_opmath(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Index recorded when the maximum is a masked-out (background) pixel.
constexpr int64_t kBackgroundIndex = -1;
// Index of "no candidate yet": loses every comparison.
constexpr int64_t kNoIndex = std::numeric_limits<int64_t>::max();

template <typename T>
HOST_DEVICE T cosine_from_dot(T dot, T norm_s, T norm_q, T eps) {
  return dot / mul_add_unfused(norm_s, norm_q, eps);
}

// Does candidate (v, j) beat (best, best_j)? The result equals a left-to-right scan over
// [background, foreground pixels in increasing index] that keeps the first maximum, with NaN
// beating every number (torch.max propagates NaN). Any merge order gives the same answer, so
// tiles and threads may be combined in any order.
template <typename T>
HOST_DEVICE bool max_cosine_better(T v, int64_t j, T best, int64_t best_j) {
  const bool v_nan = v != v, best_nan = best != best;
  if (v_nan || best_nan) return v_nan && (!best_nan || j < best_j);
  return v > best || (v == best && j < best_j);
}

// The value of the background candidate (only present when some pixel is masked out): the
// reference's cosine with a zeroed support pixel, 0 / (0 * |q| + eps), computed as written: 0
// for a finite |q| and eps > 0, NaN for a non-finite |q| or for eps = 0 (0 / 0).
template <typename T>
HOST_DEVICE T background_cosine(T norm_q, T eps) {
  return cosine_from_dot(T(0), T(0), norm_q, eps);
}

// Gradient of cos(s, q) = d / (|s||q| + eps) for the backward pass:
//   d cos / d q = a s - bq q,   d cos / d s = a q - bs s   (already multiplied by grad g).
// At |q| = 0 (or |s| = 0) the norm term vanishes, as torch.norm's gradient does there.
template <typename T>
struct CosineGrad {
  T a, bq, bs;
};

template <typename T>
HOST_DEVICE CosineGrad<T> cosine_grad(T g, T dot, T norm_s, T norm_q, T eps) {
  const T denom = norm_s * norm_q + eps;
  CosineGrad<T> r;
  r.a = g / denom;
  const T common = g * dot / (denom * denom);
  r.bq = norm_q > T(0) ? common * norm_s / norm_q : T(0);
  r.bs = norm_s > T(0) ? common * norm_q / norm_s : T(0);
  return r;
}

// Shared input checks (both backends call them first).
void check_max_cosine_inputs(const at::Tensor& query, const at::Tensor& support, const at::Tensor& weights,
                             double eps);
// ... and those of the backward: grad_values and indices shaped as the forward's outputs, indices in [-1, Ns).
void check_max_cosine_backward_inputs(const at::Tensor& grad_values, const at::Tensor& query,
                                      const at::Tensor& support, const at::Tensor& weights, const at::Tensor& indices,
                                      double eps);

// The float32 CPU kernel, which the certified bf16 search (cpu/max_cosine_bf16_search_kernel.cpp)
// falls back to where its bound does not apply.
std::tuple<at::Tensor, at::Tensor> max_cosine_cpu(const at::Tensor& query, const at::Tensor& support,
                                                  const at::Tensor& support_weights, double eps);

}  // namespace fsskern
