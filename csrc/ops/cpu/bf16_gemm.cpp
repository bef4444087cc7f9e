// bf16_gemm.h: pair packing and the AVX512-BF16 GEMM.
//
// The GEMM is one register-blocked micro-kernel (llm.c's matmul_forward, in vdpbf16ps): a block of
// kRows rows of C times up to 4 vectors (64 columns) lives in 24 of the 32 zmm registers; per pair
// p it loads the block's B words once and broadcasts one A word per row. Blocks of 64 columns go
// outermost, so their B panel stays in L1/L2 while A streams through. At the attention kernels'
// shapes this runs at 2.2-2.6x the float32 MKL GEMM on one Zen 4 core, level with oneDNN's bf16
// GEMM (which rounds its output to bf16).
//
// On AMX-BF16 CPUs the products go to oneDNN's brgemm ukernel instead (ATen's cpublas::brgemm,
// bf16 in, float32 out, as PyTorch's CPU flash attention calls it), which runs them on the tile
// units: on one core of an Intel Xeon with AMX, 850 GFLOP/s at 3600 x 256 x 1080 and 370 at
// 3600 x 32 x 70 (one call each), against 70 for vdpbf16ps there (whose Intel cores issue it at half
// the rate of Zen 4's) and 100 for the float32 GEMM. Its B operand is our pair-packed layout (oneDNN's
// "VNNI" bf16 layout, ld in words); its A must hold the pairs along its rows, so a packed A (pairs
// down its columns) is transposed, 16 x 16 words in registers. Both are copied into blocks of a few
// fixed shapes (amx_gemm says why). The attention kernels' row-major paths call brgemm on their own operands
// through amx_rows_gemm, with the few shapes they choose.
#include "ops/cpu/bf16_gemm.h"

#include <ATen/native/CPUBlas.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "common/library.h"
#include "common/transpose_tile.h"
#include "ops/attention.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define FSSKERN_HAS_BF16_KERNEL 1
#define FSSKERN_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
#else
#define FSSKERN_HAS_BF16_KERNEL 0
#define FSSKERN_BF16_TARGET
#endif

namespace fsskern::bf16 {
namespace {

uint32_t bits(c10::BFloat16 x) { return x.x; }
uint32_t bits(float x) { return round_to_bf16(x); }

// Only the bf16 path calls these: they may use AVX-512 throughout.

// dst[j * dst_stride + i] = src[i * src_stride + j] (i < rows, j < cols): 16 x 16 words at a time,
// transposed in registers.
FSSKERN_BF16_TARGET void transpose_words(const uint32_t* src, int64_t src_stride, int64_t rows, int64_t cols,
                                         uint32_t* dst, int64_t dst_stride) {
  using Row = TileRow<int32_t>::type;
  int64_t i0 = 0;
  for (; i0 + kTile <= rows; i0 += kTile) {
    int64_t j0 = 0;
    for (; j0 + kTile <= cols; j0 += kTile) {
      Row tile[kTile];
      for (int k = 0; k < kTile; ++k) std::memcpy(&tile[k], src + (i0 + k) * src_stride + j0, sizeof(Row));
      transpose_tile<int32_t>(tile);
      for (int k = 0; k < kTile; ++k) std::memcpy(dst + (j0 + k) * dst_stride + i0, &tile[k], sizeof(Row));
    }
    for (int64_t i = i0; i < i0 + kTile; ++i)
      for (int64_t j = j0; j < cols; ++j) dst[j * dst_stride + i] = src[i * src_stride + j];
  }
  for (int64_t i = i0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) dst[j * dst_stride + i] = src[i * src_stride + j];
}

template <typename T>
FSSKERN_BF16_TARGET void pack_pairs_impl(const T* x, int64_t rows, int64_t cols, int64_t row_stride,
                                         int64_t col_stride, uint32_t* out, int64_t ld) {
  const int64_t pairs = (rows + 1) / 2;
  if (col_stride == 1) {  // interleave two contiguous rows
    for (int64_t p = 0; p < pairs; ++p) {
      const T* lo = x + 2 * p * row_stride;
      const T* hi = lo + row_stride;
      uint32_t* o = out + p * ld;
      if (2 * p + 1 < rows) {
#pragma omp simd
        for (int64_t c = 0; c < cols; ++c) o[c] = bits(lo[c]) | bits(hi[c]) << 16;
      } else {
#pragma omp simd
        for (int64_t c = 0; c < cols; ++c) o[c] = bits(lo[c]);
      }
      std::fill(o + cols, o + ld, 0u);
    }
    return;
  }
  // Pairs adjacent in memory (a row-major matrix paired along its rows' elements): a transpose,
  // of whole words where bf16 pairs are aligned words.
  int64_t transposed = 0;  // pairs done that way
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (row_stride == 1 && col_stride % 2 == 0 && reinterpret_cast<uintptr_t>(x) % 4 == 0) {
      transposed = rows / 2;
      transpose_words(reinterpret_cast<const uint32_t*>(x), col_stride / 2, cols, transposed, out, ld);
    }
  }
  for (int64_t p = 0; p < pairs; ++p) {
    uint32_t* o = out + p * ld;
    const T* lo = x + 2 * p * row_stride;
    for (int64_t c = p < transposed ? cols : 0; c < cols; ++c)
      o[c] = bits(lo[c * col_stride]) | (2 * p + 1 < rows ? bits(lo[c * col_stride + row_stride]) << 16 : 0u);
    std::fill(o + cols, o + ld, 0u);
  }
}

#if FSSKERN_HAS_BF16_KERNEL
constexpr int kRows = kBlockRows;

// C[r][16 v + l] (r < MR, v < NV) over all pairs; `cols` (<= 16 NV) columns are stored.
template <int MR, int NV>
FSSKERN_BF16_TARGET void micro_kernel(Operand a, const uint32_t* b, int64_t ldb, int64_t pairs, float alpha, float* c,
                                      int64_t ldc, int64_t cols, bool accumulate) {
  __m512 acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    __m512bh bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bv[v] = (__m512bh)_mm512_loadu_si512(b + p * ldb + 16 * v);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512bh av = (__m512bh)_mm512_set1_epi32(static_cast<int>(a.data[p * a.pair_stride + r * a.stride]));
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], av, bv[v]);
    }
  }
  const __m512 scale = _mm512_set1_ps(alpha);
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      const int64_t left = cols - 16 * v;
      const __mmask16 mask = left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
      float* out = c + r * ldc + 16 * v;
      __m512 value = _mm512_mul_ps(acc[r][v], scale);
      if (accumulate) value = _mm512_add_ps(value, _mm512_maskz_loadu_ps(mask, out));
      _mm512_mask_storeu_ps(out, mask, value);
    }
}

// exp(x) on 16 lanes (x <= 0 in a softmax): softmax_exp's range reduction (ExpReduction,
// attention.h), e^r = 1 + r + r^2 P(r) with P cubic, fitted for the least relative error on
// [-ln2/2, ln2/2] (1.05e-7), times 2^n by vscalefps: 12 instructions against about 30 for
// softmax_exp (a quintic, without fused multiply-adds). Lanes below kFloor and NaN lanes give 0.
FSSKERN_BF16_TARGET inline __m512 exp_lanes(__m512 x) {
  using R = ExpReduction;
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(R::kLog2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(R::kLn2High), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(R::kLn2Low), r);
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(8.312524027e-3f), r, _mm512_set1_ps(4.189011375e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.666711448e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.999923179e-1f));
  const __m512 y = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.0f));
  const __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(R::kFloor), _CMP_GE_OQ);
  return _mm512_maskz_scalef_ps(live, y, n);
}

// Probabilities are normal floats or 0 (e^-87 > FLT_MIN), so vcvtne2ps2bf16's rounding (to
// nearest even, denormals flushed) is round_to_bf16's bit for bit.
FSSKERN_BF16_TARGET void exp_pairs_impl(const float* s, int64_t n, int64_t ld, const float* max, float* sum,
                                        uint32_t* out, int64_t ldo) {
  // word 2i of a pair takes key 2p's row i (word i of cvtne2ps's result), word 2i + 1 key 2p + 1's
  alignas(64) static constexpr uint16_t kInterleave[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,
                                                           21, 6, 22, 7, 23, 8,  24, 9,  25, 10, 26,
                                                           11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i interleave = _mm512_load_si512(kInterleave);
  const __m512 m = _mm512_loadu_ps(max);
  __m512 total = _mm512_setzero_ps();
  __mmask16 nan = 0;
  for (int64_t j = 0; j < n; j += 2) {
    const __m512 x0 = _mm512_sub_ps(_mm512_loadu_ps(s + j * ld), m);
    const __m512 x1 = j + 1 < n ? _mm512_sub_ps(_mm512_loadu_ps(s + (j + 1) * ld), m) : _mm512_set1_ps(-INFINITY);
    nan |= _mm512_cmp_ps_mask(x0, x0, _CMP_UNORD_Q) | _mm512_cmp_ps_mask(x1, x1, _CMP_UNORD_Q);
    const __m512 a = exp_lanes(x0), b = exp_lanes(x1);
    total = _mm512_add_ps(_mm512_add_ps(total, a), b);
    const __m512i words = (__m512i)_mm512_cvtne2ps_pbh(b, a);
    _mm512_storeu_si512(out + j / 2 * ldo, _mm512_permutexvar_epi16(interleave, words));
  }
  _mm512_storeu_ps(sum, _mm512_mask_mov_ps(total, nan, _mm512_set1_ps(NAN)));
}

// Lane i of the result = the reduction (max or sum) of v[i]'s lanes, for 16 vectors at once: the transpose's
// four butterfly stages, each combining the two halves it exchanges, so 30 shuffles serve 16 rows where a
// reduction per row is a serial chain of 8 (which the row loop below stalled on).
template <bool Max>
FSSKERN_BF16_TARGET inline __m512 reduce_16(__m512* v) {
  alignas(64) static constexpr int32_t kLow[4][16] = {{0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23},
                                                       {0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27},
                                                       {0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29},
                                                       {0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30}};
#pragma GCC unroll 4
  for (int stage = 0, d = 8; d > 0; ++stage, d /= 2) {
    const __m512i low = _mm512_load_si512(kLow[stage]), high = _mm512_add_epi32(low, _mm512_set1_epi32(d));
#pragma GCC unroll 8
    for (int j = 0; j < d; ++j) {
      const __m512 a = _mm512_permutex2var_ps(v[j], low, v[j + d]), b = _mm512_permutex2var_ps(v[j], high, v[j + d]);
      v[j] = Max ? _mm512_max_ps(a, b) : _mm512_add_ps(a, b);
    }
  }
  return v[0];
}

FSSKERN_BF16_TARGET void exp_rows_impl(float* s, int64_t rows, int64_t n, int64_t width, int64_t lds, float scale,
                                       const float* m, float* new_max, float* sum, c10::BFloat16* p, int64_t ldp) {
  const __m512 scale_v = _mm512_set1_ps(scale);
  const int64_t whole = n / 16, vectors = (n + 15) / 16, pairs = (vectors + 1) / 2;
  const __mmask16 tail = static_cast<__mmask16>((1u << (n % 16)) - 1);
  for (int64_t r0 = 0; r0 < rows; r0 += 16) {
    __m512 part[16];
    // scale in place, the lanes past the keys to -inf (their numerators are then 0); each row's max
    for (int i = 0; i < 16; ++i) {
      float* row = s + (r0 + i) * lds;
      __m512 high = _mm512_set1_ps(m[r0 + i]);
      for (int64_t v = 0; v < whole; ++v) {
        const __m512 x = _mm512_mul_ps(_mm512_loadu_ps(row + 16 * v), scale_v);
        _mm512_storeu_ps(row + 16 * v, x);
        high = _mm512_max_ps(x, high);  // a NaN score keeps high
      }
      for (int64_t v = whole; v < 2 * pairs; ++v) {
        const __mmask16 live = v == whole ? tail : __mmask16(0);
        const __m512 x = _mm512_mask_mul_ps(_mm512_set1_ps(-INFINITY), live,
                                            _mm512_maskz_loadu_ps(live, row + 16 * v), scale_v);
        _mm512_storeu_ps(row + 16 * v, x);
        high = _mm512_max_ps(x, high);
      }
      part[i] = high;
    }
    _mm512_storeu_ps(new_max + r0, reduce_16<true>(part));
    __mmask16 nan = 0;
    for (int i = 0; i < 16; ++i) {
      const float* row = s + (r0 + i) * lds;
      const __m512 top = _mm512_set1_ps(new_max[r0 + i]);
      // x <= 0 or NaN, so the sum of the x is NaN exactly when one is (-inf - -inf included)
      __m512 total = _mm512_setzero_ps(), probe = _mm512_setzero_ps();
      uint16_t* out = reinterpret_cast<uint16_t*>(p + (r0 + i) * ldp);
      for (int64_t w = 0; w < pairs; ++w) {
        const __m512 x0 = _mm512_sub_ps(_mm512_loadu_ps(row + 32 * w), top);
        const __m512 x1 = _mm512_sub_ps(_mm512_loadu_ps(row + 32 * w + 16), top);
        probe = _mm512_add_ps(probe, _mm512_add_ps(x0, x1));
        const __m512 e0 = exp_lanes(x0), e1 = exp_lanes(x1);
        total = _mm512_add_ps(total, _mm512_add_ps(e0, e1));
        _mm512_storeu_si512(out + 32 * w, (__m512i)_mm512_cvtne2ps_pbh(e1, e0));  // keys 32w.. in order
      }
      for (int64_t w = pairs; w < width / 32; ++w) _mm512_storeu_si512(out + 32 * w, _mm512_setzero_si512());
      part[i] = total;
      nan |= static_cast<__mmask16>(_mm512_cmp_ps_mask(probe, probe, _CMP_UNORD_Q) != 0) << i;
    }
    _mm512_storeu_ps(sum + r0, _mm512_mask_mov_ps(reduce_16<false>(part), nan, _mm512_set1_ps(NAN)));
  }
}

// The lanes of vector v of a row of n keys that hold keys.
inline __mmask16 key_lanes(int64_t n, int64_t v) {
  const int64_t left = n - 16 * v;
  return left >= 16 ? __mmask16(0xFFFF) : left <= 0 ? __mmask16(0) : __mmask16((1u << left) - 1);
}

FSSKERN_BF16_TARGET void softmax_grad_rows_impl(const float* s, const float* dp, int64_t rows, int64_t n,
                                                int64_t width, float scale, const float* lse, const float* delta,
                                                c10::BFloat16* ds_rows, uint32_t* a_pairs, uint32_t* ds_pairs) {
  // word i of a pair of rows takes the first row's column i (word i of cvtne2ps's result) and the second's
  alignas(64) static constexpr uint16_t kInterleave[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,
                                                           21, 6, 22, 7, 23, 8,  24, 9,  25, 10, 26,
                                                           11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i interleave = _mm512_load_si512(kInterleave);
  const __m512 scale_v = _mm512_set1_ps(scale);
  for (int64_t r = 0; r < rows; r += 2) {
    __m512 row_lse[2], row_delta[2];
    bool live_row[2];
    for (int i = 0; i < 2; ++i) {
      row_lse[i] = _mm512_set1_ps(lse[r + i]);
      row_delta[i] = _mm512_set1_ps(delta[r + i]);
      live_row[i] = lse[r + i] != -INFINITY;
    }
    for (int64_t j = 0; j < width; j += 32) {
      __m512 a[2][2], ds[2][2];  // [row][half of the 32 columns]
      for (int i = 0; i < 2; ++i)
        for (int half = 0; half < 2; ++half) {
          const int64_t at = (r + i) * width + j + 16 * half;
          const __mmask16 live = live_row[i] ? key_lanes(n, (j + 16 * half) / 16) : __mmask16(0);
          const __m512 x = _mm512_sub_ps(_mm512_mul_ps(_mm512_loadu_ps(s + at), scale_v), row_lse[i]);
          const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
          a[i][half] = _mm512_maskz_mov_ps(live, _mm512_mask_mov_ps(exp_lanes(x), nan, x));
          ds[i][half] = _mm512_mul_ps(a[i][half], _mm512_sub_ps(_mm512_loadu_ps(dp + at), row_delta[i]));
        }
      for (int i = 0; i < 2; ++i)
        _mm512_storeu_si512(ds_rows + (r + i) * width + j, (__m512i)_mm512_cvtne2ps_pbh(ds[i][1], ds[i][0]));
      for (int half = 0; half < 2; ++half) {
        const int64_t at = r / 2 * width + j + 16 * half;
        _mm512_storeu_si512(a_pairs + at, _mm512_permutexvar_epi16(interleave, (__m512i)_mm512_cvtne2ps_pbh(
                                                                                   a[1][half], a[0][half])));
        _mm512_storeu_si512(ds_pairs + at, _mm512_permutexvar_epi16(interleave, (__m512i)_mm512_cvtne2ps_pbh(
                                                                                    ds[1][half], ds[0][half])));
      }
    }
  }
}

template <int MR>
void run_block(int nv, Operand a, const uint32_t* b, int64_t ldb, int64_t pairs, float alpha, float* c, int64_t ldc,
               int64_t cols, bool accumulate) {
  switch (nv) {
    case 1: return micro_kernel<MR, 1>(a, b, ldb, pairs, alpha, c, ldc, cols, accumulate);
    case 2: return micro_kernel<MR, 2>(a, b, ldb, pairs, alpha, c, ldc, cols, accumulate);
    case 3: return micro_kernel<MR, 3>(a, b, ldb, pairs, alpha, c, ldc, cols, accumulate);
    default: return micro_kernel<MR, 4>(a, b, ldb, pairs, alpha, c, ldc, cols, accumulate);
  }
}

// Taller blocks for narrow C (12 x 2 vectors) measured slower on Zen 4 than 6 x 2.
using BlockFn = void (*)(int, Operand, const uint32_t*, int64_t, int64_t, float, float*, int64_t, int64_t, bool);
constexpr BlockFn kBlocks[kRows + 1] = {nullptr,        &run_block<1>, &run_block<2>, &run_block<3>,
                                        &run_block<4>, &run_block<5>, &run_block<6>};

// gemm on vdpbf16ps.
void vdp_gemm(Operand a, const uint32_t* b, int64_t ldb, int64_t pairs, int64_t m, int64_t n, float alpha, float* c,
              int64_t ldc, bool accumulate) {
  for (int64_t n0 = 0; n0 < n; n0 += 64) {
    const int64_t cols = std::min<int64_t>(64, n - n0);
    const int nv = static_cast<int>((cols + 15) / 16);
    for (int64_t m0 = 0; m0 < m; m0 += kRows) {
      const int64_t rows = std::min<int64_t>(kRows, m - m0);
      kBlocks[rows](nv, a.from(m0), b + n0, ldb, pairs, alpha, c + m0 * ldc + n0, ldc, cols, accumulate);
    }
  }
}

// gemm on the AMX tile units (see the top of this file). oneDNN compiles a kernel for every shape and leading
// dimension it meets and keeps it, about 0.5 MB each, and the attention kernels' shapes follow the key count of
// each image: called as they come, 600 counts grew the process by 652 MB and compiling cost 2 ms a call. So every
// brgemm here has one shape but its depth: a kBlock x kBlock block of C (into a scratch block) over the pairs
// rounded down to a multiple of kBlockPairs, A's rows and B's columns copied into blocks with those leading
// dimensions; a call site then meets a few dozen shapes at most (600 counts: 14 MB). The pairs left over go to
// vdp_gemm (added to the blocks' sums), and so do rows and columns past the last whole block when they are
// fewer than kBlock / 2: a call costs about as much as vdp_gemm's 6 rows (or columns) by 32. More of them are
// the tail of one more block that ends at the last row (column) and overlaps the one before, storing only the
// rows (columns) no block stored: UMTFSS's ~63 valid prototypes are then 2 blocks, not one and 31 rows on vdp.
constexpr int64_t kBlock = 32, kBlockPairs = 16;

// The blocks along one dimension of C of size n: whole ones at 0, kBlock, ..., then one ending at `covered` when
// that is past them (the last block overlaps the one before); vdp_gemm takes the indices from `covered` on.
struct Blocks {
  int64_t covered;
  int64_t start(int64_t k) const { return std::min(k * kBlock, covered - kBlock); }
  int64_t count() const { return (covered + kBlock - 1) / kBlock; }
};
Blocks blocks_of(int64_t n) {
  const int64_t whole = n / kBlock * kBlock;
  return {whole > 0 && n - whole >= kBlock / 2 ? n : whole};
}

void amx_gemm(Operand a, const uint32_t* b, int64_t ldb, int64_t pairs, int64_t m, int64_t n, float alpha, float* c,
              int64_t ldc, bool accumulate) {
  const Blocks rows = blocks_of(m), cols = blocks_of(n);
  const int64_t m1 = rows.covered, n1 = cols.covered, p1 = pairs / kBlockPairs * kBlockPairs;
  if (m1 == 0 || n1 == 0 || p1 == 0) return vdp_gemm(a, b, ldb, pairs, m, n, alpha, c, ldc, accumulate);
  thread_local Words a_rows, b_panels;
  thread_local std::vector<float> block;
  // A: m1 rows of p1 words; B: per block of columns, a panel of p1 rows of kBlock words
  a_rows.resize(m1 * p1);
  if (a.pair_stride == 1) {
    for (int64_t i = 0; i < m1; ++i) std::memcpy(a_rows.data() + i * p1, a.data + i * a.stride, p1 * 4);
  } else {
    transpose_words(a.data, a.pair_stride, p1, m1, a_rows.data(), p1);  // pairs down the columns
  }
  b_panels.resize(cols.count() * kBlock * p1);
  for (int64_t jb = 0; jb < cols.count(); ++jb)
    for (int64_t p = 0; p < p1; ++p)
      std::memcpy(b_panels.data() + (jb * kBlock * p1 + p * kBlock), b + p * ldb + cols.start(jb), kBlock * 4);
  block.resize(kBlock * kBlock);
  for (int64_t ib = 0; ib < rows.count(); ++ib)
    for (int64_t jb = 0; jb < cols.count(); ++jb) {
      const int64_t i0 = rows.start(ib), j0 = cols.start(jb);
      at::native::cpublas::brgemm(kBlock, kBlock, 2 * p1, 2 * p1, kBlock, kBlock, false,
                                  reinterpret_cast<const at::BFloat16*>(a_rows.data() + i0 * p1),
                                  reinterpret_cast<const at::BFloat16*>(b_panels.data() + jb * kBlock * p1),
                                  block.data(), /*is_vnni=*/true);
      // an overlapping last block stores only what the block before did not
      for (int64_t i = ib * kBlock - i0; i < kBlock; ++i) {
        float* ci = c + (i0 + i) * ldc + j0;
        const float* bi = block.data() + i * kBlock;
        if (accumulate) {
#pragma omp simd
          for (int64_t j = jb * kBlock - j0; j < kBlock; ++j) ci[j] += alpha * bi[j];
        } else {
#pragma omp simd
          for (int64_t j = jb * kBlock - j0; j < kBlock; ++j) ci[j] = alpha * bi[j];
        }
      }
    }
  at::native::cpublas::brgemm_release(/*is_vnni=*/true);
  if (p1 < pairs)
    vdp_gemm({a.data + p1 * a.pair_stride, a.pair_stride, a.stride}, b + p1 * ldb, ldb, pairs - p1, m1, n1, alpha, c,
             ldc, true);
  if (n1 < n) vdp_gemm(a, b + n1, ldb, pairs, m1, n - n1, alpha, c + n1, ldc, accumulate);
  if (m1 < m) vdp_gemm(a.from(m1), b, ldb, pairs, m - m1, n, alpha, c + m1 * ldc, ldc, accumulate);
}
#endif

}  // namespace

void amx_rows_gemm(const c10::BFloat16* a, int64_t lda, const uint32_t* b, int64_t ldb, int64_t m, int64_t n,
                   int64_t k, float* c, int64_t ldc, bool accumulate) {
  TORCH_INTERNAL_ASSERT(amx_products() && k % kAmxDepth == 0);
  at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, accumulate, reinterpret_cast<const at::BFloat16*>(a),
                              reinterpret_cast<const at::BFloat16*>(b), c, /*is_vnni=*/true);
}

void amx_release() { at::native::cpublas::brgemm_release(/*is_vnni=*/true); }

Rows rows_operand(const c10::BFloat16* x, int64_t rows, int64_t cols, int64_t row_stride, int64_t col_stride,
                  int64_t rows_out, int64_t depth, Words& pairs_scratch, Words& rows_scratch) {
  if (col_stride == 1 && cols == depth && rows == rows_out) return {x, row_stride};
  const int64_t words = depth / 2;  // per row
  rows_scratch.assign(rows_out * words, 0u);
  auto* out = reinterpret_cast<c10::BFloat16*>(rows_scratch.data());
  if (col_stride == 1) {
    for (int64_t r = 0; r < rows; ++r) std::memcpy(out + r * depth, x + r * row_stride, cols * sizeof(*x));
  } else if (row_stride == 1) {  // channels-first: pairs of channels, rows across, then transposed
    const int64_t ld = padded(rows);
    pairs_scratch.assign(words * ld, 0u);
    pack_pairs(x, cols, rows, col_stride, 1, pairs_scratch.data(), ld);
    transpose_words(pairs_scratch.data(), ld, words, rows, rows_scratch.data(), words);
  } else {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) out[r * depth + c] = x[r * row_stride + c * col_stride];
  }
  return {out, depth};
}

bool hardware() {
#if FSSKERN_HAS_BF16_KERNEL
  static const bool has = __builtin_cpu_supports("avx512bf16");
  return has;
#else
  return false;
#endif
}

bool amx() {
#if FSSKERN_HAS_BF16_KERNEL
  static const bool has = __builtin_cpu_supports("amx-bf16");
  return has;
#else
  return false;
#endif
}

bool amx_products() {
#if FSSKERN_HAS_BF16_KERNEL
  static const bool has = amx() && at::native::cpublas::could_pack(at::kBFloat16);
  return has;
#else
  return false;
#endif
}

bool available() {
  const char* setting = std::getenv("FSSKERN_BF16_DOT");  // read per call: tests switch it
  return hardware() && !(setting && std::strcmp(setting, "0") == 0);
}

void pack_pairs(const c10::BFloat16* x, int64_t rows, int64_t cols, int64_t row_stride, int64_t col_stride,
                uint32_t* out, int64_t ld) {
  pack_pairs_impl(x, rows, cols, row_stride, col_stride, out, ld);
}

void pack_pairs(const float* x, int64_t rows, int64_t cols, int64_t row_stride, int64_t col_stride, uint32_t* out,
                int64_t ld) {
  pack_pairs_impl(x, rows, cols, row_stride, col_stride, out, ld);
}

FSSKERN_BF16_TARGET void round_to_bf16(const float* x, int64_t count, c10::BFloat16* out) {
  auto* o = reinterpret_cast<uint16_t*>(out);
#pragma omp simd
  for (int64_t i = 0; i < count; ++i) o[i] = round_to_bf16(x[i]);
}

void exp_pairs(const float* s, int64_t n, int64_t ld, const float* max, float* sum, uint32_t* out, int64_t ldo) {
#if FSSKERN_HAS_BF16_KERNEL
  TORCH_INTERNAL_ASSERT(hardware());
  exp_pairs_impl(s, n, ld, max, sum, out, ldo);
#else
  TORCH_INTERNAL_ASSERT(false, "fsskern: exp_pairs needs an x86-64 build");
#endif
}

void exp_rows(float* s, int64_t rows, int64_t n, int64_t width, int64_t lds, float scale, const float* m,
              float* new_max, float* sum, c10::BFloat16* p, int64_t ldp) {
#if FSSKERN_HAS_BF16_KERNEL
  TORCH_INTERNAL_ASSERT(hardware() && rows % 16 == 0 && width % 32 == 0 && width >= n);
  exp_rows_impl(s, rows, n, width, lds, scale, m, new_max, sum, p, ldp);
#else
  TORCH_INTERNAL_ASSERT(false, "fsskern: exp_rows needs an x86-64 build");
#endif
}

void softmax_grad_rows(const float* s, const float* dp, int64_t rows, int64_t n, int64_t width, float scale,
                       const float* lse, const float* delta, c10::BFloat16* ds_rows, uint32_t* a_pairs,
                       uint32_t* ds_pairs) {
#if FSSKERN_HAS_BF16_KERNEL
  TORCH_INTERNAL_ASSERT(hardware() && rows % 2 == 0 && width % 32 == 0 && width >= n);
  softmax_grad_rows_impl(s, dp, rows, n, width, scale, lse, delta, ds_rows, a_pairs, ds_pairs);
#else
  TORCH_INTERNAL_ASSERT(false, "fsskern: softmax_grad_rows needs an x86-64 build");
#endif
}

Operand column_pairs(const c10::BFloat16* x, int64_t rows, int64_t cols, int64_t row_stride, int64_t col_stride,
                     Words& scratch) {
  if (col_stride == 1 && cols % 2 == 0 && row_stride % 2 == 0 && reinterpret_cast<uintptr_t>(x) % 4 == 0)
    return {reinterpret_cast<const uint32_t*>(x), 1, row_stride / 2};
  const int64_t ld = padded(rows);
  scratch.resize((cols + 1) / 2 * ld);
  pack_pairs(x, cols, rows, col_stride, row_stride, scratch.data(), ld);
  return packed(scratch, ld);
}

void gemm(Operand a, const uint32_t* b, int64_t ldb, int64_t pairs, int64_t m, int64_t n, float alpha, float* c,
          int64_t ldc, bool accumulate) {
#if FSSKERN_HAS_BF16_KERNEL
  TORCH_INTERNAL_ASSERT(hardware());
  if (amx_products())
    amx_gemm(a, b, ldb, pairs, m, n, alpha, c, ldc, accumulate);
  else
    vdp_gemm(a, b, ldb, pairs, m, n, alpha, c, ldc, accumulate);
#else
  TORCH_INTERNAL_ASSERT(false, "fsskern: the bf16 GEMM needs an x86-64 build");
#endif
}

// What build_info()["bf16_attention"] reports: whether the CPU attention kernels run the bf16 products here,
// and whether on the AMX tile units.
TORCH_LIBRARY_FRAGMENT(FSSKERN_NAMESPACE, m) {
  m.def("_bf16_products() -> bool", [] { return available(); });
  m.def("_bf16_products_on_amx() -> bool", [] { return available() && amx_products(); });
}

}  // namespace fsskern::bf16
