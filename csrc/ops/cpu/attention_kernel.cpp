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
// in float32 as for float32 inputs: no input is copied whole. On CPUs with AVX512-BF16 the
// GEMMs of both directions read bfloat16 inputs as they are instead (Bf16Products and
// Bf16Backward, bf16_gemm.h), and without dropout the forward's softmax writes its probabilities
// straight into the second GEMM's bf16 operand (bf16::exp_pairs). On CPUs with AMX-BF16 and without
// dropout, both directions run row-major instead (forward_amx_rows, backward_amx_rows): every
// operand lies as the tile units read it, so nothing is transposed per tile.
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
#include <cstring>
#include <limits>
#include <vector>

#include "common/cpu_dispatch.h"
#include "common/parallel.h"
#include "ops/attention.h"
#include "ops/cpu/bf16_gemm.h"

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

// The strip's new running maxima over its n keys.
template <typename T>
inline void strip_max(const T* s, int64_t n, int64_t ld, const T* m, T* new_max) {
#pragma omp simd
  for (int64_t i = 0; i < kStrip; ++i) new_max[i] = m[i];
  for (int64_t j = 0; j < n; ++j) {
    const T* row = s + j * ld;
#pragma omp simd
    for (int64_t i = 0; i < kStrip; ++i) new_max[i] = row[i] > new_max[i] ? row[i] : new_max[i];
  }
}

// A NaN score does not raise the max but poisons the sum, and with it the row (as softmax).
template <typename T>
inline void strip_update(const T* new_max, const T* sum, T* m, T* l, T* alpha) {
#pragma omp simd
  for (int64_t i = 0; i < kStrip; ++i) {
    alpha[i] = rescale_factor(m[i], new_max[i]);
    m[i] = new_max[i];
    l[i] = l[i] * alpha[i] + sum[i];
  }
}

template <typename T>
FSSKERN_CPU_CLONES void online_softmax_strip(T* s, int64_t n, int64_t ld, T* m, T* l, T* alpha) {
  T new_max[kStrip], sum[kStrip] = {};
  strip_max(s, n, ld, m, new_max);
  for (int64_t j = 0; j < n; ++j) {
    T* row = s + j * ld;
#pragma omp simd
    for (int64_t i = 0; i < kStrip; ++i) {
      row[i] = softmax_exp(row[i] - new_max[i]);
      sum[i] += row[i];
    }
  }
  strip_update(new_max, sum, m, l, alpha);
}

// online_softmax_strip for the bf16 products without dropout: the probabilities leave as the
// second GEMM's operand (bf16::exp_pairs: pair p of row i at pairs[p * ldp + i]) instead of going
// back into s to be packed.
FSSKERN_CPU_CLONES void online_softmax_strip_pairs(const float* s, int64_t n, int64_t ld, float* m, float* l,
                                                   float* alpha, uint32_t* pairs, int64_t ldp) {
  float new_max[kStrip], sum[kStrip];
  strip_max(s, n, ld, m, new_max);
  bf16::exp_pairs(s, n, ld, new_max, sum, pairs, ldp);
  strip_update(new_max, sum, m, l, alpha);
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

// x rounded to Out; bfloat16 by the branch-free rounding (c10's, bit for bit) so that loops vectorise.
template <typename Out, typename T>
Out narrowed(T x) {
  if constexpr (std::is_same_v<Out, c10::BFloat16> && std::is_same_v<T, float>)
    return c10::BFloat16(bf16::round_to_bf16(x), c10::BFloat16::from_bits());
  else
    return static_cast<Out>(x);
}

// out (rows x Dv, strides row_stride and channel_stride) = acc * inv per row (acc's rows ld apart), walking the
// output contiguously: CRCNet's output is channels-first, so its rows are the inner dimension.
template <typename T, typename Out>
FSSKERN_CPU_CLONES void write_normalised_strided(const T* acc, int64_t ld, const T* inv, int64_t rows, int64_t Dv,
                                                 Out* out, int64_t row_stride, int64_t channel_stride) {
  if (row_stride == 1) {
    for (int64_t e = 0; e < Dv; ++e)
#pragma omp simd
      for (int64_t r = 0; r < rows; ++r) out[e * channel_stride + r] = narrowed<Out>(acc[r * ld + e] * inv[r]);
  } else {
    for (int64_t r = 0; r < rows; ++r)
#pragma omp simd
      for (int64_t e = 0; e < Dv; ++e)
        out[r * row_stride + e * channel_stride] = narrowed<Out>(acc[r * ld + e] * inv[r]);
  }
}

template <typename T, typename Out>
void write_normalised(const T* acc, int64_t ld, const T* inv, int64_t rows, int64_t Dv, at::Tensor out_tile) {
  write_normalised_strided(acc, ld, inv, rows, Dv, out_tile.mutable_data_ptr<Out>(), out_tile.stride(0),
                           out_tile.stride(1));
}

// The two products of a forward tile, with the inputs widened to float32 (or float64) a slice at a
// time: the scores s (n keys x rows, transposed) = scale * K Q^T, and acc (rows x Dv) += A^T V.
template <typename In>
struct WidenedProducts {
  using T = at::opmath_type<In>;
  const AttentionInputs& in;
  const at::ScalarType opmath = c10::CppTypeToScalarType<T>::value;
  at::Tensor q_tile, k_bh, v_bh;

  void load_keys(int64_t b, int64_t h, int64_t count) {
    k_bh = widened(in.k[b][h].narrow(0, 0, count), opmath);
    v_bh = widened(in.v[b][h].narrow(0, 0, count), opmath);
  }
  void load_queries(int64_t b, int64_t h, int64_t i0, int64_t rows) {
    q_tile = widened(in.q[b][h].narrow(0, i0, rows), opmath);
  }
  void scores(at::Tensor& s_tile, int64_t j0, int64_t n) {
    // BLAS skips the product when alpha is 0: scale 0 is applied after it, so NaN/Inf still propagate.
    at::addmm_out(s_tile, s_tile, k_bh.narrow(0, j0, n), q_tile.t(), /*beta=*/0,
                  /*alpha=*/in.scale == 0 ? 1.0 : in.scale);
    if (in.scale == 0) s_tile.mul_(0);
  }
  // The softmax step of a tile (online_softmax_tile); false: the probabilities stay in s.
  bool probabilities(T* s, int64_t n, int64_t rows, int64_t ld, T* m, T* l, T* alpha, bool /*dropout*/) {
    online_softmax_tile(s, n, rows, ld, m, l, alpha);
    return false;
  }
  void add_values(at::Tensor& acc_tile, const at::Tensor& s_tile, int64_t j0, int64_t n, bool first,
                  bool /*packed*/) {
    if (first)
      at::mm_out(acc_tile, s_tile.t(), v_bh.narrow(0, j0, n));
    else
      acc_tile.addmm_(s_tile.t(), v_bh.narrow(0, j0, n));
  }
};

// Per-thread buffers of the bf16 products, kept from call to call: fresh ones would cost a round of
// page faults per call (the OS zeroes every new page), which also serialise the threads.
template <typename Buffers>
Buffers& thread_buffers() {
  thread_local Buffers buffers;
  return buffers;
}

// The same products for bfloat16 inputs on AVX512-BF16 (bf16_gemm.h): q, k and v are read as they
// are, every product is exact and summed in float32, so the scores are those of the widened
// path up to summation order; the probabilities are rounded to bf16 once, for the second product
// (as PyTorch's own CPU flash attention does): out moves by at most u * sum_j a_ij |v_j| more.
struct Bf16Products {
  const AttentionInputs& in;
  int64_t ldv = 0, ldq = 0;
  bf16::Operand k_pairs{};  // pairs along the channels, keys across
  struct Buffers {
    bf16::Words k_scratch, v_packed, q_packed, a_packed;
  };
  Buffers& buf = thread_buffers<Buffers>();

  void load_keys(int64_t b, int64_t h, int64_t count) {
    const at::Tensor k = in.k[b][h], v = in.v[b][h];
    k_pairs = bf16::column_pairs(k.const_data_ptr<c10::BFloat16>(), count, k.size(1), k.stride(0), k.stride(1),
                                 buf.k_scratch);
    ldv = bf16::padded(v.size(1));
    buf.v_packed.resize((count + 1) / 2 * ldv);  // pairs of keys, channels across
    bf16::pack_pairs(v.const_data_ptr<c10::BFloat16>(), count, v.size(1), v.stride(0), v.stride(1), buf.v_packed.data(),
                     ldv);
  }
  void load_queries(int64_t b, int64_t h, int64_t i0, int64_t rows) {
    const at::Tensor q = in.q[b][h].narrow(0, i0, rows);
    ldq = bf16::padded(rows);
    buf.q_packed.resize((q.size(1) + 1) / 2 * ldq);
    bf16::pack_pairs(q.const_data_ptr<c10::BFloat16>(), q.size(1), rows, q.stride(1), q.stride(0), buf.q_packed.data(),
                     ldq);
  }
  void scores(at::Tensor& s_tile, int64_t j0, int64_t n) {
    const int64_t D = in.k.size(3);
    bf16::gemm(k_pairs.from(j0), buf.q_packed.data(), ldq, (D + 1) / 2, n, s_tile.size(1), static_cast<float>(in.scale),
               s_tile.mutable_data_ptr<float>(), s_tile.stride(0), false);
  }
  // The softmax step of a tile. Without dropout (which acts on the float probabilities in s) its
  // probabilities go straight into a_packed, and true says so.
  bool probabilities(float* s, int64_t n, int64_t rows, int64_t ld, float* m, float* l, float* alpha,
                     bool dropout) {
    if (dropout) {
      online_softmax_tile(s, n, rows, ld, m, l, alpha);
      return false;
    }
    buf.a_packed.resize((n + 1) / 2 * ldq);
    for (int64_t i0 = 0; i0 < rows; i0 += kStrip)  // ldq: rows rounded up to whole strips
      online_softmax_strip_pairs(s + i0, n, ld, m + i0, l + i0, alpha + i0, buf.a_packed.data() + i0, ldq);
    return true;
  }
  // packed: probabilities() left the tile's probabilities in a_packed.
  void add_values(at::Tensor& acc_tile, const at::Tensor& s_tile, int64_t j0, int64_t n, bool first, bool packed) {
    // key tiles start at even keys (kKeyTile is even), so pair j0 / 2 starts this tile's keys
    const int64_t rows = s_tile.size(1), pairs = (n + 1) / 2;
    if (!packed) {
      buf.a_packed.resize(pairs * ldq);
      bf16::pack_pairs(s_tile.const_data_ptr<float>(), n, rows, s_tile.stride(0), 1, buf.a_packed.data(), ldq);
    }
    const int64_t Dv = acc_tile.size(1);
    bf16::gemm(bf16::packed(buf.a_packed, ldq), buf.v_packed.data() + j0 / 2 * ldv, ldv, pairs, rows, Dv, 1.f,
               acc_tile.mutable_data_ptr<float>(), Dv, !first);
  }
};

// In: the inputs' dtype; T: the one everything is computed in; Products: how the two GEMMs run.
template <typename In, typename Products>
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
    Products products{in};
    int64_t keys_of = -1;  // the (batch, head) whose keys and values products holds
    for (int64_t task = claim(); task < tasks; task = claim()) {
      const int64_t bh = task / row_tiles, b = bh / H, h = bh % H, i0 = (task % row_tiles) * tiles.rows;
      const int64_t rows = std::min(tiles.rows, N - i0), count = key_count[b];
      products.load_queries(b, h, i0, rows);
      if (keys_of != bh) {  // consecutive tasks mostly share a (batch, head)
        products.load_keys(b, h, count);
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
        for (int64_t r = 0; r < rows; ++r)
          std::copy(const_value + b * Dv, const_value + (b + 1) * Dv, acc_data + r * Dv);
      for (int64_t j0 = 0; j0 < count; j0 += tiles.keys) {
        const int64_t n = std::min(tiles.keys, count - j0);
        // transposed: keys x rows, each key's row ld apart
        at::Tensor s_tile = scores.narrow(0, 0, n * ld).view({n, ld}).narrow(1, 0, rows);
        products.scores(s_tile, j0, n);
        T* s = s_tile.mutable_data_ptr<T>();
        for (int64_t j = 0; j < n; ++j) std::fill(s + j * ld + rows, s + (j + 1) * ld, T(0));
        const bool dropout = in.drop_threshold > 0;
        const bool packed = products.probabilities(s, n, rows, ld, m.data(), l.data(), alpha.data(), dropout);
        if (dropout)
          apply_dropout_tile(s, n, rows, ld, key_index + b * P + j0, bh, i0, N, P, in.seed, in.drop_threshold,
                             static_cast<T>(in.keep_scale));
        const bool first = j0 == 0 && !has_const;  // nothing accumulated yet
        if (!first)
          for (int64_t r = 0; r < rows; ++r)
            for (int64_t e = 0; e < Dv; ++e) acc_data[r * Dv + e] *= alpha[r];
        products.add_values(acc_tile, s_tile, j0, n, first, packed);
      }
      if (count == 0 && !has_const) acc_tile.zero_();
      for (int64_t r = 0; r < rows; ++r) {
        sum[r] = output_normaliser(l[r]);  // reused as the normaliser
        lse_data[bh * N + i0 + r] = row_logsumexp(m[r], l[r]);
      }
      write_normalised<T, In>(acc_data, Dv, sum.data(), rows, Dv, out[b][h].narrow(0, i0, rows));
    }
  });
}

// The forward for bfloat16 inputs on AMX without dropout: the tiles turned row-major, as PyTorch's CPU flash
// attention runs them. Per block of kAmxRows query rows and tile of keys: the scores S = Q K^T from q's rows as
// they lie (brgemm's A), the softmax along each row writes the bf16 probabilities row-major, which are the
// second product's A as they lie, and acc += P V. Nothing is transposed (the transposed tiles above cost a
// transpose of every query tile and of every probability tile, and bf16::gemm's fixed 32 x 32 blocks a copy of
// every operand and ~170 brgemm calls per 1,800 rows), and every product has one of a few shapes (amx_key_tiles).
// Blocks of 128 rows: 2.2x the float32 kernel at UMTFSS's shape on an Intel Xeon, where 32 gave 1.8x and 256 no
// more than 128. The arithmetic is Bf16Products' (exact products summed in float32, the probabilities rounded to
// bf16 once); the sums may run in another order.
constexpr int64_t kAmxRows = 128;

int64_t round_up(int64_t n, int64_t multiple) { return (n + multiple - 1) / multiple * multiple; }

// The key tiles of the AMX products: `width` keys each (the last one's past the count zero-padded), `ld` in
// all. oneDNN keeps a compiled kernel (~0.7 MB) per shape and leading dimension, so the widths are few: whole
// 32s up to 128 keys (UMTFSS's ~70 prototypes: 96), whole 128s above, and above kKeyTile keys tiles of equal
// width: a run whose key count changes from call to call meets 7 widths.
struct AmxKeyTiles {
  int64_t width, ld;
};
AmxKeyTiles amx_key_tiles(int64_t count) {
  const int64_t tiles = std::max<int64_t>(at::divup(count, kKeyTile), 1), keys = at::divup(count, tiles);
  const int64_t width = keys <= 128 ? round_up(std::max<int64_t>(keys, 1), 32) : round_up(keys, 128);
  return {width, tiles * width};
}

void forward_amx_rows(const AttentionInputs& in, at::Tensor& out, at::Tensor& lse) {
  const int64_t B = in.q.size(0), H = in.q.size(1), N = in.q.size(2), D = in.q.size(3), Dv = in.v.size(3);
  const int64_t* key_count = in.key_count.const_data_ptr<int64_t>();
  const float* const_logit = in.const_logit.const_data_ptr<float>();
  const float* const_value = in.const_value.const_data_ptr<float>();
  float* lse_data = lse.mutable_data_ptr<float>();
  const auto* q_data = in.q.const_data_ptr<c10::BFloat16>();
  // the scores' depth: q's channels, zero-padded to whole AMX steps
  const int64_t depth = round_up(D, bf16::kAmxDepth), ldv = bf16::padded(Dv);
  // the row tiles of choose_tiles, evened out and rounded up to whole blocks; counted again from the rounded
  // size, which can leave fewer tiles (N 3600, 300 keys: 9 tiles of 400 rows become 8 of 512, and a ninth would
  // start past N)
  const int64_t even_tiles = std::max<int64_t>(at::divup(N, choose_tiles(in.k.size(2), N).rows), 1);
  const int64_t tile_rows = round_up(at::divup(N, even_tiles), kAmxRows);
  const int64_t row_tiles = N > 0 ? at::divup(N, tile_rows) : 0;
  const float scale = static_cast<float>(in.scale);

  struct Buffers {
    bf16::Words k_packed, v_packed, q_pairs, q_rows;
    std::vector<float> s, acc, m, l, new_max, sum, alpha;
    std::vector<c10::BFloat16> p;
  };
  const int64_t tasks = B * H * row_tiles;
  parallel_tasks(tasks, [&](const auto& claim) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;  // the slicing is internal, not traced
    Buffers& buf = thread_buffers<Buffers>();
    buf.s.resize(kAmxRows * kKeyTile);
    buf.p.resize(kAmxRows * kKeyTile);
    buf.acc.resize(tile_rows * ldv);
    for (auto* v : {&buf.m, &buf.l, &buf.new_max, &buf.sum, &buf.alpha}) v->resize(tile_rows);
    int64_t keys_of = -1;  // the (batch, head) whose keys and values are packed
    for (int64_t task = claim(); task < tasks; task = claim()) {
      const int64_t bh = task / row_tiles, b = bh / H, h = bh % H, i0 = (task % row_tiles) * tile_rows;
      const int64_t rows = std::min(tile_rows, N - i0), count = key_count[b];
      const AmxKeyTiles keys = amx_key_tiles(count);
      if (keys_of != bh && count > 0) {
        // k: pairs along the channels (zero up to depth), keys across; v: pairs of keys (zero past the count: the
        // probabilities there are 0, and 0 times a stale value could be NaN), channels across
        const at::Tensor k = in.k[b][h], v = in.v[b][h];
        buf.k_packed.assign(depth / 2 * keys.ld, 0u);
        bf16::pack_pairs(k.const_data_ptr<c10::BFloat16>(), D, count, k.stride(1), k.stride(0), buf.k_packed.data(),
                         keys.ld);
        buf.v_packed.assign(keys.ld / 2 * ldv, 0u);
        bf16::pack_pairs(v.const_data_ptr<c10::BFloat16>(), count, Dv, v.stride(0), v.stride(1), buf.v_packed.data(),
                         ldv);
        keys_of = bh;
      }
      float *acc = buf.acc.data(), *m = buf.m.data(), *l = buf.l.data();
      // The constant key first: exp(c - c) = 1 times its value.
      const float c = const_logit[b];
      const bool has_const = c > -std::numeric_limits<float>::infinity();
      const int64_t blocks_rows = round_up(rows, kAmxRows);  // the rows the blocks compute
      std::fill(m, m + blocks_rows, c);
      std::fill(l, l + blocks_rows, has_const ? 1.f : 0.f);
      if (has_const)
        for (int64_t r = 0; r < blocks_rows; ++r)
          std::copy(const_value + b * Dv, const_value + (b + 1) * Dv, acc + r * ldv);
      else if (count == 0)
        std::fill(acc, acc + rows * ldv, 0.f);
      for (int64_t r0 = 0; r0 < rows && count > 0; r0 += kAmxRows) {
        const int64_t block = std::min(kAmxRows, rows - r0);
        const bf16::Rows q_rows =
            bf16::rows_operand(q_data + b * in.q.stride(0) + h * in.q.stride(1) + (i0 + r0) * in.q.stride(2), block, D,
                               in.q.stride(2), in.q.stride(3), kAmxRows, depth, buf.q_pairs, buf.q_rows);
        // rows past `block` (zero queries) are computed and never read
        float *mb = m + r0, *lb = l + r0, *alpha = buf.alpha.data() + r0, *accb = acc + r0 * ldv;
        for (int64_t j0 = 0; j0 < count; j0 += keys.width) {
          const int64_t n = std::min(keys.width, count - j0);
          bf16::amx_rows_gemm(q_rows.data, q_rows.ld, buf.k_packed.data() + j0, keys.ld, kAmxRows, keys.width, depth,
                              buf.s.data(), keys.width, false);
          bf16::exp_rows(buf.s.data(), kAmxRows, n, keys.width, keys.width, scale, mb, buf.new_max.data() + r0,
                         buf.sum.data() + r0, buf.p.data(), keys.width);
          for (int64_t i = 0; i < kAmxRows; i += kStrip)
            strip_update(buf.new_max.data() + r0 + i, buf.sum.data() + r0 + i, mb + i, lb + i, alpha + i);
          const bool first = j0 == 0 && !has_const;  // nothing accumulated yet
          if (!first)
            for (int64_t r = 0; r < kAmxRows; ++r)
              for (int64_t e = 0; e < Dv; ++e) accb[r * ldv + e] *= alpha[r];
          bf16::amx_rows_gemm(buf.p.data(), keys.width, buf.v_packed.data() + j0 / 2 * ldv, ldv, kAmxRows, ldv,
                              keys.width, accb, ldv, !first);
        }
      }
      float* inv = buf.sum.data();  // reused as the normaliser
      for (int64_t r = 0; r < rows; ++r) {
        inv[r] = output_normaliser(l[r]);
        lse_data[bh * N + i0 + r] = row_logsumexp(m[r], l[r]);
      }
      write_normalised<float, c10::BFloat16>(acc, ldv, inv, rows, Dv, out[b][h].narrow(0, i0, rows));
    }
    bf16::amx_release();
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

// The five products of a backward tile (rows x n keys), with the inputs widened to float32 (or
// float64) per (batch, head): a = Q K^T and dP = dO V^T, then dV += A^T dO, dQ += scale dS K,
// dK += scale dS^T Q; also delta = rowsum(dO * O) and the constant key's dO^T a.
template <typename In>
struct WidenedBackward {
  using T = at::opmath_type<In>;
  const AttentionInputs& in;
  const at::Tensor& out;
  const at::Tensor& grad_out;
  const at::ScalarType opmath = c10::CppTypeToScalarType<T>::value;
  at::Tensor q, d_out, k, v, delta, q_tile, d_out_tile;

  void load(int64_t b, int64_t h, int64_t count) {
    q = widened(in.q[b][h], opmath);
    d_out = widened(grad_out[b][h], opmath);
    k = widened(in.k[b][h].narrow(0, 0, count), opmath);
    v = widened(in.v[b][h].narrow(0, 0, count), opmath);
    delta = (d_out * widened(out[b][h], opmath)).sum(-1);
  }
  const T* row_delta(int64_t i0) const { return delta.const_data_ptr<T>() + i0; }
  void load_rows(int64_t i0, int64_t rows) {
    q_tile = q.narrow(0, i0, rows);
    d_out_tile = d_out.narrow(0, i0, rows);
  }
  void logits(at::Tensor& a, int64_t j0, int64_t n) { at::mm_out(a, q_tile, k.narrow(0, j0, n).t()); }
  void probability_grads(at::Tensor& dp, int64_t j0, int64_t n) { at::mm_out(dp, d_out_tile, v.narrow(0, j0, n).t()); }
  void add_grads(const at::Tensor& a_dropped, const at::Tensor& ds, int64_t j0, at::Tensor& dq_rows, at::Tensor& dk,
                 at::Tensor& dv) {
    const int64_t n = ds.size(1);
    dv.narrow(0, j0, n).addmm_(a_dropped.t(), d_out_tile);
    if (in.scale == 0) {  // BLAS skips the product when alpha is 0: ds is scaled first, so NaN/Inf still propagate
      const at::Tensor zeroed = ds * 0;
      dq_rows.addmm_(zeroed, k.narrow(0, j0, n));
      dk.narrow(0, j0, n).addmm_(zeroed.t(), q_tile);
      return;
    }
    dq_rows.addmm_(ds, k.narrow(0, j0, n), 1, in.scale);
    dk.narrow(0, j0, n).addmm_(ds.t(), q_tile, 1, in.scale);
  }
  void add_const_grad(at::Tensor grad_const, const at::Tensor& a_const) { grad_const.addmv_(d_out_tile.t(), a_const); }
};

// out_i = sum_e x_ie y_ie over two (rows x cols) bf16 matrices, in float32. Contiguous rows go 16
// elements at a time into 16 partial sums, added pairwise at the end (an omp simd reduction ends
// in a serial chain of 16 dependent adds through memory, which cost more than the products).
FSSKERN_CPU_CLONES void row_dots(const c10::BFloat16* x, int64_t x_rs, int64_t x_cs, const c10::BFloat16* y,
                                 int64_t y_rs, int64_t y_cs, int64_t rows, int64_t cols, float* out) {
  using Floats = float __attribute__((vector_size(64)));
  using Words = uint32_t __attribute__((vector_size(64)));
  using Halves = uint16_t __attribute__((vector_size(32)));
  const auto widen16 = [](const c10::BFloat16* p) {
    Halves h;
    std::memcpy(&h, p, sizeof(h));
    return reinterpret_cast<Floats>(__builtin_convertvector(h, Words) << 16);
  };
  for (int64_t i = 0; i < rows; ++i) {
    const c10::BFloat16* xi = x + i * x_rs;
    const c10::BFloat16* yi = y + i * y_rs;
    float sum = 0.f;
    int64_t e = 0;
    if (x_cs == 1 && y_cs == 1 && cols >= 16) {
      Floats partial = {};
      for (; e + 16 <= cols; e += 16) partial += widen16(xi + e) * widen16(yi + e);
      float lanes[16];
      std::memcpy(lanes, &partial, sizeof(lanes));
      for (int width = 8; width > 0; width /= 2)
        for (int l = 0; l < width; ++l) lanes[l] += lanes[l + width];
      sum = lanes[0];
    }
    for (; e < cols; ++e) sum += static_cast<float>(xi[e * x_cs]) * static_cast<float>(yi[e * y_cs]);
    out[i] = sum;
  }
}

// The same for bfloat16 inputs on AVX512-BF16: q, k, v and dO are read as they are (exact
// products, float32 sums), the probabilities a and logit gradients dS are rounded to bf16 for the
// three gradient products. Each product reads its operands paired along its reduction dimension:
// row-major q, dO and dS (rounded) as they lie, the others packed.
struct Bf16Backward {
  const AttentionInputs& in;
  const at::Tensor& out;
  const at::Tensor& grad_out;
  at::Tensor q, d_out, d_out_tile;
  int64_t D = 0, Dv = 0, ld_keys = 0;
  struct Buffers {
    std::vector<float> delta;
    bf16::Words k_by_channel, v_by_channel, k_by_key;  // pairs along D, Dv; along the keys
    bf16::Words q_scratch, d_out_scratch, q_by_row, d_out_by_row, packed_a, packed_ds, ds_scratch;
    std::vector<c10::BFloat16> ds_rounded;
  };
  Buffers& buf = thread_buffers<Buffers>();
  bf16::Operand q_rows{}, d_out_rows{};                         // pairs along D, Dv; rows across

  void load(int64_t b, int64_t h, int64_t count) {
    const at::Tensor k = in.k[b][h], v = in.v[b][h], o = out[b][h];
    q = in.q[b][h];
    d_out = grad_out[b][h];
    D = k.size(1);
    Dv = v.size(1);
    ld_keys = bf16::padded(count);
    buf.k_by_channel.resize((D + 1) / 2 * ld_keys);
    buf.v_by_channel.resize((Dv + 1) / 2 * ld_keys);
    buf.k_by_key.resize((count + 1) / 2 * bf16::padded(D));
    const auto* kd = k.const_data_ptr<c10::BFloat16>();
    const auto* vd = v.const_data_ptr<c10::BFloat16>();
    bf16::pack_pairs(kd, D, count, k.stride(1), k.stride(0), buf.k_by_channel.data(), ld_keys);
    bf16::pack_pairs(vd, Dv, count, v.stride(1), v.stride(0), buf.v_by_channel.data(), ld_keys);
    bf16::pack_pairs(kd, count, D, k.stride(0), k.stride(1), buf.k_by_key.data(), bf16::padded(D));
    buf.delta.resize(q.size(0));  // delta_i = dO_i . O_i in float32
    row_dots(d_out.const_data_ptr<c10::BFloat16>(), d_out.stride(0), d_out.stride(1), o.const_data_ptr<c10::BFloat16>(),
             o.stride(0), o.stride(1), q.size(0), Dv, buf.delta.data());
  }
  const float* row_delta(int64_t i0) const { return buf.delta.data() + i0; }
  void load_rows(int64_t i0, int64_t rows) {
    const at::Tensor qt = q.narrow(0, i0, rows), gt = d_out.narrow(0, i0, rows);
    d_out_tile = gt;
    const auto* qd = qt.const_data_ptr<c10::BFloat16>();
    const auto* gd = gt.const_data_ptr<c10::BFloat16>();
    q_rows = bf16::column_pairs(qd, rows, D, qt.stride(0), qt.stride(1), buf.q_scratch);
    d_out_rows = bf16::column_pairs(gd, rows, Dv, gt.stride(0), gt.stride(1), buf.d_out_scratch);
    buf.q_by_row.resize((rows + 1) / 2 * bf16::padded(D));
    buf.d_out_by_row.resize((rows + 1) / 2 * bf16::padded(Dv));
    bf16::pack_pairs(qd, rows, D, qt.stride(0), qt.stride(1), buf.q_by_row.data(), bf16::padded(D));
    bf16::pack_pairs(gd, rows, Dv, gt.stride(0), gt.stride(1), buf.d_out_by_row.data(), bf16::padded(Dv));
  }
  void logits(at::Tensor& a, int64_t j0, int64_t n) {
    bf16::gemm(q_rows, buf.k_by_channel.data() + j0, ld_keys, (D + 1) / 2, a.size(0), n, 1.f,
               a.mutable_data_ptr<float>(), a.stride(0), false);
  }
  void probability_grads(at::Tensor& dp, int64_t j0, int64_t n) {
    bf16::gemm(d_out_rows, buf.v_by_channel.data() + j0, ld_keys, (Dv + 1) / 2, dp.size(0), n, 1.f,
               dp.mutable_data_ptr<float>(), dp.stride(0), false);
  }
  void add_grads(const at::Tensor& a_dropped, const at::Tensor& ds, int64_t j0, at::Tensor& dq_rows, at::Tensor& dk,
                 at::Tensor& dv) {
    const int64_t rows = ds.size(0), n = ds.size(1), ld_n = bf16::padded(n), row_pairs = (rows + 1) / 2;
    const auto scale = static_cast<float>(in.scale);
    // The tiles' rows run on to ld_n (their stride) with zeros: packed whole, they need no scalar tail.
    TORCH_INTERNAL_ASSERT(a_dropped.stride(0) == ld_n && ds.stride(0) == ld_n);
    // dV (n x Dv) += A^T dO and dK (n x D) += scale dS^T Q: sums over the rows
    buf.packed_a.resize(row_pairs * ld_n);
    bf16::pack_pairs(a_dropped.const_data_ptr<float>(), rows, ld_n, ld_n, 1, buf.packed_a.data(), ld_n);
    bf16::gemm(bf16::packed(buf.packed_a, ld_n), buf.d_out_by_row.data(), bf16::padded(Dv), row_pairs, n, Dv, 1.f,
               dv.mutable_data_ptr<float>() + j0 * Dv, Dv, true);
    buf.packed_ds.resize(row_pairs * ld_n);
    bf16::pack_pairs(ds.const_data_ptr<float>(), rows, ld_n, ld_n, 1, buf.packed_ds.data(), ld_n);
    bf16::gemm(bf16::packed(buf.packed_ds, ld_n), buf.q_by_row.data(), bf16::padded(D), row_pairs, n, D, scale,
               dk.mutable_data_ptr<float>() + j0 * D, D, true);
    // dQ (rows x D) += scale dS K: a sum over the keys (key tiles start at even keys), dS rounded in place
    buf.ds_rounded.resize(rows * ld_n);
    bf16::round_to_bf16(ds.const_data_ptr<float>(), rows * ld_n, buf.ds_rounded.data());
    const auto ds_rows = bf16::column_pairs(buf.ds_rounded.data(), rows, ld_n, ld_n, 1, buf.ds_scratch);
    bf16::gemm(ds_rows, buf.k_by_key.data() + j0 / 2 * bf16::padded(D), bf16::padded(D), (n + 1) / 2, rows, D, scale,
               dq_rows.mutable_data_ptr<float>(), D, true);
  }
  void add_const_grad(at::Tensor grad_const, const at::Tensor& a_const) {
    float* gc = grad_const.mutable_data_ptr<float>();
    const float* ac = a_const.const_data_ptr<float>();
    const auto* g = d_out_tile.const_data_ptr<c10::BFloat16>();
    for (int64_t r = 0; r < a_const.size(0); ++r)
      for (int64_t e = 0; e < Dv; ++e)
        gc[e] += ac[r] * static_cast<float>(g[r * d_out_tile.stride(0) + e * d_out_tile.stride(1)]);
  }
};

// The backward for bfloat16 inputs on AMX without dropout, row-major as forward_amx_rows. Per (batch, head), block
// of kAmxRows rows and key tile: S = Q K^T and dP = dO V^T from q's and dO's rows as they lie; the elementwise step
// (bf16::softmax_grad_rows) turns them into A and dS rounded to bf16, dS row-major and both paired along the rows;
// then dQ += dS K, and dV^T += dO^T A, dK^T += Q^T dS, whose B operands are A and dS paired along the rows as they
// are, and whose A operands are the block's rows transposed (or q and dO themselves when channels-first). One
// thread owns a (batch, head), so dK^T and dV^T need no reduction; they are transposed into grad_k and grad_v
// once. The arithmetic is Bf16Backward's (exact products, float32 sums, A and dS rounded to bf16 once).
void backward_amx_rows(const AttentionInputs& in, const at::Tensor& out, const at::Tensor& lse,
                       const at::Tensor& grad_out, at::Tensor& grad_q, at::Tensor& grad_k, at::Tensor& grad_v,
                       at::Tensor& grad_const) {
  const int64_t B = in.q.size(0), H = in.q.size(1), N = in.q.size(2), D = in.q.size(3), Dv = in.v.size(3);
  const int64_t depth = round_up(D, bf16::kAmxDepth), depth_v = round_up(Dv, bf16::kAmxDepth);
  const int64_t ldd = bf16::padded(D);
  const int64_t* key_count = in.key_count.const_data_ptr<int64_t>();
  const float* const_logit = in.const_logit.const_data_ptr<float>();
  const float* lse_data = lse.const_data_ptr<float>();
  const float scale = static_cast<float>(in.scale);
  struct Buffers {
    bf16::Words k_by_channel, v_by_channel, k_by_key, a_pairs, ds_pairs, pairs, q_rows, d_out_rows, q_t, d_out_t;
    std::vector<float> delta, s, dp, dq, dk_t, dv_t, block_lse, block_delta, scales;
    std::vector<c10::BFloat16> ds_rows;
  };
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    Buffers& buf = thread_buffers<Buffers>();
    buf.s.resize(kAmxRows * kKeyTile);
    buf.dp.resize(kAmxRows * kKeyTile);
    buf.ds_rows.resize(kAmxRows * kKeyTile);
    buf.a_pairs.resize(kAmxRows / 2 * kKeyTile);
    buf.ds_pairs.resize(kAmxRows / 2 * kKeyTile);
    buf.dq.resize(kAmxRows * ldd);
    buf.block_lse.resize(kAmxRows);
    buf.block_delta.resize(kAmxRows);
    buf.scales.assign(kAmxRows, scale);
    buf.delta.resize(N);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H, count = key_count[b];
      const AmxKeyTiles keys = amx_key_tiles(count);
      const at::Tensor q = in.q[b][h], d_out = grad_out[b][h], o = out[b][h], dq = grad_q[b][h];
      const auto* qd = q.const_data_ptr<c10::BFloat16>();
      const auto* gd = d_out.const_data_ptr<c10::BFloat16>();
      auto* dqd = dq.mutable_data_ptr<c10::BFloat16>();
      const int64_t dq_rs = dq.stride(0), dq_cs = dq.stride(1), g_rs = d_out.stride(0), g_cs = d_out.stride(1);
      row_dots(gd, d_out.stride(0), d_out.stride(1), o.const_data_ptr<c10::BFloat16>(), o.stride(0), o.stride(1), N,
               Dv, buf.delta.data());  // delta_i = dO_i . O_i
      if (count > 0) {
        // k and v paired along their channels (zero up to the depths), keys across; k paired along the keys
        const at::Tensor k = in.k[b][h], v = in.v[b][h];
        const auto* kd = k.const_data_ptr<c10::BFloat16>();
        buf.k_by_channel.assign(depth / 2 * keys.ld, 0u);
        bf16::pack_pairs(kd, D, count, k.stride(1), k.stride(0), buf.k_by_channel.data(), keys.ld);
        buf.v_by_channel.assign(depth_v / 2 * keys.ld, 0u);
        bf16::pack_pairs(v.const_data_ptr<c10::BFloat16>(), Dv, count, v.stride(1), v.stride(0),
                         buf.v_by_channel.data(), keys.ld);
        buf.k_by_key.assign(keys.ld / 2 * ldd, 0u);
        bf16::pack_pairs(kd, count, D, k.stride(0), k.stride(1), buf.k_by_key.data(), ldd);
        buf.dk_t.assign(D * keys.ld, 0.f);
        buf.dv_t.assign(Dv * keys.ld, 0.f);
      }
      const float c = const_logit[b];
      float* gc = c > -std::numeric_limits<float>::infinity() ? grad_const[b][h].mutable_data_ptr<float>() : nullptr;
      for (int64_t r0 = 0; r0 < N; r0 += kAmxRows) {
        const int64_t block = std::min(kAmxRows, N - r0);
        const c10::BFloat16 *q0 = qd + r0 * q.stride(0), *g0 = gd + r0 * g_rs;
        float *block_lse = buf.block_lse.data(), *block_delta = buf.block_delta.data();
        // rows past the block: logsumexp -inf, so probability 0 (and no gradient)
        std::fill(block_lse, block_lse + kAmxRows, -std::numeric_limits<float>::infinity());
        std::fill(block_delta, block_delta + kAmxRows, 0.f);
        std::copy(lse_data + bh * N + r0, lse_data + bh * N + r0 + block, block_lse);
        std::copy(buf.delta.data() + r0, buf.delta.data() + r0 + block, block_delta);
        float* dqb = buf.dq.data();
        if (count == 0) std::fill(dqb, dqb + kAmxRows * ldd, 0.f);
        if (count > 0) {
          const bf16::Rows q_rows = bf16::rows_operand(q0, block, D, q.stride(0), q.stride(1), kAmxRows, depth,
                                                       buf.pairs, buf.q_rows);
          const bf16::Rows d_out_rows = bf16::rows_operand(g0, block, Dv, d_out.stride(0), d_out.stride(1), kAmxRows,
                                                           depth_v, buf.pairs, buf.d_out_rows);
          const bf16::Rows q_t =
              bf16::rows_operand(q0, D, block, q.stride(1), q.stride(0), D, kAmxRows, buf.pairs, buf.q_t);
          const bf16::Rows d_out_t =
              bf16::rows_operand(g0, Dv, block, d_out.stride(1), d_out.stride(0), Dv, kAmxRows, buf.pairs, buf.d_out_t);
          for (int64_t j0 = 0; j0 < count; j0 += keys.width) {
            const int64_t n = std::min(keys.width, count - j0), w = keys.width;
            bf16::amx_rows_gemm(q_rows.data, q_rows.ld, buf.k_by_channel.data() + j0, keys.ld, kAmxRows, w, depth,
                                buf.s.data(), w, false);
            bf16::amx_rows_gemm(d_out_rows.data, d_out_rows.ld, buf.v_by_channel.data() + j0, keys.ld, kAmxRows, w,
                                depth_v, buf.dp.data(), w, false);
            bf16::softmax_grad_rows(buf.s.data(), buf.dp.data(), kAmxRows, n, w, scale, block_lse, block_delta,
                                    buf.ds_rows.data(), buf.a_pairs.data(), buf.ds_pairs.data());
            bf16::amx_rows_gemm(buf.ds_rows.data(), w, buf.k_by_key.data() + j0 / 2 * ldd, ldd, kAmxRows, ldd, w, dqb,
                                ldd, j0 > 0);
            bf16::amx_rows_gemm(d_out_t.data, d_out_t.ld, buf.a_pairs.data(), w, Dv, w, kAmxRows,
                                buf.dv_t.data() + j0, keys.ld, true);
            bf16::amx_rows_gemm(q_t.data, q_t.ld, buf.ds_pairs.data(), w, D, w, kAmxRows, buf.dk_t.data() + j0,
                                keys.ld, true);
          }
        }
        write_normalised_strided(dqb, ldd, buf.scales.data(), block, D, dqd + r0 * dq_rs, dq_rs, dq_cs);  // scale dS K
        // the constant key (key vector 0): only its value receives a gradient, dO^T a
        for (int64_t r = 0; gc && r < block; ++r) {
          const float a = probability_from_lse(c, block_lse[r]);
          for (int64_t e = 0; e < Dv; ++e) gc[e] += a * static_cast<float>(g0[r * g_rs + e * g_cs]);
        }
      }
      float *dk = grad_k[b][h].mutable_data_ptr<float>(), *dv = grad_v[b][h].mutable_data_ptr<float>();
      for (int64_t j = 0; j < count; ++j) {
        for (int64_t d = 0; d < D; ++d) dk[j * D + d] = scale * buf.dk_t[d * keys.ld + j];
        for (int64_t e = 0; e < Dv; ++e) dv[j * Dv + e] = buf.dv_t[e * keys.ld + j];
      }
    }
    bf16::amx_release();
  });
}

template <typename In, typename Products>
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
    // Tile rows are padded to whole strips (the padding zeroed, then computed and never used) so that
    // the row loops run on whole vectors.
    const int64_t tile_elements = tiles.rows * at::divup(tiles.keys, kStrip) * kStrip;
    at::Tensor probs = at::empty({tile_elements}, buffer);
    at::Tensor dropped = at::empty({tile_elements}, buffer);
    at::Tensor score_grad = at::empty({tile_elements}, buffer);
    // dQ of a row tile sums in opmath: in grad_q itself when that is opmath, else here, rounded once when done
    constexpr bool rounded = !std::is_same_v<In, T>;
    at::Tensor dq_sums = at::empty({rounded ? tiles.rows : 0, in.q.size(3)}, buffer);
    Products products{in, out, grad_out};
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H, count = key_count[b];
      at::Tensor dq = grad_q[b][h], dk = grad_k[b][h], dv = grad_v[b][h];
      products.load(b, h, count);
      for (int64_t i0 = 0; i0 < N; i0 += tiles.rows) {
        const int64_t rows = std::min(tiles.rows, N - i0);
        products.load_rows(i0, rows);
        at::Tensor dq_rows = rounded ? dq_sums.narrow(0, 0, rows) : dq.narrow(0, i0, rows);
        dq_rows.zero_();
        const T* row_lse = lse_data + bh * N + i0;
        const T* row_delta = products.row_delta(i0);
        for (int64_t j0 = 0; j0 < count; j0 += tiles.keys) {
          const int64_t n = std::min(tiles.keys, count - j0), ld = at::divup(n, kStrip) * kStrip;
          const auto tile = [&](at::Tensor& buffer) { return buffer.narrow(0, 0, rows * ld).view({rows, ld}); };
          at::Tensor a = tile(probs).narrow(1, 0, n);
          at::Tensor a_dropped = a;
          at::Tensor ds = tile(score_grad).narrow(1, 0, n);
          products.logits(a, j0, n);
          products.probability_grads(ds, j0, n);  // dP' = dO V^T (gradient of the dropped probabilities)
          T* a_data = a.mutable_data_ptr<T>();
          T* ds_data = ds.mutable_data_ptr<T>();
          for (int64_t r = 0; r < rows; ++r) {
            std::fill(a_data + r * ld + n, a_data + (r + 1) * ld, T(0));
            std::fill(ds_data + r * ld + n, ds_data + (r + 1) * ld, T(0));
            probabilities_row(a_data + r * ld, ld, scale, row_lse[r]);
          }
          if (in.drop_threshold > 0) {
            a_dropped = tile(dropped).narrow(1, 0, n);
            T* ad = a_dropped.mutable_data_ptr<T>();
            for (int64_t r = 0; r < rows; ++r)
              for (int64_t j = 0; j < n; ++j) {
                const uint64_t element = dropout_element(bh, i0 + r, key_index[b * P + j0 + j], N, P);
                const T factor = dropout_factor(in.seed, element, in.drop_threshold, keep_scale);
                ad[r * ld + j] = a_data[r * ld + j] * factor;
                ds_data[r * ld + j] *= factor;
              }
          }
          T* a_dropped_data = a_dropped.mutable_data_ptr<T>();
          for (int64_t r = 0; r < rows; ++r) {
            logit_grad_row(a_data + r * ld, ds_data + r * ld, ld, row_delta[r]);
            // padding back to 0: the bf16 packs read whole strips
            std::fill(a_dropped_data + r * ld + n, a_dropped_data + (r + 1) * ld, T(0));
            std::fill(ds_data + r * ld + n, ds_data + (r + 1) * ld, T(0));
          }
          products.add_grads(a_dropped, ds, j0, dq_rows, dk, dv);
        }
        // The constant key (no dropout, key vector 0): only its value receives a gradient.
        const T c = const_logit[b];
        if (c > -std::numeric_limits<T>::infinity()) {
          at::Tensor a_const = at::empty({rows}, buffer);
          T* ac = a_const.mutable_data_ptr<T>();
          for (int64_t r = 0; r < rows; ++r) ac[r] = probability_from_lse(c, row_lse[r]);
          products.add_const_grad(grad_const[b][h], a_const);
        }
        if (rounded) dq.narrow(0, i0, rows).copy_(dq_rows);
      }
    }
  });
}

// The row-major AMX path: bf16 products on the tile units, no dropout, channels on both sides (the blocks of
// Bf16Products / Bf16Backward take the rest).
bool amx_rows_path(const AttentionInputs& in) {
  return bf16::amx_products() && in.drop_threshold == 0 && in.q.size(3) > 0 && in.v.size(3) > 0;
}

void attention_forward_cpu(const AttentionInputs& in, at::Tensor& out, at::Tensor& lse) {
  if (in.q.scalar_type() == at::kBFloat16 && bf16::available()) {
    if (amx_rows_path(in)) return forward_amx_rows(in, out, lse);
    return forward_typed<c10::BFloat16, Bf16Products>(in, out, lse);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.q.scalar_type(), "fsskern_attention_forward_cpu",
                                  [&] { forward_typed<scalar_t, WidenedProducts<scalar_t>>(in, out, lse); });
}

void attention_backward_cpu(const AttentionInputs& in, const at::Tensor& out, const at::Tensor& lse,
                            const at::Tensor& grad_out, at::Tensor& grad_q, at::Tensor& grad_k, at::Tensor& grad_v,
                            at::Tensor& grad_const) {
  if (in.q.scalar_type() == at::kBFloat16 && bf16::available()) {
    if (amx_rows_path(in))
      return backward_amx_rows(in, out, lse, grad_out, grad_q, grad_k, grad_v, grad_const);
    return backward_typed<c10::BFloat16, Bf16Backward>(in, out, lse, grad_out, grad_q, grad_k, grad_v, grad_const);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.q.scalar_type(), "fsskern_attention_backward_cpu", [&] {
    backward_typed<scalar_t, WidenedBackward<scalar_t>>(in, out, lse, grad_out, grad_q, grad_k, grad_v, grad_const);
  });
}

constexpr AttentionKernels kCpuKernels{&attention_forward_cpu, &attention_backward_cpu};

}  // namespace

TORCH_LIBRARY_IMPL(FSSKERN_NAMESPACE, CPU, m) { register_attention<kCpuKernels>(m); }

}  // namespace fsskern
