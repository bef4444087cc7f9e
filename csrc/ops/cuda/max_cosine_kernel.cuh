#pragma once
// CUDA kernels of max_cosine (the fused PFENet/BAM prior). Launchers: max_cosine_kernel.cu.
// In: the inputs' dtype (float16/bfloat16 read as they are); T: opmath, that of the shared
// tiles, norms, values and gradient buffers.
#include <cstdint>

#include "common/cuda_reduce.cuh"
#include "common/shared_memory.cuh"
#include "ops/max_cosine.h"

namespace fsskern {

// |w_j s_j| for every support pixel, and whether a masked-out pixel holds a non-finite value.
// One thread per (b, k, j); the channel loop strides by Ns, so neighbouring threads read
// neighbouring addresses.
template <typename T, typename In>
__global__ void support_norms_kernel(const In* __restrict__ support, const In* __restrict__ weights,
                                     T* __restrict__ norms, uint8_t* __restrict__ bad_background, int64_t BK,
                                     int64_t C, int64_t Ns) {
  const int64_t total = BK * Ns;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t bk = idx / Ns, j = idx % Ns;
    const T w = static_cast<T>(weights[idx]);
    const In* s = support + bk * C * Ns + j;
    T sum = T(0);
    bool finite = true;
    for (int64_t c = 0; c < C; ++c) {
      const T v = static_cast<T>(s[c * Ns]);
      sum += (w * v) * (w * v);
      finite = finite && (v - v == T(0));
    }
    norms[idx] = sqrt(sum);
    bad_background[idx] = (w == T(0) && !finite) ? 1 : 0;
  }
}

// Tile shape of the forward kernel: a block owns kTileQ query pixels of one (b, k) and streams
// the foreground support pixels through shared memory kTileS at a time, kTileC channels per
// step. 256 threads in a 16 x 16 grid, each computing a 4 x 4 register tile of dot products.
constexpr int kTileQ = 64;
constexpr int kTileS = 64;
constexpr int kTileC = 16;
constexpr int kMaxCosineThreads = 256;

struct MaxCosineParams {
  int64_t K, C, Nq, Ns;
  double eps;
};

// grid = (ceil(Nq / kTileQ), K, B), block = kMaxCosineThreads.
// fg_index (B, K, Ns): foreground pixel indices first, in increasing order; fg_count (B, K).
template <typename T, typename In>
__global__ void __launch_bounds__(kMaxCosineThreads)
    max_cosine_forward_kernel(const In* __restrict__ query, const In* __restrict__ support,
                              const In* __restrict__ weights, const T* __restrict__ query_norms,
                              const T* __restrict__ support_norms, const int64_t* __restrict__ fg_index,
                              const int64_t* __restrict__ fg_count, const uint8_t* __restrict__ poisoned,
                              T* __restrict__ values, int64_t* __restrict__ indices, MaxCosineParams p) {
  FSSKERN_SHARED_ARRAY2D(T, q_tile, kTileC, kTileQ);
  FSSKERN_SHARED_ARRAY2D(T, s_tile, kTileC, kTileS);
  FSSKERN_SHARED_ARRAY2D(T, red_v, 16, kTileQ);
  FSSKERN_SHARED_ARRAY2D(int64_t, red_j, 16, kTileQ);

  const int64_t b = blockIdx.z, k = blockIdx.y, bk = b * p.K + k;
  const int64_t q0 = int64_t(blockIdx.x) * kTileQ;
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;  // tx: query column, ty: support row
  const T eps = static_cast<T>(p.eps);
  const In* q_img = query + b * p.C * p.Nq;
  const In* s_img = support + bk * p.C * p.Ns;
  const int64_t* fg = fg_index + bk * p.Ns;
  const int64_t nfg = fg_count[bk];

  // Thread (tx, ty) owns query columns tx + 16u and support rows ty + 16v of each tile: strided
  // ownership keeps the shared-memory reads of a warp on distinct banks or broadcasts.
  T best[4];
  int64_t best_j[4];
  for (int u = 0; u < 4; ++u) {
    best[u] = -INFINITY;
    best_j[u] = kNoIndex;
  }

  for (int64_t s0 = 0; s0 < nfg; s0 += kTileS) {
    T acc[4][4] = {};
    for (int64_t c0 = 0; c0 < p.C; c0 += kTileC) {
      for (int e = tid; e < kTileC * kTileQ; e += kMaxCosineThreads) {
        const int c = e / kTileQ, i = e % kTileQ;
        const bool in = c0 + c < p.C && q0 + i < p.Nq;
        q_tile[c][i] = in ? static_cast<T>(q_img[(c0 + c) * p.Nq + q0 + i]) : T(0);
      }
      for (int e = tid; e < kTileC * kTileS; e += kMaxCosineThreads) {
        const int c = e / kTileS, r = e % kTileS;
        T v = T(0);
        if (c0 + c < p.C && s0 + r < nfg) {
          const int64_t j = fg[s0 + r];
          v = static_cast<T>(weights[bk * p.Ns + j]) * static_cast<T>(s_img[(c0 + c) * p.Ns + j]);
        }
        s_tile[c][r] = v;
      }
      __syncthreads();
      for (int c = 0; c < kTileC; ++c) {
        T qv[4], sv[4];
        for (int u = 0; u < 4; ++u) qv[u] = q_tile[c][tx + 16 * u];
        for (int v = 0; v < 4; ++v) sv[v] = s_tile[c][ty + 16 * v];
        for (int v = 0; v < 4; ++v)
          for (int u = 0; u < 4; ++u) acc[v][u] += sv[v] * qv[u];
      }
      __syncthreads();  // the tiles are overwritten by the next step
    }
    // Epilogue: fold this tile's cosines into the running max of the thread's four columns.
    for (int v = 0; v < 4; ++v) {
      const int64_t r = s0 + ty + 16 * v;
      if (r >= nfg) continue;
      const int64_t j = fg[r];
      const T ns = support_norms[bk * p.Ns + j];
      for (int u = 0; u < 4; ++u) {
        const int64_t i = q0 + tx + 16 * u;
        if (i >= p.Nq) continue;
        const T val = cosine_from_dot(acc[v][u], ns, query_norms[b * p.Nq + i], eps);
        if (max_cosine_better(val, j, best[u], best_j[u])) {
          best[u] = val;
          best_j[u] = j;
        }
      }
    }
  }

  // Merge the 16 partial maxima of each column (one per ty), starting from the background
  // candidate when a pixel is masked out. max_cosine_better makes the merge order irrelevant.
  for (int u = 0; u < 4; ++u) {
    red_v[ty][tx + 16 * u] = best[u];
    red_j[ty][tx + 16 * u] = best_j[u];
  }
  __syncthreads();
  if (tid < kTileQ && q0 + tid < p.Nq) {
    const int64_t i = q0 + tid;
    const bool has_bg = nfg < p.Ns;
    T v = has_bg ? background_cosine(query_norms[b * p.Nq + i], eps) : T(-INFINITY);
    int64_t j = has_bg ? kBackgroundIndex : kNoIndex;
    for (int t = 0; t < 16; ++t) {
      const T cand_v = red_v[t][tid];
      const int64_t cand_j = red_j[t][tid];
      if (max_cosine_better(cand_v, cand_j, v, j)) {
        v = cand_v;
        j = cand_j;
      }
    }
    values[bk * p.Nq + i] = poisoned[bk] != 0 ? T(NAN) : v;
    indices[bk * p.Nq + i] = j;
  }
}

// Backward: one block per (query pixel i, image b), looping over shots. The three dot products
// of the winning pair are block reductions; grad_query[b, :, i] belongs to this block alone, and
// grad_support columns are shared by every query pixel with the same argmax, hence atomicAdd.
constexpr int kBackwardThreads = 128;

template <typename T, typename In>
__global__ void __launch_bounds__(kBackwardThreads)
    max_cosine_backward_kernel(const T* __restrict__ grad, const In* __restrict__ query, const In* __restrict__ support,
                               const In* __restrict__ weights, const int64_t* __restrict__ indices,
                               T* __restrict__ grad_query, T* __restrict__ grad_support, MaxCosineParams p) {
  FSSKERN_SHARED_ARRAY(T, scratch, 32);
  const int64_t i = blockIdx.x, b = blockIdx.y;
  const T eps = static_cast<T>(p.eps);
  const In* q = query + b * p.C * p.Nq + i;  // channel c at q[c * Nq]
  T* gq = grad_query + b * p.C * p.Nq + i;
  for (int64_t k = 0; k < p.K; ++k) {
    const int64_t bk = b * p.K + k;
    const int64_t j = indices[bk * p.Nq + i];
    const T g = grad[bk * p.Nq + i];
    if (j < 0 || g == T(0)) continue;  // uniform over the block: no divergent barrier
    const T w = static_cast<T>(weights[bk * p.Ns + j]);
    const In* s = support + bk * p.C * p.Ns + j;  // channel c at s[c * Ns]
    T sq = T(0), ss = T(0), qq = T(0);
    for (int64_t c = threadIdx.x; c < p.C; c += blockDim.x) {
      const T sv = w * static_cast<T>(s[c * p.Ns]), qv = static_cast<T>(q[c * p.Nq]);
      sq += sv * qv;
      ss += sv * sv;
      qq += qv * qv;
    }
    sq = block_sum(sq, scratch);
    ss = block_sum(ss, scratch);
    qq = block_sum(qq, scratch);
    const CosineGrad<T> cg = cosine_grad<T>(g, sq, sqrt(ss), sqrt(qq), eps);
    T* gs = grad_support + bk * p.C * p.Ns + j;
    for (int64_t c = threadIdx.x; c < p.C; c += blockDim.x) {
      const T sv = w * static_cast<T>(s[c * p.Ns]), qv = static_cast<T>(q[c * p.Nq]);
      gq[c * p.Nq] += cg.a * sv - cg.bq * qv;
      atomicAdd(gs + c * p.Ns, w * (cg.a * qv - cg.bs * sv));
    }
  }
}

}  // namespace fsskern
