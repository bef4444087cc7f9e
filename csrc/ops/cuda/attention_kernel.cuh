#pragma once
// CUDA kernels of the attention core (attention.h). Launchers: attention_kernel.cu.
//
// One warp per query row (forward, backward for queries) or per packed key (backward for keys
// and values): lanes split the channels, a butterfly sum gives every lane the dot products, and
// each lane keeps its own channels of the row's accumulators in shared memory, so lanes never
// read each other's entries and no barrier is needed. Keys are visited in packed order with an
// online softmax; the constant key is packed position key_count (when present).
// Gathers only, no atomics: the results do not depend on the schedule.
// Two types: In, that of q, k, v, out and grad_out (float16/bfloat16 are read and written as
// they are), and T, the opmath everything is computed and accumulated in (shared memory, lse,
// delta and the gradients, which the orchestration rounds to In).
#include <cstdint>

#include "common/cuda_reduce.cuh"
#include "common/shared_memory.cuh"
#include "ops/attention.h"

namespace fsskern {

// Up to 4 warps per block; fewer when their rows would not fit in the 48 KiB of dynamic shared
// memory every GPU grants without opting in (the launcher decides, blockDim.x says).
constexpr int kAttentionWarps = 4;
constexpr size_t kAttentionSharedBytes = 48 * 1024;

template <typename T, typename In>
struct AttentionParams {
  const In* q;           // (B, H, N, D)
  const In* k;           // (B, H, W, D) packed
  const In* v;           // (B, H, W, Dv) packed
  const int64_t* key_index;  // (B, P)
  const int64_t* key_count;
  const T* const_logit;  // (B,)
  const T* const_value;  // (B, Dv)
  int64_t H, N, P, W, D, Dv;
  T scale;
  uint32_t drop_threshold;
  T keep_scale;
  uint64_t seed;
};

// Dot product of two length-n rows, lanes striding the channels; every lane gets the result.
template <typename T, typename RowA, typename RowB>
__device__ __forceinline__ T warp_dot(RowA a, RowB b, int64_t n) {
  T partial = T(0);
  for (int64_t d = threadIdx.x & 31; d < n; d += 32) partial += static_cast<T>(a[d]) * static_cast<T>(b[d]);
  return warp_all_sum(partial);
}

// The scaled logit of (row i, packed key j) and whether dropout keeps that weight (j <
// key_count); for the constant key (j == key_count) the logit is const_logit and it is kept.
template <typename T, typename In, typename Row>
__device__ __forceinline__ T key_logit(const AttentionParams<T, In>& p, Row q_row, int64_t bh, int64_t b, int64_t j,
                                       int64_t count) {
  if (j == count) return p.const_logit[b];
  return warp_dot<T>(q_row, p.k + (bh * p.W + j) * p.D, p.D) * p.scale;
}

// Element e of the value of packed key j (the constant key's is stored in T, the others in In).
template <typename T, typename In>
__device__ __forceinline__ T value_at(const AttentionParams<T, In>& p, int64_t bh, int64_t b, int64_t j, int64_t count,
                                      int64_t e) {
  return j == count ? p.const_value[b * p.Dv + e] : static_cast<T>(p.v[(bh * p.W + j) * p.Dv + e]);
}

template <typename T, typename In>
__device__ __forceinline__ T keep_factor(const AttentionParams<T, In>& p, int64_t bh, int64_t b, int64_t i, int64_t j,
                                         int64_t count) {
  if (p.drop_threshold == 0 || j == count) return T(1);
  return dropout_factor(p.seed, dropout_element(bh, i, p.key_index[b * p.P + j], p.N, p.P), p.drop_threshold,
                        p.keep_scale);
}

// Number of keys a row visits: the packed keys plus the constant key when present.
template <typename T, typename In>
__device__ __forceinline__ int64_t keys_visited(const AttentionParams<T, In>& p, int64_t b) {
  return p.key_count[b] + (p.const_logit[b] > -INFINITY ? 1 : 0);
}

// Grid (ceil(N / warps), H, B); dynamic shared memory: per warp D + Dv values.
template <typename T, typename In>
__global__ void attention_forward_kernel(AttentionParams<T, In> p, In* __restrict__ out, T* __restrict__ lse) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t i = int64_t(blockIdx.x) * (blockDim.x >> 5) + warp, h = blockIdx.y, b = blockIdx.z;
  if (i >= p.N) return;  // whole warps leave together; there are no block barriers
  const int64_t bh = b * p.H + h, count = p.key_count[b], visited = keys_visited(p, b);
  FSSKERN_DYNAMIC_SHARED(T, smem);
  const auto q_row = smem + warp * (p.D + p.Dv);
  const auto acc = q_row + p.D;
  for (int64_t d = lane; d < p.D; d += 32) q_row[d] = static_cast<T>(p.q[(bh * p.N + i) * p.D + d]);
  for (int64_t e = lane; e < p.Dv; e += 32) acc[e] = T(0);
  T m = -INFINITY, l = T(0);
  for (int64_t j = 0; j < visited; ++j) {
    const T s = key_logit(p, q_row, bh, b, j, count);
    const T new_max = s > m ? s : m;
    const T alpha = rescale_factor(m, new_max);
    const T prob = softmax_exp(s - new_max);
    l = l * alpha + prob;
    m = new_max;
    const T weight = prob * keep_factor(p, bh, b, i, j, count);
    for (int64_t e = lane; e < p.Dv; e += 32) acc[e] = acc[e] * alpha + weight * value_at(p, bh, b, j, count, e);
  }
  const T inv = output_normaliser(l);
  for (int64_t e = lane; e < p.Dv; e += 32) out[(bh * p.N + i) * p.Dv + e] = static_cast<In>(acc[e] * inv);
  if (lane == 0) lse[bh * p.N + i] = row_logsumexp(m, l);
}

// Backward, one warp per query row: delta_i = dO_i . O_i (kept for the key kernel) and
// dQ_i = scale * sum_j dS_ij k_j with dS_ij = a_ij (keep_ij dO_i . v_j - delta_i).
// Dynamic shared memory: per warp 2 D values (the row, its gradient).
template <typename T, typename In>
__global__ void attention_backward_query_kernel(AttentionParams<T, In> p, const In* __restrict__ out,
                                                const T* __restrict__ lse, const In* __restrict__ grad_out,
                                                T* __restrict__ delta, In* __restrict__ grad_q) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t i = int64_t(blockIdx.x) * (blockDim.x >> 5) + warp, h = blockIdx.y, b = blockIdx.z;
  if (i >= p.N) return;
  const int64_t bh = b * p.H + h, row = bh * p.N + i, count = p.key_count[b];
  FSSKERN_DYNAMIC_SHARED(T, smem);
  const auto q_row = smem + warp * 2 * p.D;
  const auto dq = q_row + p.D;
  for (int64_t d = lane; d < p.D; d += 32) {
    q_row[d] = static_cast<T>(p.q[row * p.D + d]);
    dq[d] = T(0);
  }
  const In* d_out = grad_out + row * p.Dv;
  const T row_delta = warp_dot<T>(d_out, out + row * p.Dv, p.Dv);
  if (lane == 0) delta[row] = row_delta;
  for (int64_t j = 0; j < count; ++j) {  // the constant key's key vector is 0: no dQ term
    const T a = probability_from_lse(key_logit(p, q_row, bh, b, j, count), lse[row]);
    const T dp = warp_dot<T>(d_out, p.v + (bh * p.W + j) * p.Dv, p.Dv) * keep_factor(p, bh, b, i, j, count);
    const T ds = logit_grad(a, dp, row_delta) * p.scale;
    const In* key = p.k + (bh * p.W + j) * p.D;
    for (int64_t d = lane; d < p.D; d += 32) dq[d] = dq[d] + ds * static_cast<T>(key[d]);
  }
  for (int64_t d = lane; d < p.D; d += 32) grad_q[row * p.D + d] = static_cast<In>(dq[d]);
}

// Backward, one warp per packed key j (grid (ceil((W + 1) / warps), H, B)): sums over the
// query rows dV_j = sum_i keep_ij a_ij dO_i and dK_j = scale * sum_i dS_ij q_i. The constant
// key (j == key_count) writes its value's gradient to grad_const. Dynamic shared memory: per
// warp D + Dv + D values (the key, dV, dK accumulators).
template <typename T, typename In>
__global__ void attention_backward_key_kernel(AttentionParams<T, In> p, const T* __restrict__ lse,
                                              const In* __restrict__ grad_out, const T* __restrict__ delta,
                                              T* __restrict__ grad_k, T* __restrict__ grad_v,
                                              T* __restrict__ grad_const) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t j = int64_t(blockIdx.x) * (blockDim.x >> 5) + warp, h = blockIdx.y, b = blockIdx.z;
  const int64_t bh = b * p.H + h, count = p.key_count[b];
  if (j >= keys_visited(p, b)) return;
  const bool is_const = j == count;
  FSSKERN_DYNAMIC_SHARED(T, smem);
  const auto key = smem + warp * (2 * p.D + p.Dv);
  const auto dv = key + p.D;
  const auto dk = dv + p.Dv;
  for (int64_t d = lane; d < p.D; d += 32) {
    key[d] = is_const ? T(0) : static_cast<T>(p.k[(bh * p.W + j) * p.D + d]);
    dk[d] = T(0);
  }
  for (int64_t e = lane; e < p.Dv; e += 32) dv[e] = T(0);
  const In* value = p.v + (bh * p.W + j) * p.Dv;  // unused by the constant key
  for (int64_t i = 0; i < p.N; ++i) {
    const int64_t row = bh * p.N + i;
    const In* q_row = p.q + row * p.D;
    const In* d_out = grad_out + row * p.Dv;
    const T logit = is_const ? p.const_logit[b] : warp_dot<T>(key, q_row, p.D) * p.scale;
    const T a = probability_from_lse(logit, lse[row]);
    const T keep = keep_factor(p, bh, b, i, j, count);
    for (int64_t e = lane; e < p.Dv; e += 32) dv[e] = dv[e] + a * keep * static_cast<T>(d_out[e]);
    if (is_const) continue;
    const T ds = logit_grad(a, warp_dot<T>(d_out, value, p.Dv) * keep, delta[row]) * p.scale;
    for (int64_t d = lane; d < p.D; d += 32) dk[d] = dk[d] + ds * static_cast<T>(q_row[d]);
  }
  if (is_const) {
    for (int64_t e = lane; e < p.Dv; e += 32) grad_const[bh * p.Dv + e] = dv[e];
    return;
  }
  for (int64_t d = lane; d < p.D; d += 32) grad_k[(bh * p.W + j) * p.D + d] = dk[d];
  for (int64_t e = lane; e < p.Dv; e += 32) grad_v[(bh * p.W + j) * p.Dv + e] = dv[e];
}

}  // namespace fsskern
