#pragma once
// The attention core shared by prototype_attention (UMTFSS) and local_conditional_attention
// (CRCNet): query rows attend to a *selected* set of keys, with an optional constant key.
//
//   out_i = sum_j a_ij v_j,   a_i = softmax_j(scale * q_i . k_j)   over the selected keys j,
//
// plus, when const_logit[b] > -inf, one more key whose logit is const_logit (its key vector is
// zero) and whose value is const_value: CRCNet's literal "logits times mask" makes every
// background logit exactly 0, so the background pixels act as one key of logit
// log(#background) and value mean(background values), and are never visited one by one.
//
// The orchestration (attention.cpp) packs the selected keys first and hands the backends
// contiguous tensors; a backend supplies a forward (saving the row logsumexp) and a backward
// that recomputes the probabilities from it. A row with no key at all gets out = 0 and
// lse = -inf; its gradients are 0. This header also holds the math both backends share:
// the dropout RNG and the exponential.
//
// Reduced precision: q, k, v (and out, grad_out) may be float16 or bfloat16. The kernels read
// them as they are and compute in opmath (float32): scores, softmax, logsumexp and every
// accumulator; out is rounded once to the inputs' dtype, lse stays float32, and the gradients
// accumulate in float32 buffers that the orchestration rounds once at the end. On CPUs with
// AVX512-BF16 the CPU kernel multiplies bfloat16 inputs in bf16 (exact products, float32 sums),
// and rounds the probabilities (and, backward, the logit gradients) to bf16 once for the products
// they enter: cpu/attention_kernel.cpp, Bf16Products.
#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <tuple>

#include "common/host_device.h"
#include "common/library.h"

namespace fsskern {

struct AttentionInputs {
  at::Tensor q;            // (B, H, N, D), any strides
  at::Tensor k;            // (B, H, W, D) contiguous: the selected keys first (packed), in index
                           // order, W = the largest key_count (rows past an image's count unused)
  at::Tensor v;            // (B, H, W, Dv), packed like k (may be the same tensor)
  at::Tensor key_index;    // (B, P) int64: original index of packed key j (the dropout counter)
  at::Tensor key_count;    // (B,) int64: number of selected keys, <= W
  at::Tensor const_logit;  // (B,) opmath of q's dtype: logit of the constant key, -inf when there is none
  at::Tensor const_value;  // (B, Dv) opmath: its value
  double scale;
  uint32_t drop_threshold;  // dropout_threshold(p); 0 = no dropout
  double keep_scale;        // 1 / (1 - p)
  uint64_t seed;
};

// float32 for float16/bfloat16/float32 inputs, float64 for float64.
inline at::ScalarType attention_opmath(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

struct AttentionKernels {
  // out (B, H, N, Dv) in q's dtype, any strides, and lse (B, H, N) in opmath, contiguous; both
  // uninitialised.
  void (*forward)(const AttentionInputs& in, at::Tensor& out, at::Tensor& lse);
  // grad_q (B, H, N, D) in q's dtype, contiguous and uninitialised: every row is written once, rounded
  // from its opmath sum, so a reduced-precision grad_q never exists whole in opmath. grad_k
  // (B, H, W, D), grad_v (B, H, W, Dv) (packed) and grad_const (B, H, Dv): opmath, contiguous and
  // zero-filled; packed keys past key_count stay zero.
  void (*backward)(const AttentionInputs& in, const at::Tensor& out, const at::Tensor& lse,
                   const at::Tensor& grad_out, at::Tensor& grad_q, at::Tensor& grad_k, at::Tensor& grad_v,
                   at::Tensor& grad_const);
};

// ---- dropout: Philox4x32-10 (Salmon et al., SC'11), a counter-based RNG --------------------
// The keep decision of attention weight (b, h, i, j) is a pure function of (seed, element
// index), so CPU and CUDA draw the same mask, backward redraws it instead of storing it, and
// tiles may be visited in any order.
HOST_DEVICE uint32_t philox_first_word(uint64_t seed, uint64_t counter) {
  uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c0;
    const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * c2;
    const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(p1);
    c3 = static_cast<uint32_t>(p0);
    c0 = n0;
    c2 = n2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c0;
}

// An element is kept when its 24-bit uniform draw u satisfies u >= threshold, with
// threshold = ceil(p * 2^24): an integer comparison, so the mask does not depend on the dtype.
inline uint32_t dropout_threshold(double p) { return static_cast<uint32_t>(std::ceil(p * 16777216.0)); }

HOST_DEVICE bool dropout_keep(uint64_t seed, uint64_t element, uint32_t threshold) {
  return (philox_first_word(seed, element) >> 8) >= threshold;
}

// Counter of attention weight (b, h, i, j) of a (B, H, N, P) problem; j is the key's original
// index, so the mask does not depend on which keys are valid.
HOST_DEVICE uint64_t dropout_element(int64_t bh, int64_t i, int64_t j, int64_t N, int64_t P) {
  return static_cast<uint64_t>((bh * N + i) * P + j);
}

// The CPU exponentials' range reduction, x = n ln2 + r with n nearest to x log2(e): ln2 in two
// parts (the high one has 9 significant bits, so n * kLn2High is exact for |n| < 2^15), and the
// argument below which the result is 0. Shared by softmax_exp and bf16::exp_pairs.
struct ExpReduction {
  static constexpr float kLog2e = 1.44269504088896341f, kLn2High = 0.693359375f, kLn2Low = -2.12194440e-4f;
  static constexpr float kFloor = -87.0f;
};

// exp for the softmax (arguments <= 0 except for NaN). The CPU float version is a branch-free
// polynomial (Cephes expf: 2^n times a degree-7 polynomial on [-ln2/2, ln2/2], within 2 ulp)
// so that `#pragma omp simd` loops vectorise it (std::exp is a scalar library call); n is
// rounded by adding 1.5 * 2^23, whose bits then hold n, because floor and float-to-int
// conversions keep GCC from vectorising. Results under 2^-126 flush to 0, which no softmax
// sum can notice.
template <typename T>
HOST_DEVICE T softmax_exp(T x) {
#if defined(__CUDA_ARCH__)
  return exp(x);
#else
  if constexpr (std::is_same_v<T, float>) {
    constexpr float kRound = 12582912.0f;  // 1.5 * 2^23
    const float clamped = std::min(std::max(x, ExpReduction::kFloor), 88.0f);
    const float shifted = clamped * ExpReduction::kLog2e + kRound;
    const float n = shifted - kRound;
    float r = clamped - n * ExpReduction::kLn2High;
    r = r - n * ExpReduction::kLn2Low;
    float poly = 1.9875691500e-4f;
    poly = poly * r + 1.3981999507e-3f;
    poly = poly * r + 8.3334519073e-3f;
    poly = poly * r + 4.1665795894e-2f;
    poly = poly * r + 1.6666665459e-1f;
    poly = poly * r + 5.0000001201e-1f;
    const float y = poly * r * r + r + 1.0f;
    const int32_t two_n = (std::bit_cast<int32_t>(shifted) - std::bit_cast<int32_t>(kRound) + 127) << 23;
    const float e = y * std::bit_cast<float>(two_n);
    return x != x ? x : (x < ExpReduction::kFloor ? 0.0f : e);
  } else {
    return std::exp(x);
  }
#endif
}

// exp(a - m) for an online softmax whose running maximum m may still be -inf (nothing seen).
template <typename T>
HOST_DEVICE T rescale_factor(T previous_max, T new_max) {
  return previous_max == -INFINITY ? T(0) : softmax_exp(previous_max - new_max);
}

// What multiplies a probability after dropout: 1 / (1 - p) when kept, 0 when dropped.
template <typename T>
HOST_DEVICE T dropout_factor(uint64_t seed, uint64_t element, uint32_t threshold, T keep_scale) {
  return dropout_keep(seed, element, threshold) ? keep_scale : T(0);
}

// ---- the row statistics of the online softmax, and the backward built on them -------------
// A row that saw no key (running sum l = 0) has output 0 and logsumexp -inf.
template <typename T>
HOST_DEVICE T output_normaliser(T l) {
  return l == T(0) ? T(0) : T(1) / l;
}

template <typename T>
HOST_DEVICE T row_logsumexp(T m, T l) {
#if defined(__CUDA_ARCH__)
  return l == T(0) ? T(-INFINITY) : m + log(l);
#else
  return l == T(0) ? T(-INFINITY) : m + std::log(l);
#endif
}

// The probability of a (row, key) pair recomputed from its logit and the row's logsumexp.
template <typename T>
HOST_DEVICE T probability_from_lse(T logit, T row_lse) {
  return row_lse == T(-INFINITY) ? T(0) : softmax_exp(logit - row_lse);
}

// Gradient of the (unscaled) logit: a * (dp - delta), with dp the gradient of the probability
// (dropout already applied) and delta = dO . O for the row.
template <typename T>
HOST_DEVICE T logit_grad(T a, T dp, T delta) {
  return a * (dp - delta);
}

// ---- orchestration (attention.cpp) -----------------------------------------------------------
std::tuple<at::Tensor, at::Tensor> prototype_attention_impl(const AttentionKernels& kernels, const at::Tensor& q,
                                                            const at::Tensor& k, const at::Tensor& v,
                                                            const std::optional<at::Tensor>& key_valid, double scale,
                                                            double dropout_p, int64_t seed);

std::tuple<at::Tensor, at::Tensor, at::Tensor> prototype_attention_backward_impl(
    const AttentionKernels& kernels, const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const std::optional<at::Tensor>& key_valid, const at::Tensor& out, const at::Tensor& lse,
    double scale, double dropout_p, int64_t seed);

std::tuple<at::Tensor, at::Tensor> local_conditional_attention_impl(const AttentionKernels& kernels,
                                                                    const at::Tensor& query, const at::Tensor& support,
                                                                    const at::Tensor& support_mask,
                                                                    const at::Tensor& value, c10::string_view mode);

std::tuple<at::Tensor, at::Tensor, at::Tensor> local_conditional_attention_backward_impl(
    const AttentionKernels& kernels, const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& support,
    const at::Tensor& support_mask, const at::Tensor& value, const at::Tensor& out, const at::Tensor& lse,
    c10::string_view mode);

template <const AttentionKernels& kernels>
void register_attention(torch::Library& m) {
  m.impl("prototype_attention", [](const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   const std::optional<at::Tensor>& key_valid, double scale, double dropout_p,
                                   int64_t seed) {
    return prototype_attention_impl(kernels, q, k, v, key_valid, scale, dropout_p, seed);
  });
  m.impl("_prototype_attention_backward",
         [](const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
            const std::optional<at::Tensor>& key_valid, const at::Tensor& out, const at::Tensor& lse, double scale,
            double dropout_p, int64_t seed) {
           return prototype_attention_backward_impl(kernels, grad_out, q, k, v, key_valid, out, lse, scale,
                                                    dropout_p, seed);
         });
  m.impl("local_conditional_attention", [](const at::Tensor& query, const at::Tensor& support,
                                           const at::Tensor& support_mask, const at::Tensor& value,
                                           c10::string_view mode) {
    return local_conditional_attention_impl(kernels, query, support, support_mask, value, mode);
  });
  m.impl("_local_conditional_attention_backward",
         [](const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& support,
            const at::Tensor& support_mask, const at::Tensor& value, const at::Tensor& out, const at::Tensor& lse,
            c10::string_view mode) {
           return local_conditional_attention_backward_impl(kernels, grad_out, query, support, support_mask, value,
                                                            out, lse, mode);
         });
}

}  // namespace fsskern
