#pragma once
// bf16 x bf16 -> float32 matrix products on AVX512-BF16 (vdpbf16ps: two bf16 products, exact in
// float32, added to a float32 accumulator per lane), for the attention kernels' bf16 inputs.
//
// Why not torch.mm: on bf16 tensors it returns bf16, rounding every score before the softmax, and
// the only bf16 -> float32 GEMM torch exports (MKL's cblas_gemm_bf16bf16f32) runs no faster than
// the float32 GEMM on CPUs MKL does not tune for (AMD EPYC: 1.0x, where these run 2.2-2.6x).
//
// Operands are "pair-packed": element pairs along the reduction dimension k are stored as one
// 32-bit word (low half: k = 2p, high half: k = 2p + 1), one row of words per pair p:
//   packed[p * ld + c] = bits(x[2p][c]) | bits(x[2p + 1][c]) << 16,
// zero past the rows (an odd k gets a zero partner) and in the padding columns [cols, ld), ld a
// multiple of 16. Then C[m][n] = sum_p dot2(A[p][m], B[p][n]) runs on 16 columns per vector.
#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstddef>
#include <cstring>
#include <new>
#include <vector>

namespace fsskern::bf16 {

// Whether this build has the kernel and this CPU AVX512-BF16.
bool hardware();

// Whether this CPU has AMX-BF16, whose tile units (through oneDNN) do many times vdpbf16ps's work per cycle.
bool amx();

// Whether gemm runs on the AMX tile units here (oneDNN's brgemm ukernel, bf16_gemm.cpp).
bool amx_products();

// hardware(), unless FSSKERN_BF16_DOT is "0" in the environment (read on every call: the tests
// set it to run the widened float32 path on such CPUs too). The attention kernels ask once per op.
bool available();

// float32 bit patterns u (a scalar or a GCC vector of them) rounded to bf16, to nearest even, still
// as float32 bit patterns (the low halves zero): c10::BFloat16's rounding of finite values.
template <typename U>
inline U round_bits_to_bf16(U u) {
  return (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
}

// float32 -> bf16 bits, NaN to the quiet NaN 0x7FC0: c10::BFloat16's rounding, as a branch-free
// expression that `omp simd` loops vectorise.
inline uint16_t round_to_bf16(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return static_cast<uint16_t>((u & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC0u : round_bits_to_bf16(u) >> 16);
}

// Buffers of packed words start on a cache line (as rows of ld words do, ld a multiple of 16): an
// unaligned 64-byte load straddles two lines, and malloc aligns large blocks to 16 bytes only,
// which made the products' speed vary from process to process.
template <typename T>
struct CacheLineAllocator {
  using value_type = T;
  CacheLineAllocator() = default;
  template <typename U>
  CacheLineAllocator(const CacheLineAllocator<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64))); }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t(64)); }
  template <typename U>
  bool operator==(const CacheLineAllocator<U>&) const { return true; }
};
using Words = std::vector<uint32_t, CacheLineAllocator<uint32_t>>;

// A multiple of 16 >= n: the ld of a packed operand with n columns.
inline int64_t padded(int64_t n) { return (n + 15) / 16 * 16; }

// Pack the rows x cols matrix x(r, c) = x[r * row_stride + c * col_stride], pairing rows; out has
// (rows + 1) / 2 rows of ld words. Float32 sources are rounded to bf16 (to nearest even).
void pack_pairs(const c10::BFloat16* x, int64_t rows, int64_t cols, int64_t row_stride, int64_t col_stride,
                uint32_t* out, int64_t ld);
void pack_pairs(const float* x, int64_t rows, int64_t cols, int64_t row_stride, int64_t col_stride, uint32_t* out,
                int64_t ld);

// out[i] = x[i] rounded to bf16, i < count.
void round_to_bf16(const float* x, int64_t count, c10::BFloat16* out);

// The A operand of gemm: a(p, i) = data[p * pair_stride + i * stride], pair p of column i. Packed
// operands have (ld, 1); a row-major bf16 matrix whose rows hold the pairs is its own operand,
// (1, row stride / 2), with no copy.
struct Operand {
  const uint32_t* data;
  int64_t pair_stride, stride;
  Operand from(int64_t i0) const { return {data + i0 * stride, pair_stride, stride}; }
};
inline Operand packed(const Words& words, int64_t ld) { return {words.data(), ld, 1}; }

// x (rows x cols, as for pack_pairs) as an A operand paired along its columns, rows across: x
// itself where each pair is an aligned word in memory (col_stride 1, cols and row_stride even),
// else pack_pairs of its transpose into scratch.
Operand column_pairs(const c10::BFloat16* x, int64_t rows, int64_t cols, int64_t row_stride, int64_t col_stride,
                     Words& scratch);

// The numerators of a softmax strip as a pair-packed A operand: for 16 rows of a transposed score
// tile (key j's scores at s + j * ld), out[p * ldo + i] = the bf16 pair of exp(s - max[i]) over keys
// 2p and 2p + 1 (the last key with zero when n is odd), rounded as pack_pairs rounds, and sum[i] =
// their float32 sum in key order, NaN where a score minus the max is NaN. exp is accurate to about
// 3 ulp (softmax_exp, attention.h: 2), ample for bf16 probabilities, and 0 below -87 as there.
// Requires hardware().
void exp_pairs(const float* s, int64_t n, int64_t ld, const float* max, float* sum, uint32_t* out, int64_t ldo);

// The softmax step of a block of rows (a multiple of 16) whose scores lie row-major (row r's n keys at s + r * lds,
// unscaled; scaled in place), for the AMX row-major forward: each row's running max m[r] grows to its max over
// scale * s (NaN scores do not raise it), new_max[r] receives it, and the bf16 numerators exp(scale * s - new_max)
// go to p (row r at p + r * ldp, keys along the row, zero from n to `width`, a multiple of 32), rounded as
// pack_pairs rounds; sum[r] is their float32 sum, NaN where a score minus the max is NaN. m is not updated.
// Requires hardware().
void exp_rows(float* s, int64_t rows, int64_t n, int64_t width, int64_t lds, float scale, const float* m,
              float* new_max, float* sum, c10::BFloat16* p, int64_t ldp);

// The backward's elementwise step on a block of rows (rows even) of row-major scores s and probability gradients
// dp (unscaled, `width` apart, a multiple of 32; n of them keys): a = exp(scale * s - lse[r]) (0 where lse[r] is
// -inf, NaN where the logit minus lse is NaN) and ds = a * (dp - delta[r]), rounded to bf16 as pack_pairs rounds,
// zero past n: ds row-major into ds_rows (ld width), and both a and ds paired along the rows into a_pairs and
// ds_pairs (pair p of column j at p * width + j). Requires hardware().
void softmax_grad_rows(const float* s, const float* dp, int64_t rows, int64_t n, int64_t width, float scale,
                       const float* lse, const float* delta, c10::BFloat16* ds_rows, uint32_t* a_pairs,
                       uint32_t* ds_pairs);

// The depth the AMX products take in one step: the k of amx_rows_gemm is a multiple of it.
constexpr int64_t kAmxDepth = 32;

// C (m x n, row stride ldc) = A B, or C += A B when accumulate, on the AMX tile units (oneDNN's brgemm ukernel):
// A row-major bf16 (m x k, row stride lda elements), whose rows hold the pairs as they lie; B pair-packed (k / 2
// rows of ldb words); k a multiple of kAmxDepth. oneDNN compiles and keeps a kernel per shape and leading
// dimensions, so callers keep those to a few. Requires amx_products(); amx_release() when a thread is done.
void amx_rows_gemm(const c10::BFloat16* a, int64_t lda, const uint32_t* b, int64_t ldb, int64_t m, int64_t n,
                   int64_t k, float* c, int64_t ldc, bool accumulate);
void amx_release();

// The A operand of amx_rows_gemm for x (rows x cols, as for pack_pairs), `rows_out` >= rows rows of `depth` >= cols
// elements (zero past x's): x itself where its rows lie so (col_stride 1, cols == depth, rows == rows_out), else
// a copy in `rows_scratch` (channels-first x: paired along its channels in `pairs_scratch`, then the words
// transposed). Returns the rows and their stride in elements.
struct Rows {
  const c10::BFloat16* data;
  int64_t ld;
};
Rows rows_operand(const c10::BFloat16* x, int64_t rows, int64_t cols, int64_t row_stride, int64_t col_stride,
                  int64_t rows_out, int64_t depth, Words& pairs_scratch, Words& rows_scratch);

// Rows of C per register block: m a multiple of it runs no partial block.
constexpr int kBlockRows = 6;

// C (m x n, row stride ldc) = alpha * A^T B (+ C when accumulate) over `pairs` pairs: A an operand
// with m columns, B pair-packed with n columns (ld ldb). Requires hardware(). Single-threaded; the
// sum over p runs in one order for a given shape (on AMX, oneDNN's), so the result does not depend
// on the thread count.
void gemm(Operand a, const uint32_t* b, int64_t ldb, int64_t pairs, int64_t m, int64_t n, float alpha, float* c,
          int64_t ldc, bool accumulate);

}  // namespace fsskern::bf16
