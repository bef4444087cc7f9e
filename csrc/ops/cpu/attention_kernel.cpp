// CPU kernels of the attention core (attention.h): flash-style tiles.
//
// Forward, per (batch, head, tile of query rows): for each tile of packed keys, the scores
// go through a GEMM into a buffer the size of L2 (MKL), the row loop below turns them into
// probabilities with an online softmax (running max m, running sum l, rescale of the
// accumulator when m grows), and a second GEMM adds probabilities x values to the row
// accumulators. The (N x P) score matrix never exists; the extra memory is one score tile and
// one accumulator tile per thread. With few keys (UMTFSS: 70 prototypes) there is a single key
// tile and no rescaling.
//
// Backward, per (batch, head): recompute the probabilities of each tile from the saved
// logsumexp, then dV += A^T dO, dS = A * (dO V^T - rowsum(dO * O)), dQ += dS K, dK += dS^T Q,
// four GEMMs per tile; one thread owns a (batch, head), so dK and dV need no reduction.
//
// float16/bfloat16 inputs are widened to float32 a slice at a time (a query tile, the keys and
// values of one (batch, head)) into per-thread tensors, and every GEMM and softmax step runs
// in float32 as for float32 inputs: no input is copied whole.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS  // per-operator ATen headers only (setup.py)
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>

#include <algorithm>
#include <limits>

#include "common/cpu_dispatch.h"
#include "common/parallel.h"
#include "ops/attention.h"

namespace fsskern {
namespace {

// One score tile: 2^17 elements (512 KiB fp32), the L2 of one core. Key tiles of at most 512
// keep the query tile at >= 256 rows, which MKL runs near its peak.
constexpr int64_t kTileElements = int64_t(1) << 17;
constexpr int64_t kKeyTile = 512;

struct Tiles {
  int64_t keys, rows;
};

// count keys, N query rows: no tile larger than the problem.
Tiles choose_tiles(int64_t count, int64_t N) {
  const int64_t keys = std::clamp<int64_t>(count, 1, kKeyTile);
  return {keys, std::clamp<int64_t>(kTileElements / keys, 1, std::max<int64_t>(N, 16))};
}

// Softmax step of a tile of scores, stored transposed (n keys x rows, already scaled) so that
// the loops run along the query rows, 16 rows (one vector) at a time through all n keys: each
// strip's max and sum stay in registers. Grows each row's running max m, turns the scores
// into probabilities in place, updates the running sum l, and stores in alpha the factor each
// row's accumulator must be rescaled by.
constexpr int64_t kStrip = 16;

template <typename T>
FSSKERN_CPU_CLONES void online_softmax_strip(T* s, int64_t n, int64_t ld, T* m, T* l, T* alpha) {
  T new_max[kStrip], sum[kStrip] = {};
#pragma omp simd
  for (int64_t i = 0; i < kStrip; ++i) new_max[i] = m[i];
  for (int64_t j = 0; j < n; ++j) {
    const T* row = s + j * ld;
#pragma omp simd
    for (int64_t i = 0; i < kStrip; ++i) new_max[i] = row[i] > new_max[i] ? row[i] : new_max[i];
  }
  for (int64_t j = 0; j < n; ++j) {
    T* row = s + j * ld;
#pragma omp simd
    for (int64_t i = 0; i < kStrip; ++i) {
      row[i] = softmax_exp(row[i] - new_max[i]);
      sum[i] += row[i];
    }
  }
  // A NaN score does not raise the max but poisons the sum, and with it the row (as softmax).
#pragma omp simd
  for (int64_t i = 0; i < kStrip; ++i) {
    alpha[i] = rescale_factor(m[i], new_max[i]);
    m[i] = new_max[i];
    l[i] = l[i] * alpha[i] + sum[i];
  }
}

// s: n keys' rows, ld >= rows rounded up to 16 apart; m, l and alpha have ld entries. The last
// strip runs into the padding.
template <typename T>
void online_softmax_tile(T* s, int64_t n, int64_t rows, int64_t ld, T* m, T* l, T* alpha) {
  for (int64_t i0 = 0; i0 < rows; i0 += kStrip) online_softmax_strip(s + i0, n, ld, m + i0, l + i0, alpha + i0);
}

// Dropout of a transposed probability tile: key j (original index key_index[j], its row ld
// apart), rows i0.. .
// The counters of a key's row are consecutive multiples of P apart; Philox vectorises.
template <typename T>
FSSKERN_CPU_CLONES void apply_dropout_tile(T* p, int64_t n, int64_t rows, int64_t ld, const int64_t* key_index,
                                           int64_t bh, int64_t i0, int64_t N, int64_t P, uint64_t seed,
                                           uint32_t threshold, T keep_scale) {
  for (int64_t j = 0; j < n; ++j) {
    T* row = p + j * ld;
    const uint64_t first = dropout_element(bh, i0, key_index[j], N, P);
#pragma omp simd
    for (int64_t i = 0; i < rows; ++i)
      row[i] *= dropout_factor(seed, first + static_cast<uint64_t>(i * P), threshold, keep_scale);
  }
}

// x itself when it is already in opmath, else its float32 copy.
at::Tensor widened(const at::Tensor& x, at::ScalarType opmath) {
  return x.scalar_type() == opmath ? x : x.to(opmath);
}

// out_tile (rows x Dv, any strides, dtype Out) = acc * inv per row, walking the output
// contiguously: CRCNet's output is channels-first, so its rows are the inner dimension.
template <typename T, typename Out>
void write_normalised(const T* acc, const T* inv, int64_t rows, int64_t Dv, at::Tensor out_tile) {
  Out* out = out_tile.mutable_data_ptr<Out>();
  const int64_t row_stride = out_tile.stride(0), channel_stride = out_tile.stride(1);
  if (row_stride == 1) {
    for (int64_t e = 0; e < Dv; ++e)
      for (int64_t r = 0; r < rows; ++r) out[e * channel_stride + r] = static_cast<Out>(acc[r * Dv + e] * inv[r]);
  } else {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t e = 0; e < Dv; ++e)
        out[r * row_stride + e * channel_stride] = static_cast<Out>(acc[r * Dv + e] * inv[r]);
  }
}

// In: the inputs' dtype; T: the one everything is computed in.
template <typename In>
void forward_typed(const AttentionInputs& in, at::Tensor& out, at::Tensor& lse) {
  using T = at::opmath_type<In>;
  const auto opmath = c10::CppTypeToScalarType<T>::value;
  const int64_t B = in.q.size(0), H = in.q.size(1), N = in.q.size(2), P = in.key_index.size(1), Dv = in.v.size(3);
  const int64_t* key_count = in.key_count.const_data_ptr<int64_t>();
  const int64_t* key_index = in.key_index.const_data_ptr<int64_t>();
  const T* const_logit = in.const_logit.const_data_ptr<T>();
  const T* const_value = in.const_value.const_data_ptr<T>();
  T* lse_data = lse.mutable_data_ptr<T>();
  const Tiles tiles = choose_tiles(in.k.size(2), N);
  const int64_t row_tiles = (N + tiles.rows - 1) / tiles.rows;

  const int64_t tasks = B * H * row_tiles;
  parallel_tasks(tasks, [&](const auto& claim) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;  // the GEMMs are internal, not traced
    // Score rows are padded to whole strips; the padding's values are computed and never used.
    const int64_t ld = at::divup(tiles.rows, kStrip) * kStrip;
    at::Tensor scores = at::empty({tiles.keys * ld}, in.q.options().dtype(opmath));
    at::Tensor acc = at::empty({tiles.rows, Dv}, in.q.options().dtype(opmath));
    std::vector<T> m(ld), l(ld), alpha(ld), sum(ld);
    int64_t keys_of = -1;  // the (batch, head) whose keys and values k_bh and v_bh hold
    at::Tensor k_bh, v_bh;
    for (int64_t task = claim(); task < tasks; task = claim()) {
      const int64_t bh = task / row_tiles, b = bh / H, h = bh % H, i0 = (task % row_tiles) * tiles.rows;
      const int64_t rows = std::min(tiles.rows, N - i0), count = key_count[b];
      const at::Tensor q_tile = widened(in.q[b][h].narrow(0, i0, rows), opmath);
      if (keys_of != bh) {  // consecutive tasks mostly share a (batch, head)
        k_bh = widened(in.k[b][h].narrow(0, 0, count), opmath);
        v_bh = widened(in.v[b][h].narrow(0, 0, count), opmath);
        keys_of = bh;
      }
      at::Tensor acc_tile = acc.narrow(0, 0, rows);
      T* acc_data = acc_tile.mutable_data_ptr<T>();
      // The constant key first: exp(c - c) = 1 times its value.
      const T c = const_logit[b];
      const bool has_const = c > -std::numeric_limits<T>::infinity();
      std::fill(m.begin(), m.end(), c);
      std::fill(l.begin(), l.end(), has_const ? T(1) : T(0));
      if (has_const)
        for (int64_t r = 0; r < rows; ++r) std::copy(const_value + b * Dv, const_value + (b + 1) * Dv, acc_data + r * Dv);
      for (int64_t j0 = 0; j0 < count; j0 += tiles.keys) {
        const int64_t n = std::min(tiles.keys, count - j0);
        // transposed: keys x rows, each key's row ld apart
        at::Tensor s_tile = scores.narrow(0, 0, n * ld).view({n, ld}).narrow(1, 0, rows);
        // BLAS skips the product when alpha is 0: scale 0 is applied after it, so NaN/Inf still propagate.
        at::addmm_out(s_tile, s_tile, k_bh.narrow(0, j0, n), q_tile.t(), /*beta=*/0,
                      /*alpha=*/in.scale == 0 ? 1.0 : in.scale);
        if (in.scale == 0) s_tile.mul_(0);
        T* s = s_tile.mutable_data_ptr<T>();
        for (int64_t j = 0; j < n; ++j) std::fill(s + j * ld + rows, s + (j + 1) * ld, T(0));
        online_softmax_tile(s, n, rows, ld, m.data(), l.data(), alpha.data());
        if (in.drop_threshold > 0)
          apply_dropout_tile(s, n, rows, ld, key_index + b * P + j0, bh, i0, N, P, in.seed, in.drop_threshold,
                             static_cast<T>(in.keep_scale));
        const at::Tensor v_tile = v_bh.narrow(0, j0, n);
        if (j0 == 0 && !has_const) {  // nothing accumulated yet
          at::mm_out(acc_tile, s_tile.t(), v_tile);
        } else {
          for (int64_t r = 0; r < rows; ++r)
            for (int64_t e = 0; e < Dv; ++e) acc_data[r * Dv + e] *= alpha[r];
          acc_tile.addmm_(s_tile.t(), v_tile);
        }
      }
      if (count == 0 && !has_const) acc_tile.zero_();
      for (int64_t r = 0; r < rows; ++r) {
        sum[r] = output_normaliser(l[r]);  // reused as the normaliser
        lse_data[bh * N + i0 + r] = row_logsumexp(m[r], l[r]);
      }
      write_normalised<T, In>(acc_data, sum.data(), rows, Dv, out[b][h].narrow(0, i0, rows));
    }
  });
}

// One row of a backward tile: the scores s become the probabilities a (from the logsumexp),
// and the probability gradients dp = dO . v_j (dropout applied) become the logit gradients.
template <typename T>
FSSKERN_CPU_CLONES void probabilities_row(T* s, int64_t n, T scale, T lse) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) s[j] = probability_from_lse(s[j] * scale, lse);
}

template <typename T>
FSSKERN_CPU_CLONES void logit_grad_row(const T* a, T* dp, int64_t n, T delta) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) dp[j] = logit_grad(a[j], dp[j], delta);
}

template <typename In>
void backward_typed(const AttentionInputs& in, const at::Tensor& out, const at::Tensor& lse, const at::Tensor& grad_out,
                    at::Tensor& grad_q, at::Tensor& grad_k, at::Tensor& grad_v, at::Tensor& grad_const) {
  using T = at::opmath_type<In>;
  const auto opmath = c10::CppTypeToScalarType<T>::value;
  const int64_t B = in.q.size(0), H = in.q.size(1), N = in.q.size(2), P = in.key_index.size(1);
  const int64_t* key_count = in.key_count.const_data_ptr<int64_t>();
  const int64_t* key_index = in.key_index.const_data_ptr<int64_t>();
  const T* const_logit = in.const_logit.const_data_ptr<T>();
  const T* lse_data = lse.const_data_ptr<T>();
  const Tiles tiles = choose_tiles(in.k.size(2), N);
  const T scale = static_cast<T>(in.scale), keep_scale = static_cast<T>(in.keep_scale);
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    const SingleThreadedBlas one_thread;  // the result must not depend on the thread count
    const auto buffer = in.q.options().dtype(opmath);
    at::Tensor probs = at::empty({tiles.rows * tiles.keys}, buffer);
    at::Tensor dropped = at::empty({tiles.rows * tiles.keys}, buffer);
    at::Tensor score_grad = at::empty({tiles.rows * tiles.keys}, buffer);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H, count = key_count[b];
      const at::Tensor q = widened(in.q[b][h], opmath), d_out = widened(grad_out[b][h], opmath);
      const at::Tensor k = widened(in.k[b][h].narrow(0, 0, count), opmath);
      const at::Tensor v = widened(in.v[b][h].narrow(0, 0, count), opmath);
      at::Tensor dq = grad_q[b][h], dk = grad_k[b][h], dv = grad_v[b][h];
      // delta_i = dO_i . O_i = sum_j a_ij dP_ij, the softmax backward's row term.
      const at::Tensor delta = (d_out * widened(out[b][h], opmath)).sum(-1);
      const T* delta_data = delta.const_data_ptr<T>();
      for (int64_t i0 = 0; i0 < N; i0 += tiles.rows) {
        const int64_t rows = std::min(tiles.rows, N - i0);
        const at::Tensor q_tile = q.narrow(0, i0, rows), d_out_tile = d_out.narrow(0, i0, rows);
        const T* row_lse = lse_data + bh * N + i0;
        const T* row_delta = delta_data + i0;
        for (int64_t j0 = 0; j0 < count; j0 += tiles.keys) {
          const int64_t n = std::min(tiles.keys, count - j0);
          const at::Tensor k_tile = k.narrow(0, j0, n), v_tile = v.narrow(0, j0, n);
          at::Tensor a = probs.narrow(0, 0, rows * n).view({rows, n});
          at::Tensor a_dropped = a;
          at::Tensor ds = score_grad.narrow(0, 0, rows * n).view({rows, n});
          at::mm_out(a, q_tile, k_tile.t());
          at::mm_out(ds, d_out_tile, v_tile.t());  // dP' = dO V^T (gradient of the dropped probabilities)
          T* a_data = a.mutable_data_ptr<T>();
          T* ds_data = ds.mutable_data_ptr<T>();
          for (int64_t r = 0; r < rows; ++r) probabilities_row(a_data + r * n, n, scale, row_lse[r]);
          if (in.drop_threshold > 0) {
            a_dropped = dropped.narrow(0, 0, rows * n).view({rows, n});
            T* ad = a_dropped.mutable_data_ptr<T>();
            for (int64_t r = 0; r < rows; ++r)
              for (int64_t j = 0; j < n; ++j) {
                const uint64_t element = dropout_element(bh, i0 + r, key_index[b * P + j0 + j], N, P);
                const T factor = dropout_factor(in.seed, element, in.drop_threshold, keep_scale);
                ad[r * n + j] = a_data[r * n + j] * factor;
                ds_data[r * n + j] *= factor;
              }
          }
          for (int64_t r = 0; r < rows; ++r) logit_grad_row(a_data + r * n, ds_data + r * n, n, row_delta[r]);
          dv.narrow(0, j0, n).addmm_(a_dropped.t(), d_out_tile);
          dq.narrow(0, i0, rows).addmm_(ds, k_tile, 1, scale);
          dk.narrow(0, j0, n).addmm_(ds.t(), q_tile, 1, scale);
        }
        // The constant key (no dropout, key vector 0): only its value receives a gradient.
        const T c = const_logit[b];
        if (c > -std::numeric_limits<T>::infinity()) {
          at::Tensor a_const = at::empty({rows}, buffer);
          T* ac = a_const.mutable_data_ptr<T>();
          for (int64_t r = 0; r < rows; ++r) ac[r] = probability_from_lse(c, row_lse[r]);
          grad_const[b][h].addmv_(d_out_tile.t(), a_const);
        }
      }
    }
  });
}

void attention_forward_cpu(const AttentionInputs& in, at::Tensor& out, at::Tensor& lse) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.q.scalar_type(), "fsskern_attention_forward_cpu",
                                  [&] { forward_typed<scalar_t>(in, out, lse); });
}

void attention_backward_cpu(const AttentionInputs& in, const at::Tensor& out, const at::Tensor& lse,
                            const at::Tensor& grad_out, at::Tensor& grad_q, at::Tensor& grad_k, at::Tensor& grad_v,
                            at::Tensor& grad_const) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.q.scalar_type(), "fsskern_attention_backward_cpu", [&] {
    backward_typed<scalar_t>(in, out, lse, grad_out, grad_q, grad_k, grad_v, grad_const);
  });
}

constexpr AttentionKernels kCpuKernels{&attention_forward_cpu, &attention_backward_cpu};

}  // namespace

TORCH_LIBRARY_IMPL(FSSKERN_NAMESPACE, CPU, m) { register_attention<kCpuKernels>(m); }

}  // namespace fsskern
