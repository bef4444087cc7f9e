// CPU kernels of hamming_kmeans (orchestration: ../hamming_kmeans.cpp).
//
// Assignment: blocks of valid points, each 64-bit code split into two 32-bit halves. 16 points
// at a time (one vector) visit every centroid with their best distance and index kept in
// registers: xor, a popcount (VPOPCNTD where the CPU has it, else bit-parallel), compare,
// select. Centroids are visited in increasing index and only a strictly smaller distance
// replaces the best, so the lowest index wins ties, as in nearest_centroid (hamming_kmeans.h),
// which the CUDA kernel uses. When no code has a bit in its upper half (UMTFSS hashes 32
// bits), the upper halves are skipped.
// Update: per point, its bits are added to its cluster's 64 counters in one vector loop.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS  // per-operator ATen headers only (setup.py)
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "common/cpu_dispatch.h"
#include "ops/hamming_kmeans.h"

namespace fsskern {
namespace {

constexpr int64_t kAssignBlock = 256;
constexpr int kLanes = 16;

// Bit-parallel popcount (Hacker's Delight 5-1, shifts and adds only): plain integer
// operations, so vector loops vectorise it on any instruction set (POPCNT has no AVX2 form).
// The variant with a final multiply is recognised by GCC as a popcount and turned back into
// the scalar instruction.
struct BitParallelPopcount {
  static int32_t count(uint32_t v) {
    v = v - ((v >> 1) & 0x55555555u);
    v = (v & 0x33333333u) + ((v >> 2) & 0x33333333u);
    v = (v + (v >> 4)) & 0x0F0F0F0Fu;
    v = v + (v >> 8);
    v = v + (v >> 16);
    return static_cast<int32_t>(v & 0x3Fu);
  }
};

// The builtin, which becomes VPOPCNTD in vector loops compiled for FSSKERN_TARGET_VPOPCNT.
struct InstructionPopcount {
  static int32_t count(uint32_t v) { return __builtin_popcount(v); }
};

bool any_upper_half(const int64_t* codes, int64_t N) {
  uint64_t upper = 0;
  for (int64_t n = 0; n < N; ++n) upper |= static_cast<uint64_t>(codes[n]) >> 32;
  return upper != 0;
}

// 16 points (one vector of 32-bit lanes) against every centroid, their best distance and
// index kept in registers; n is a multiple of 16 (the block is zero-padded).
template <bool kUpperHalf, typename Popcount>
__attribute__((always_inline)) inline void nearest_in_block_with(const uint32_t* lo, const uint32_t* hi,
                                                                 const uint32_t* centroid_lo,
                                                                 const uint32_t* centroid_hi, int64_t k,
                                                                 int32_t* arg, int64_t n) {
  typedef uint32_t Codes __attribute__((vector_size(kLanes * sizeof(uint32_t))));
  typedef int32_t Ints __attribute__((vector_size(kLanes * sizeof(int32_t))));
  for (int64_t i0 = 0; i0 < n; i0 += kLanes) {
    Codes x_lo, x_hi;
    Ints best, index;
    for (int l = 0; l < kLanes; ++l) {
      x_lo[l] = lo[i0 + l];
      x_hi[l] = hi[i0 + l];
      best[l] = 65;
      index[l] = 0;
    }
    for (int64_t c = 0; c < k; ++c) {
      const uint32_t clo = centroid_lo[c], chi = centroid_hi[c];
#pragma omp simd
      for (int l = 0; l < kLanes; ++l) {
        int32_t d = Popcount::count(x_lo[l] ^ clo);
        if constexpr (kUpperHalf) d += Popcount::count(x_hi[l] ^ chi);
        const bool closer = d < best[l];
        best[l] = closer ? d : best[l];
        index[l] = closer ? static_cast<int32_t>(c) : index[l];
      }
    }
    for (int l = 0; l < kLanes; ++l) arg[i0 + l] = index[l];
  }
}

template <bool kUpperHalf>
FSSKERN_CPU_CLONES void nearest_in_block(const uint32_t* lo, const uint32_t* hi, const uint32_t* centroid_lo,
                                         const uint32_t* centroid_hi, int64_t k, int32_t* arg, int64_t n) {
  nearest_in_block_with<kUpperHalf, BitParallelPopcount>(lo, hi, centroid_lo, centroid_hi, k, arg, n);
}

template <bool kUpperHalf>
FSSKERN_TARGET_VPOPCNT void nearest_in_block_vpopcnt(const uint32_t* lo, const uint32_t* hi,
                                                     const uint32_t* centroid_lo, const uint32_t* centroid_hi,
                                                     int64_t k, int32_t* arg, int64_t n) {
  nearest_in_block_with<kUpperHalf, InstructionPopcount>(lo, hi, centroid_lo, centroid_hi, k, arg, n);
}

// Only valid points are gathered into the blocks (UMTFSS clusters foreground and background
// tokens of one set of codes separately, so each call has many invalid points).
void assign_points(const int64_t* codes, const bool* valid, const int64_t* centroids, int64_t k, bool upper_half,
                   int64_t* assign, int64_t begin, int64_t end) {
  std::vector<uint32_t> centroid_lo(k), centroid_hi(k);
  for (int64_t c = 0; c < k; ++c) {
    centroid_lo[c] = static_cast<uint32_t>(static_cast<uint64_t>(centroids[c]));
    centroid_hi[c] = static_cast<uint32_t>(static_cast<uint64_t>(centroids[c]) >> 32);
  }
  const auto nearest = cpu_has_vpopcnt()
                            ? (upper_half ? nearest_in_block_vpopcnt<true> : nearest_in_block_vpopcnt<false>)
                            : (upper_half ? nearest_in_block<true> : nearest_in_block<false>);
  uint32_t lo[kAssignBlock], hi[kAssignBlock];
  int32_t arg[kAssignBlock];
  int64_t index[kAssignBlock];
  for (int64_t next = begin; next < end;) {
    int64_t n = 0;
    for (; next < end && n < kAssignBlock; ++next) {
      if (!valid[next]) {
        assign[next] = -1;
        continue;
      }
      index[n] = next;
      lo[n] = static_cast<uint32_t>(static_cast<uint64_t>(codes[next]));
      hi[n] = static_cast<uint32_t>(static_cast<uint64_t>(codes[next]) >> 32);
      ++n;
    }
    for (int64_t i = n; i % kLanes != 0; ++i) lo[i] = hi[i] = 0;  // padding lanes, results unused
    nearest(lo, hi, centroid_lo.data(), centroid_hi.data(), k, arg, at::divup(n, kLanes) * kLanes);
    for (int64_t i = 0; i < n; ++i) assign[index[i]] = arg[i];
  }
}

void assign_cpu(const at::Tensor& codes, const at::Tensor& valid, const at::Tensor& centroids,
                const at::Tensor& active, at::Tensor& assign) {
  const int64_t B = codes.size(0), N = codes.size(1), k = centroids.size(1);
  for (int64_t b = 0; b < B; ++b) {
    if (!active.const_data_ptr<uint8_t>()[b]) continue;
    const int64_t* row = codes.const_data_ptr<int64_t>() + b * N;
    // Centroids are majority votes of these codes (or these codes), so they have no upper bit
    // either when no code has one.
    const bool upper_half = any_upper_half(row, N);
    at::parallel_for(0, N, 2048, [&](int64_t begin, int64_t end) {
      assign_points(row, valid.const_data_ptr<bool>() + b * N, centroids.const_data_ptr<int64_t>() + b * k, k,
                    upper_half, assign.mutable_data_ptr<int64_t>() + b * N, begin, end);
    });
  }
}

// Set bits per (cluster, bit) of the assigned points n in [begin, end): ones is (k, 64),
// members (k). Only the lower 32 bits are counted when no code has an upper bit.
template <int kBits>
FSSKERN_CPU_CLONES void count_bits(const int64_t* codes, const int64_t* assign, int64_t begin, int64_t end,
                                   int32_t* ones, int32_t* members) {
  // The code in an unsigned word of kBits bits: 64-bit variable shifts do not vectorise for
  // 32-bit counters.
  using Word = std::conditional_t<kBits == 32, uint32_t, uint64_t>;
  for (int64_t n = begin; n < end; ++n) {
    const int64_t cluster = assign[n];
    if (cluster < 0) continue;
    members[cluster] += 1;
    const Word code = static_cast<Word>(static_cast<uint64_t>(codes[n]));
    int32_t* __restrict__ row = ones + cluster * 64;
#pragma omp simd
    for (int b = 0; b < kBits; ++b) row[b] += static_cast<int32_t>((code >> b) & 1u);
  }
}

// Counts in one slice of the points per thread, then the slices are added in order: integer
// sums, so the result does not depend on the thread count.
void update_cpu(const at::Tensor& codes, const at::Tensor& assign, const at::Tensor& active, at::Tensor& centroids) {
  const int64_t B = codes.size(0), N = codes.size(1), k = centroids.size(1);
  const int64_t slices = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), N / 4096));
  std::vector<int32_t> ones(slices * k * 64), members(slices * k);
  for (int64_t b = 0; b < B; ++b) {
    if (!active.const_data_ptr<uint8_t>()[b]) continue;
    const int64_t* x = codes.const_data_ptr<int64_t>() + b * N;
    const int64_t* a = assign.const_data_ptr<int64_t>() + b * N;
    const bool upper_half = any_upper_half(x, N);
    std::fill(ones.begin(), ones.end(), 0);
    std::fill(members.begin(), members.end(), 0);
    at::parallel_for(0, slices, 1, [&](int64_t first, int64_t last) {
      for (int64_t s = first; s < last; ++s) {
        const int64_t begin = N * s / slices, end = N * (s + 1) / slices;
        (upper_half ? count_bits<64> : count_bits<32>)(x, a, begin, end, ones.data() + s * k * 64,
                                                       members.data() + s * k);
      }
    });
    for (int64_t s = 1; s < slices; ++s) {
      for (int64_t i = 0; i < k * 64; ++i) ones[i] += ones[s * k * 64 + i];
      for (int64_t c = 0; c < k; ++c) members[c] += members[s * k + c];
    }
    int64_t* cent = centroids.mutable_data_ptr<int64_t>() + b * k;
    for (int64_t c = 0; c < k; ++c) cent[c] = majority_code(cent[c], ones.data() + c * 64, members[c]);
  }
}

constexpr KmeansKernels kCpuKernels{&assign_cpu, &update_cpu};

}  // namespace

TORCH_LIBRARY_IMPL(FSSKERN_NAMESPACE, CPU, m) { register_hamming_kmeans<kCpuKernels>(m); }

}  // namespace fsskern
