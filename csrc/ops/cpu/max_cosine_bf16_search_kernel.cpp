// CPU kernel of max_cosine_bf16_search: max_cosine by a certified bf16 search. Why bf16 scores
// can certify the float32 answer: fsskern/ops/certified_search.py (the device-generic version,
// which runs on GPUs, with a worst-case bound r per pair); this kernel bounds each pair's error
// from the actual rounding errors of its two rows (cosine_bounds), a third of r on real features.
//
// Per (image, shot), one tile of up to kSupportTile foreground support pixels at a time:
//   1. gather w_j s_j of the tile's pixels as float32 rows (tile x C), with their norms in the
//      float32 kernel's order (so the norms are its norms), the rows rounded to bf16 (packed for
//      the GEMM as they are gathered, on fsskern's), and the norms of the rounded rows and of
//      their rounding errors;
//   2. per chunk of kQueryChunk query pixels: the same for the chunk's rows; a bf16 GEMM gives the
//      chunk's bf16 dot products with the tile: fsskern's vdpbf16ps GEMM (bf16_gemm.h, float32
//      output) on AVX512-BF16, oneDNN's (bf16 output) on AMX-BF16 and on CPUs with neither;
//   3. per query pixel (threads split the chunk): each pair's interval [c - e, c + e] around its
//      bf16 cosine c; the pixel's floor L = max (c - e) over the pairs seen so far rises, and every
//      pair whose c + e reaches L, and the value already folded, is rescored in float32 (the dot of
//      two float32 rows) and folded into the max/argmax as the float32 kernel folds.
// L only grows, and the float32 argmax j* has c_j* + e_j* >= its float32 cosine >= every pair's
// c - e and >= every folded value, so j* (and any pair tied with it) is always rescored: the values
// and indices are the float32 kernel's, up to the summation order of a rescored dot. Extra memory:
// a tile in float32 and packed bf16, a chunk in float32 and bf16 and one score block, about 29 MB
// at C = 2048, whatever the image size.
//
// Inputs the bound does not cover go to the float32 kernel, which keeps its dtype and NaN rules:
// other dtypes than float32, eps = 0 (0 / 0 cosines) and non-finite values.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS  // per-operator ATen headers only (setup.py)
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>

#include "common/cpu_dispatch.h"
#include "common/library.h"
#include "common/transpose_tile.h"
#include "ops/cpu/bf16_gemm.h"
#include "ops/max_cosine.h"

namespace fsskern {
namespace {

// 2048 x 2048 float32 rows are 16 MB and their packing 8 MB; 252 query rows another 3 MB. One tile
// holds a 60 x 60 support's foreground up to 57 %, so the query is gathered once per shot there
// (1,024-pixel tiles: 10 % slower at 50 % foreground, 12 MB less). The GEMM (252 x C x 2048) runs at
// the bf16 units' peak on Zen 4 (one vdpbf16ps a cycle per core); 504-row chunks were no faster.
constexpr int64_t kSupportTile = 2048;
constexpr int64_t kQueryChunk = 42 * bf16::kBlockRows;  // threads take whole blocks of the GEMM
constexpr int64_t kPanel = 64;                           // pixels: the GEMM's widest block

// The words of one packed panel: (C + 1) / 2 pairs of channels x kPanel pixels.
constexpr int64_t panel_size(int64_t C) { return (C + 1) / 2 * kPanel; }

// x - x is 0 for a finite x and NaN otherwise: a compare the loop vectorises (std::isfinite's
// classification did not, and the lambda of parallel_for is not cloned for AVX-512, this is).
FSSKERN_CPU_CLONES bool finite_range(const float* p, int64_t n) {
  int bad = 0;
#pragma omp simd reduction(| : bad)
  for (int64_t i = 0; i < n; ++i) bad |= !(p[i] - p[i] == 0.f);
  return !bad;
}

bool all_finite(const at::Tensor& x) {
  const float* p = x.const_data_ptr<float>();
  std::atomic<bool> finite{true};
  at::parallel_for(0, x.numel(), 1 << 16, [&](int64_t begin, int64_t end) {
    if (!finite_range(p + begin, end - begin)) finite = false;
  });
  return finite;
}

typedef uint16_t Half16 __attribute__((vector_size(kTile * sizeof(uint16_t))));
typedef uint32_t Bits16 __attribute__((vector_size(kTile * sizeof(uint32_t))));

// 16 floats rounded to bf16 to nearest even, as c10::BFloat16 rounds finite values (a non-finite
// row is never used: the caller falls back to the float32 kernel): the float32 bit patterns (by
// reference: 64-byte vectors by value would change the ABI between clones).
inline void bf16_bits(const TileRow<float>::type& x, Bits16& u) {
  std::memcpy(&u, &x, sizeof(u));
  u = bf16::round_bits_to_bf16(u);
}

inline void round_to_bf16(const TileRow<float>::type& x, TileRow<float>::type& out) {
  Bits16 u;
  bf16_bits(x, u);
  std::memcpy(&out, &u, sizeof(out));
}

// Per row: its norm (as the float32 kernel takes it), the norm of its bf16 rounding and the norm of
// the rounding error, which bound the bf16 dot products' error (fold_query_pixel).
struct RowNorms {
  float *norm, *rounded, *error;
};

// gather_rows for one thread's groups g0..g1 of 16 pixels (a function of its own: the parallel_for
// lambda is not cloned for AVX-512, this is). 16 pixels x 16 channels at a time, transposed in
// registers; the thread sweeps its pixels one block of 16 channels at a time, so the map is read
// along its rows.
FSSKERN_CPU_CLONES bool gather_groups(const float* map, int64_t C, int64_t N, const int64_t* cols, const float* scale,
                                      int64_t n, float* rows, c10::BFloat16* rows16, uint32_t* panels,
                                      RowNorms norms, int64_t g0, int64_t g1) {
  using Row = TileRow<float>::type;
  // on the stack: std::vector does not align vector types to 64 bytes here
  constexpr int64_t kMaxGroups = kSupportTile / kTile;
  TORCH_CHECK(g1 - g0 <= kMaxGroups, "gather_rows: at most ", kSupportTile, " rows at a time");
  Row scale_rows[kMaxGroups], acc[3 * kMaxGroups] = {};
  bool adjacent[kMaxGroups];
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t r0 = g * kTile, pixels = std::min<int64_t>(kTile, n - r0);
    for (int l = 0; l < kTile; ++l) scale_rows[g - g0][l] = l < pixels ? (scale ? scale[cols[r0 + l]] : 1.f) : 0.f;
    // 16 adjacent pixels (query chunks; solid foreground): one vector load per channel
    adjacent[g - g0] = pixels == kTile && cols[r0 + kTile - 1] - cols[r0] == kTile - 1;
  }
  for (int64_t c0 = 0; c0 < C; c0 += kTile) {
    const int64_t width = std::min<int64_t>(kTile, C - c0);
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t r0 = g * kTile, pixels = std::min<int64_t>(kTile, n - r0);
      const Row factor = scale_rows[g - g0];
      Row tile[kTile];
      // the sums in registers across the block (through memory, each add waited on the last one's store)
      Row sum = acc[3 * (g - g0)], sum_rounded = acc[3 * (g - g0) + 1], sum_error = acc[3 * (g - g0) + 2];
      // the GEMM's packing of the block: pair q of channels is one word per pixel, 2q in its low half
      uint32_t* packed = panels ? panels + r0 / kPanel * panel_size(C) + c0 / 2 * kPanel + r0 % kPanel : nullptr;
      Bits16 low = {};
      for (int cc = 0; cc < kTile; ++cc) {
        const float* channel = map + (c0 + std::min<int64_t>(cc, width - 1)) * N;
        // the lines holding the group's pixels in the next block's channel: the map is read a line or a few of
        // each row at a time, too little for the hardware prefetcher (a quarter less time in this function)
        if (c0 + kTile + cc < C) {
          const float* next = channel + kTile * N;
          if (adjacent[g - g0]) {
            __builtin_prefetch(next + cols[r0]);
            __builtin_prefetch(next + cols[r0] + kTile - 1);
          } else {
            uintptr_t line = 0;
            for (int64_t l = 0; l < pixels; ++l) {
              const uintptr_t at = reinterpret_cast<uintptr_t>(next + cols[r0 + l]) / 64;
              if (at != line) __builtin_prefetch(next + cols[r0 + l]);
              line = at;
            }
          }
        }
        if (adjacent[g - g0]) {
          std::memcpy(&tile[cc], channel + cols[r0], sizeof(Row));
        } else {
          for (int l = 0; l < kTile; ++l) tile[cc][l] = channel[cols[r0 + std::min<int64_t>(l, pixels - 1)]];
        }
        tile[cc] = factor * tile[cc];
        Bits16 hat_bits = {};
        if (cc < width) {
          Row hat;
          bf16_bits(tile[cc], hat_bits);
          std::memcpy(&hat, &hat_bits, sizeof(hat));
          const Row err = hat - tile[cc];
          sum += tile[cc] * tile[cc];
          sum_rounded += hat * hat;
          sum_error += err * err;
        }
        if (packed && cc % 2 == 0) low = hat_bits >> 16;
        if (packed && cc % 2 == 1 && cc - 1 < width) {
          const Bits16 words = low | hat_bits;
          std::memcpy(packed + cc / 2 * kPanel, &words, sizeof(words));
        }
      }
      acc[3 * (g - g0)] = sum;
      acc[3 * (g - g0) + 1] = sum_rounded;
      acc[3 * (g - g0) + 2] = sum_error;
      transpose_tile<float>(tile);
      for (int64_t l = 0; l < pixels; ++l) {
        // fixed sizes where the block is whole: inlined vector stores
        float* row = rows + (r0 + l) * C + c0;
        if (width == kTile)
          std::memcpy(row, &tile[l], sizeof(Row));
        else
          std::memcpy(row, &tile[l], width * sizeof(float));
        if (!rows16) continue;  // packed above
        Bits16 hat;
        bf16_bits(tile[l], hat);
        const Half16 rounded = __builtin_convertvector(hat >> 16, Half16);
        c10::BFloat16* row16 = rows16 + (r0 + l) * C + c0;
        if (width == kTile)
          std::memcpy(row16, &rounded, sizeof(Half16));
        else
          std::memcpy(row16, &rounded, width * sizeof(c10::BFloat16));
      }
    }
  }
  bool ok = true;
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t r0 = g * kTile, pixels = std::min<int64_t>(kTile, n - r0);
    const Row* sums = acc + 3 * (g - g0);
    for (int64_t l = 0; l < pixels; ++l) {
      norms.norm[r0 + l] = std::sqrt(sums[0][l]);
      norms.rounded[r0 + l] = std::sqrt(sums[1][l]);
      norms.error[r0 + l] = std::sqrt(sums[2][l]);
      ok &= std::isfinite(norms.norm[r0 + l]) && std::isfinite(norms.rounded[r0 + l]);
    }
  }
  return ok;
}

// Rows (n x C) in float32 of the pixels cols[0..n) of a channel-first (C x N) map, each times
// scale[col] (none: 1), rounded to bf16 either as rows (rows16) or packed for fsskern's GEMM (panels,
// see max_cosine_bf16_search_cpu), and their RowNorms. Each norm sums the squares over c in order, as
// the float32 kernel's column_norms (so the norms are its norms). False when a norm is not finite
// (a non-finite value, or an overflow): the caller then runs the float32 kernel.
bool gather_rows(const float* map, int64_t C, int64_t N, const int64_t* cols, const float* scale, int64_t n,
                 float* rows, c10::BFloat16* rows16, uint32_t* panels, RowNorms norms) {
  std::atomic<bool> finite{true};
  at::parallel_for(0, (n + kTile - 1) / kTile, 1, [&](int64_t g0, int64_t g1) {
    if (!gather_groups(map, C, N, cols, scale, n, rows, rows16, panels, norms, g0, g1)) finite = false;
  });
  return finite;
}

// Four independent partial sums, so the adds pipeline (one sum would wait on each add's latency).
FSSKERN_CPU_CLONES float dot(const float* a, const float* b, int64_t n) {
  using Row = TileRow<float>::type;
  Row acc[4] = {};
  int64_t c = 0;
  for (; c + 4 * kTile <= n; c += 4 * kTile) {
    for (int u = 0; u < 4; ++u) {
      Row x, y;
      std::memcpy(&x, a + c + u * kTile, sizeof(Row));
      std::memcpy(&y, b + c + u * kTile, sizeof(Row));
      acc[u] += x * y;
    }
  }
  const Row sum = (acc[0] + acc[1]) + (acc[2] + acc[3]);
  float out = 0.f;
  for (int l = 0; l < kTile; ++l) out += sum[l];
  for (; c < n; ++c) out += a[c] * b[c];
  return out;
}

struct Tile {
  const float* rows;  // (n x C) float32
  RowNorms norms;
  const int64_t* fg;  // the pixels' indices in the support grid
  int64_t n, C;
};

struct QueryPixel {
  const float* row;  // C float32 values
  float norm, rounded, error;
};

// The GEMM's output: float32 from fsskern's (the dot products as accumulated), bf16 from oneDNN's
// (rounded once more). Both read as exact float32 values inside `omp simd` loops.
inline float score_value(const float* scores, int64_t r) { return scores[r]; }
inline float score_value(const c10::BFloat16* scores, int64_t r) {
  const uint32_t widened = static_cast<uint32_t>(reinterpret_cast<const uint16_t*>(scores)[r]) << 16;
  float D;
  std::memcpy(&D, &widened, sizeof(D));
  return D;
}

// The interval [c - e, c + e] around each bf16 cosine c = D / den that holds the float32 cosine
// of the pair as the rescoring computes it. With s^, q^ the bf16 roundings, D the GEMM's output
// (fp32 accumulation; oneDNN's then rounded to bf16), d the exact dot of the float32 rows, and
// g = C 2^-24 / (1 - C 2^-24):
//   |D - d| <= u/(1-u) |D|                      (oneDNN's output rounding, u = 2^-8; 0 for float32 scores)
//            + g |s^| |q^|                        (fp32 accumulation of the exact bf16 products)
//            + |s^ - s| |q^| + |s| |q^ - q|       (the inputs' rounding, Cauchy-Schwarz)
//            + (C + sqrt(C) (|s^| + |q^|)) 2^-126 (denormals flushed by the bf16 units)
// and the rescored float32 dot is within g |s| |q| of d. The norms' own rounding (relative C 2^-24)
// and the divisions' are covered by the 2^-10 and 2^-20 margins. For real features this is a third of
// certified_search.py's worst case r (which assumes every element rounds by a full u).
template <typename Score>
FSSKERN_CPU_CLONES void cosine_bounds(const Score* scores, const RowNorms& s, const QueryPixel& q, float eps, float g,
                                      float sqrt_c, float C, int64_t n, float* hi, float& floor, float& top) {
  const float uo = std::is_same_v<Score, float> ? 0.f : 0x1p-8f / (1.f - 0x1p-8f);
  const float k_rounded = g * q.rounded, k_norm = g * q.norm + q.error, k_error = q.rounded;
  // local copies: the vectoriser does not hoist loads of the struct's members past the stores to hi
  const float *s_norm = s.norm, *s_rounded = s.rounded, *s_error = s.error;
  const float q_norm = q.norm, q_rounded = q.rounded;
  float lo_max = floor, hi_max = top;
#pragma omp simd reduction(max : lo_max, hi_max)
  for (int64_t r = 0; r < n; ++r) {
    const float D = score_value(scores, r);
    const float den = s_norm[r] * q_norm + eps;
    const float c = D / den;
    const float flushed = (C + sqrt_c * (s_rounded[r] + q_rounded)) * 0x1p-126f;
    const float a = (s_rounded[r] * k_rounded + s_norm[r] * k_norm + s_error[r] * k_error) * (1.f + 0x1p-10f);
    const float e = (a + flushed + uo * __builtin_fabsf(D)) / den * (1.f + 0x1p-20f) + 0x1p-20f * __builtin_fabsf(c);
    hi[r] = c + e;
    lo_max = c - e > lo_max ? c - e : lo_max;
    hi_max = c + e > hi_max ? c + e : hi_max;
  }
  floor = lo_max;
  top = hi_max;
}

// The first r in [begin, n) with x[r] >= t, else n: 16 at a time, most blocks holding none.
FSSKERN_CPU_CLONES int64_t first_at_least(const float* x, int64_t begin, int64_t n, float t) {
  int64_t r = begin;
  for (; r + kTile <= n; r += kTile) {
    int any = 0;  // `|`, not `||`: a short-circuit per element keeps the loop scalar
#pragma omp simd reduction(| : any)
    for (int l = 0; l < kTile; ++l) any |= x[r + l] >= t;
    if (any) break;
  }
  while (r < n && x[r] < t) ++r;
  return r;
}

// One query pixel against one tile: raise the running floor L = max (c - e) with the tile's pairs,
// then rescore in float32 every pixel whose c + e reaches L and fold it in. L only grows, and the
// float32 argmax j* has c_j* + e_j* >= its float32 cosine >= every pair's c - e, so it is never skipped.
// The pair with the highest c + e is rescored first: its float32 cosine, usually the maximum, is then
// a second floor (a pair whose c + e lies below a value already folded can neither beat nor tie it):
// 2.1 rescorings per row instead of 4.1 on the prior benchmark's post-ReLU random features (C = 2048).
// Returns how many pairs it rescored.
template <typename Score>
int64_t fold_query_pixel(const Tile& tile, const Score* scores, const QueryPixel& q, float eps, float g, float* hi,
                         float& floor, float& best, int64_t& best_j) {
  const float C = static_cast<float>(tile.C);
  float top = -std::numeric_limits<float>::infinity();
  cosine_bounds(scores, tile.norms, q, eps, g, std::sqrt(C), C, tile.n, hi, floor, top);
  int64_t rescored = 0;
  const auto rescore = [&](int64_t r) {
    ++rescored;
    const float v = cosine_from_dot(dot(tile.rows + r * tile.C, q.row, tile.C), tile.norms.norm[r], q.norm, eps);
    if (max_cosine_better(v, tile.fg[r], best, best_j)) {
      best = v;
      best_j = tile.fg[r];
    }
  };
  if (top < floor || top < best) return 0;
  const int64_t first = first_at_least(hi, 0, tile.n, top);
  rescore(first);
  for (int64_t r = first_at_least(hi, 0, tile.n, std::max(floor, best)); r < tile.n;
       r = first_at_least(hi, r + 1, tile.n, std::max(floor, best)))
    if (r != first) rescore(r);
  return rescored;
}

// What the searches since the last read rescored, for benchmarks/certified_search.py: (query pixel, shot)
// rows, rows with more than one rescoring, rescorings. Read and reset by the op _bf16_search_counts().
std::atomic<int64_t> counted_rows{0}, multi_rows{0}, rescorings{0};

std::tuple<at::Tensor, at::Tensor> max_cosine_bf16_search_cpu(const at::Tensor& query, const at::Tensor& support,
                                                              const at::Tensor& support_weights, double eps_) {
  check_max_cosine_inputs(query, support, support_weights, eps_);
  const int64_t C = support.size(2);
  const auto fallback = [&] { return max_cosine_cpu(query, support, support_weights, eps_); };
  // eps as the search uses it: a double below float's range rounds to 0, whose 0 / 0 the float32 kernel keeps as NaN
  if (query.scalar_type() != at::kFloat || static_cast<float>(eps_) == 0.f || C > (int64_t(1) << 20)) {
    return fallback();
  }
  const auto q = query.contiguous();
  const auto s = support.contiguous();
  const auto w = support_weights.contiguous();
  // the query is checked by its norms, the foreground by the rows' norms; a masked-out pixel poisons its shot
  if (!all_finite(s) || !all_finite(w)) return fallback();
  const int64_t B = s.size(0), K = s.size(1), Ns = s.size(3), Nq = q.size(2);
  const float eps = static_cast<float>(eps_);
  const double c_u = std::ldexp(static_cast<double>(C), -24);
  const float g = static_cast<float>(c_u / (1 - c_u));  // fp32 summation of C terms
  at::Tensor values = at::empty({B, K, Nq}, q.options());
  at::Tensor indices = at::empty({B, K, Nq}, q.options().dtype(at::kLong));

  const int64_t tile_cap = std::min(kSupportTile, Ns), chunk_cap = std::min(kQueryChunk, Nq);
  // The bf16 products: fsskern's vdpbf16ps GEMM (float32 scores, the tile packed once) where the CPU has
  // AVX512-BF16 and no AMX; oneDNN's (bf16 scores) elsewhere: AMX-BF16 tile units do many times vdpbf16ps's
  // work per cycle, and on a CPU with neither (bf16_search("always") in the tests) oneDNN emulates.
  const bool own_gemm = bf16::available() && !bf16::amx();
  at::Tensor rows = at::empty({tile_cap, C}, q.options());
  at::Tensor rows16 = at::empty({own_gemm ? 0 : tile_cap, C}, q.options().dtype(at::kBFloat16));
  at::Tensor chunk = at::empty({chunk_cap, C}, q.options());
  at::Tensor chunk16 = at::empty({chunk_cap, C}, q.options().dtype(at::kBFloat16));
  // For fsskern's GEMM the gather packs the tile itself, in panels of kPanel pixels, each its own
  // contiguous pair-packed matrix (the GEMM reads each panel's words in order). A tensor: on a cache
  // line, and not zero-filled as bf16::Words is (8 MB written for nothing).
  const int64_t pairs = (C + 1) / 2, panel_words = panel_size(C);
  at::Tensor panel_buffer =
      at::empty({own_gemm ? (tile_cap + kPanel - 1) / kPanel * panel_words : 0}, q.options().dtype(at::kInt));
  uint32_t* panels = own_gemm ? reinterpret_cast<uint32_t*>(panel_buffer.mutable_data_ptr<int32_t>()) : nullptr;
  bf16::Words chunk_scratch;
  at::Tensor scores = at::empty({chunk_cap * tile_cap}, q.options().dtype(own_gemm ? at::kFloat : at::kBFloat16));
  std::vector<float> tile_norms(3 * tile_cap), chunk_norms(3 * chunk_cap), floors(Nq);
  std::vector<int64_t> rescored(Nq);
  const RowNorms norms{tile_norms.data(), tile_norms.data() + tile_cap, tile_norms.data() + 2 * tile_cap};
  const RowNorms qnorms{chunk_norms.data(), chunk_norms.data() + chunk_cap, chunk_norms.data() + 2 * chunk_cap};
  std::vector<int64_t> query_cols(Nq);
  std::iota(query_cols.begin(), query_cols.end(), int64_t(0));

  for (int64_t b = 0; b < B; ++b) {
    const float* qb = q.const_data_ptr<float>() + b * C * Nq;
    for (int64_t k = 0; k < K; ++k) {
      const float* sk = s.const_data_ptr<float>() + (b * K + k) * C * Ns;
      const float* wk = w.const_data_ptr<float>() + (b * K + k) * Ns;
      std::vector<int64_t> fg;
      for (int64_t j = 0; j < Ns; ++j)
        if (wk[j] != 0.f) fg.push_back(j);
      if (fg.empty() && !all_finite(q[b])) return fallback();  // no tile below reads this query
      // the background candidate, 0 for a finite query pixel, comes first in the scan
      float* best = values.mutable_data_ptr<float>() + (b * K + k) * Nq;
      int64_t* best_j = indices.mutable_data_ptr<int64_t>() + (b * K + k) * Nq;
      const bool has_bg = static_cast<int64_t>(fg.size()) < Ns;
      std::fill_n(best, Nq, has_bg ? 0.f : -std::numeric_limits<float>::infinity());
      std::fill_n(best_j, Nq, has_bg ? kBackgroundIndex : kNoIndex);
      std::fill(floors.begin(), floors.end(), -std::numeric_limits<float>::infinity());
      std::fill(rescored.begin(), rescored.end(), 0);
      for (int64_t r0 = 0; r0 < static_cast<int64_t>(fg.size()); r0 += kSupportTile) {
        const int64_t n = std::min<int64_t>(kSupportTile, fg.size() - r0);
        if (!gather_rows(sk, C, Ns, fg.data() + r0, wk, n, rows.mutable_data_ptr<float>(),
                         own_gemm ? nullptr : rows16.mutable_data_ptr<c10::BFloat16>(), panels, norms))
          return fallback();
        const Tile tile{rows.const_data_ptr<float>(), norms, fg.data() + r0, n, C};
        for (int64_t i0 = 0; i0 < Nq; i0 += kQueryChunk) {
          const int64_t nq = std::min(kQueryChunk, Nq - i0);
          if (!gather_rows(qb, C, Nq, query_cols.data() + i0, nullptr, nq, chunk.mutable_data_ptr<float>(),
                           chunk16.mutable_data_ptr<c10::BFloat16>(), nullptr, qnorms))
            return fallback();
          const float* cq = chunk.const_data_ptr<float>();
          const auto fold_rows = [&](const auto* sc, int64_t begin, int64_t end) {
            std::vector<float> hi(n);
            for (int64_t i = begin; i < end; ++i) {
              const QueryPixel qp{cq + i * C, qnorms.norm[i], qnorms.rounded[i], qnorms.error[i]};
              rescored[i0 + i] += fold_query_pixel(tile, sc + i * n, qp, eps, g, hi.data(), floors[i0 + i],
                                                   best[i0 + i], best_j[i0 + i]);
            }
          };
          if (own_gemm) {
            const bf16::Operand a =
                bf16::column_pairs(chunk16.const_data_ptr<c10::BFloat16>(), nq, C, C, 1, chunk_scratch);
            float* sc = scores.mutable_data_ptr<float>();
            // each thread multiplies and folds its own query rows (their scores stay in its cache)
            constexpr int64_t rows = bf16::kBlockRows;  // a thread's share ends on a whole block
            at::parallel_for(0, (nq + rows - 1) / rows, 1, [&](int64_t b0, int64_t b1) {
              const int64_t begin = rows * b0, end = std::min(nq, rows * b1);
              for (int64_t j0 = 0; j0 < n; j0 += kPanel)
                bf16::gemm(a.from(begin), panels + j0 / kPanel * panel_words, kPanel, pairs, end - begin,
                           std::min(kPanel, n - j0), 1.f, sc + begin * n + j0, n, false);
              fold_rows(sc, begin, end);
            });
          } else {
            at::Tensor block = scores.narrow(0, 0, nq * n).view({nq, n});
            at::mm_out(block, chunk16.narrow(0, 0, nq), rows16.narrow(0, 0, n).t());
            const c10::BFloat16* sc = block.const_data_ptr<c10::BFloat16>();
            at::parallel_for(0, nq, 8, [&](int64_t begin, int64_t end) { fold_rows(sc, begin, end); });
          }
        }
      }
      counted_rows += Nq;
      multi_rows += std::count_if(rescored.begin(), rescored.end(), [](int64_t c) { return c > 1; });
      rescorings += std::accumulate(rescored.begin(), rescored.end(), int64_t(0));
    }
  }
  return {values, indices};
}

}  // namespace

TORCH_LIBRARY_IMPL(FSSKERN_NAMESPACE, CPU, m) { m.impl("max_cosine_bf16_search", &max_cosine_bf16_search_cpu); }

TORCH_LIBRARY_FRAGMENT(FSSKERN_NAMESPACE, m) {
  m.def("_bf16_search_counts() -> int[]", [] {
    return std::vector<int64_t>{counted_rows.exchange(0), multi_rows.exchange(0), rescorings.exchange(0)};
  });
}

}  // namespace fsskern
