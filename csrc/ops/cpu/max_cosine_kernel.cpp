// CPU kernels of max_cosine (the fused PFENet/BAM prior).
//
// Forward, per (image, shot), one foreground tile at a time:
//   1. pack the tile's foreground support pixels, already multiplied by their mask weight, into
//      a dense (C x tile) panel and take their norms (background pixels are never touched);
//   2. GEMM the panel against the query features, a chunk of columns at a time, into a score
//      buffer that stays in L3 (MKL threads it over the cores);
//   3. fold the scores into the running max/argmax of every query pixel (threads split the
//      columns). The (Ns x Nq) matrix of the reference never exists: the extra memory is one
//      panel and one score buffer, a few MB whatever the image size.
// Backward walks the saved argmax: O(Nq) saved state, O(B K Nq C) work.
//
// float16/bfloat16 inputs: the packing widens the foreground pixels into the float32 panel, the
// query is widened one image at a time, and everything after runs in float32 (values too); the
// backward's channel-last copies are float32, and its gradients are rounded once at the end.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS  // per-operator ATen headers only (setup.py)
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/linalg_vector_norm.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>

#include <atomic>
#include <cmath>
#include <vector>

#include "common/cpu_dispatch.h"
#include "common/library.h"
#include "ops/max_cosine.h"

namespace fsskern {
namespace {

// 512 foreground pixels x 2048 query pixels of fp32 scores = 4 MiB; the panel of 512 pixels at
// C = 2048 is another 4 MiB. Large enough for MKL to reach its peak here (measured: 185 GFLOP/s
// on 2 cores against 150 with 128 x 256 tiles per thread), small enough for L3.
constexpr int64_t kSupportTile = 512;
constexpr int64_t kQueryChunk = 2048;

// Packs w_j * s_j for the foreground pixels fg[0..n) into panel (C x n), in T.
template <typename T, typename In>
void pack_foreground(const In* support, const In* weights, const int64_t* fg, int64_t n, int64_t C, int64_t Ns,
                     T* panel) {
  at::parallel_for(0, C, 16, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const In* row = support + c * Ns;
      T* out = panel + c * n;
      for (int64_t r = 0; r < n; ++r) out[r] = static_cast<T>(weights[fg[r]]) * static_cast<T>(row[fg[r]]);
    }
  });
}

// Whether a masked-out pixel holds a non-finite value: the reference's 0 * Inf = NaN then
// poisons every cosine of the shot.
template <typename In>
bool background_poisoned(const In* support, const std::vector<int64_t>& bg, int64_t C, int64_t Ns) {
  std::atomic<bool> poisoned{false};
  at::parallel_for(0, C, 16, [&](int64_t begin, int64_t end) {
    bool bad = false;
    for (int64_t c = begin; c < end && !bad; ++c)
      for (const int64_t j : bg)  // in the opmath type: a float64 past float's range is finite
        bad |= !std::isfinite(static_cast<at::opmath_type<In>>(support[c * Ns + j]));
    if (bad) poisoned = true;
  });
  return poisoned;
}

template <typename T>
FSSKERN_CPU_CLONES void accumulate_squares(const T* row, T* acc, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) acc[i] += row[i] * row[i];
}

// Column norms of a (rows x n) row-major matrix.
template <typename T>
std::vector<T> column_norms(const T* m, int64_t rows, int64_t n) {
  std::vector<T> norms(n, T(0));
  at::parallel_for(0, n, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t r = 0; r < rows; ++r) accumulate_squares(m + r * n + begin, norms.data() + begin, end - begin);
    for (int64_t i = begin; i < end; ++i) norms[i] = std::sqrt(norms[i]);
  });
  return norms;
}

// Epilogue of one score row (one foreground pixel j against a query tile).
template <typename T>
FSSKERN_CPU_CLONES void fold_scores(const T* scores, T norm_s, const T* norm_q, T eps, int64_t j, T* best,
                                    int64_t* best_j, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const T v = cosine_from_dot(scores[i], norm_s, norm_q[i], eps);
    const bool take = max_cosine_better(v, j, best[i], best_j[i]);
    best[i] = take ? v : best[i];
    best_j[i] = take ? j : best_j[i];
  }
}

template <typename In>
void max_cosine_forward_typed(const at::Tensor& query, const at::Tensor& support, const at::Tensor& weights,
                              double eps_, at::Tensor& values, at::Tensor& indices) {
  using T = at::opmath_type<In>;
  const T eps = static_cast<T>(eps_);
  const int64_t B = support.size(0), K = support.size(1), C = support.size(2), Ns = support.size(3);
  const int64_t Nq = query.size(2);
  const auto opts = query.options().dtype(c10::CppTypeToScalarType<T>::value);
  // (B, Nq) in T, as torch.norm
  const at::Tensor query_norms = at::linalg_vector_norm(query, 2, {1}, false, opts.dtype().toScalarType());
  at::Tensor panel = at::empty({C * std::min(kSupportTile, Ns)}, opts);
  at::Tensor scores = at::empty({std::min(kSupportTile, Ns) * std::min(kQueryChunk, Nq)}, opts);

  for (int64_t b = 0; b < B; ++b) {
    const at::Tensor query_b = query[b].to(opts.dtype().toScalarType());  // (C, Nq); no copy when In is T
    const T* qn = query_norms.const_data_ptr<T>() + b * Nq;
    for (int64_t k = 0; k < K; ++k) {
      const In* s = support.const_data_ptr<In>() + (b * K + k) * C * Ns;
      const In* w = weights.const_data_ptr<In>() + (b * K + k) * Ns;
      std::vector<int64_t> fg, bg;
      for (int64_t j = 0; j < Ns; ++j) (static_cast<T>(w[j]) != T(0) ? fg : bg).push_back(j);
      const int64_t nfg = static_cast<int64_t>(fg.size());
      T* best = values.mutable_data_ptr<T>() + (b * K + k) * Nq;
      int64_t* best_j = indices.mutable_data_ptr<int64_t>() + (b * K + k) * Nq;
      const bool has_bg = !bg.empty();
      for (int64_t i = 0; i < Nq; ++i) {
        best[i] = has_bg ? background_cosine(qn[i], eps) : -std::numeric_limits<T>::infinity();
        best_j[i] = has_bg ? kBackgroundIndex : kNoIndex;
      }

      for (int64_t r0 = 0; r0 < nfg; r0 += kSupportTile) {
        const int64_t ns = std::min(kSupportTile, nfg - r0);
        T* panel_data = panel.mutable_data_ptr<T>();
        pack_foreground(s, w, fg.data() + r0, ns, C, Ns, panel_data);
        const std::vector<T> support_norms = column_norms(panel_data, C, ns);
        const at::Tensor panel_t = at::from_blob(panel_data, {C, ns}, opts).t();  // (ns, C) view
        for (int64_t i0 = 0; i0 < Nq; i0 += kQueryChunk) {
          const int64_t nq = std::min(kQueryChunk, Nq - i0);
          at::Tensor chunk = at::from_blob(scores.mutable_data_ptr<T>(), {ns, nq}, opts);
          at::mm_out(chunk, panel_t, query_b.narrow(1, i0, nq));
          const T* sp = chunk.const_data_ptr<T>();
          at::parallel_for(0, nq, 64, [&](int64_t begin, int64_t end) {
            for (int64_t r = 0; r < ns; ++r) {
              fold_scores(sp + r * nq + begin, support_norms[r], qn + i0 + begin, eps, fg[r0 + r], best + i0 + begin,
                          best_j + i0 + begin, end - begin);
            }
          });
        }
      }
      if (has_bg && background_poisoned(s, bg, C, Ns)) {
        std::fill_n(best, Nq, std::numeric_limits<T>::quiet_NaN());
      }
    }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> max_cosine_cpu(const at::Tensor& query, const at::Tensor& support,
                                                  const at::Tensor& support_weights, double eps) {
  check_max_cosine_inputs(query, support, support_weights, eps);
  const auto q = query.contiguous();
  const auto s = support.contiguous();
  const auto w = support_weights.contiguous();
  const int64_t B = s.size(0), K = s.size(1), Nq = q.size(2);
  at::Tensor values = at::empty({B, K, Nq}, q.options().dtype(max_cosine_opmath(q.scalar_type())));
  at::Tensor indices = at::empty({B, K, Nq}, q.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "fsskern_max_cosine_cpu",
                                  [&] { max_cosine_forward_typed<scalar_t>(q, s, w, eps, values, indices); });
  return {values, indices};
}

namespace {

template <typename T>
FSSKERN_CPU_CLONES void dot3(const T* s, const T* q, T w, int64_t n, T* sq, T* ss, T* qq) {
  T a = 0, b = 0, c = 0;
#pragma omp simd reduction(+ : a, b, c)
  for (int64_t i = 0; i < n; ++i) {
    const T sv = w * s[i];
    a += sv * q[i];
    b += sv * sv;
    c += q[i] * q[i];
  }
  *sq = a;
  *ss = b;
  *qq = c;
}

// A contiguous copy of x in dtype, converted on the way (one pass; x.to(dtype) would keep x's strides).
at::Tensor contiguous_as(const at::Tensor& x, at::ScalarType dtype) {
  return at::empty(x.sizes(), x.options().dtype(dtype)).copy_(x);
}

// out += alpha * w * s + beta * q  (w scales s as in the forward)
template <typename T>
FSSKERN_CPU_CLONES void axpy2(T* out, T alpha, const T* s, T w, T beta, const T* q, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] += alpha * (w * s[i]) + beta * q[i];
}

// Walks the saved argmax. Rows are channel-last copies of query and support so every dot and
// update is contiguous. grad_query is split by query pixel and grad_support by (image, shot),
// each written by one thread in a fixed order: deterministic, no atomics.
template <typename In>
void max_cosine_backward_typed(const at::Tensor& grad, const at::Tensor& query, const at::Tensor& support,
                               const at::Tensor& weights_in, const at::Tensor& indices, double eps_,
                               at::Tensor& grad_query, at::Tensor& grad_support) {
  using T = at::opmath_type<In>;
  const auto opmath = c10::CppTypeToScalarType<T>::value;
  const T eps = static_cast<T>(eps_);
  const int64_t B = support.size(0), K = support.size(1), C = support.size(2), Ns = support.size(3);
  const int64_t Nq = query.size(2);
  const at::Tensor qt = contiguous_as(query.transpose(1, 2), opmath);    // (B, Nq, C)
  const at::Tensor st = contiguous_as(support.transpose(2, 3), opmath);  // (B, K, Ns, C)
  const at::Tensor weights = weights_in.to(opmath);
  const at::Tensor grad_t = grad.to(opmath);
  const T* q_rows = qt.const_data_ptr<T>();
  const T* s_rows = st.const_data_ptr<T>();
  const T* g = grad_t.const_data_ptr<T>();
  const T* w = weights.const_data_ptr<T>();
  const int64_t* idx = indices.const_data_ptr<int64_t>();
  T* gq = grad_query.mutable_data_ptr<T>();    // (B, Nq, C)
  T* gs = grad_support.mutable_data_ptr<T>();  // (B, K, Ns, C)

  // For one (b, k, i): the cosine gradient coefficients, or false if no gradient flows.
  auto coefficients = [&](int64_t b, int64_t k, int64_t i, CosineGrad<T>* cg, const T** s, const T** q, T* wj) {
    const int64_t bki = (b * K + k) * Nq + i;
    const int64_t j = idx[bki];
    if (j < 0 || g[bki] == T(0)) return false;
    *wj = w[(b * K + k) * Ns + j];
    *s = s_rows + ((b * K + k) * Ns + j) * C;
    *q = q_rows + (b * Nq + i) * C;
    T sq, ss, qq;
    dot3(*s, *q, *wj, C, &sq, &ss, &qq);
    *cg = cosine_grad(g[bki], sq, std::sqrt(ss), std::sqrt(qq), eps);
    return true;
  };

  if (grad_query.numel() > 0) {
    at::parallel_for(0, B * Nq, 64, [&](int64_t begin, int64_t end) {
      for (int64_t bi = begin; bi < end; ++bi) {
        const int64_t b = bi / Nq, i = bi % Nq;
        for (int64_t k = 0; k < K; ++k) {
          CosineGrad<T> cg;
          const T *s, *q;
          T wj;
          if (coefficients(b, k, i, &cg, &s, &q, &wj)) axpy2(gq + bi * C, cg.a, s, wj, -cg.bq, q, C);
        }
      }
    });
  }
  if (grad_support.numel() > 0) {
    at::parallel_for(0, B * K, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bk = begin; bk < end; ++bk) {
        const int64_t b = bk / K, k = bk % K;
        for (int64_t i = 0; i < Nq; ++i) {
          CosineGrad<T> cg;
          const T *s, *q;
          T wj;
          if (!coefficients(b, k, i, &cg, &s, &q, &wj)) continue;
          // d/ds of cos(w s, q) = w * (a q - bs w s)
          const int64_t j = idx[bk * Nq + i];
          axpy2(gs + (bk * Ns + j) * C, -cg.bs * wj, s, wj, cg.a * wj, q, C);
        }
      }
    });
  }
}

std::tuple<at::Tensor, at::Tensor> max_cosine_backward_cpu(const at::Tensor& grad_values, const at::Tensor& query,
                                                           const at::Tensor& support,
                                                           const at::Tensor& support_weights,
                                                           const at::Tensor& indices, double eps) {
  check_max_cosine_backward_inputs(grad_values, query, support, support_weights, indices, eps);
  const auto q = query.contiguous();
  const auto s = support.contiguous();
  const int64_t B = s.size(0), K = s.size(1), C = s.size(2), Ns = s.size(3), Nq = q.size(2);
  const auto opmath = q.options().dtype(max_cosine_opmath(q.scalar_type()));
  at::Tensor grad_query = at::zeros({B, Nq, C}, opmath);
  at::Tensor grad_support = at::zeros({B, K, Ns, C}, opmath);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "fsskern_max_cosine_backward_cpu", [&] {
    max_cosine_backward_typed<scalar_t>(grad_values.contiguous(), q, s, support_weights.contiguous(),
                                        indices.contiguous(), eps, grad_query, grad_support);
  });
  // Rounded once to the inputs' dtype (a no-op for float32/float64).
  return {contiguous_as(grad_query.transpose(1, 2), q.scalar_type()),
          contiguous_as(grad_support.transpose(2, 3), q.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(FSSKERN_NAMESPACE, CPU, m) {
  m.impl("max_cosine", &max_cosine_cpu);
  m.impl("_max_cosine_backward", &max_cosine_backward_cpu);
}

}  // namespace fsskern
