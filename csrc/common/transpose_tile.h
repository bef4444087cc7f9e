#pragma once
// A 16 x 16 tile of T held as 16 vectors (GCC vector extensions, lowered to the calling clone's
// instructions: with AVX-512, one register per row and one vpermt2 per shuffle), transposed in
// registers. CPU only. Used where a kernel must turn rows of points into vectors of channels
// (lsh_hash on row-major points) or the other way round (cluster_means on channel-first maps).
#include <cstdint>
#include <type_traits>

namespace fsskern {

constexpr int kTile = 16;

template <typename T>
struct TileRow {
  typedef T type __attribute__((vector_size(kTile * sizeof(T))));
  typedef std::conditional_t<sizeof(T) == 4, int32_t, int64_t> index_t;
  typedef index_t index __attribute__((vector_size(kTile * sizeof(index_t))));
};

// v[i][j] <- v[j][i]. Four butterfly stages: stage d exchanges, between rows j and j + d, the
// d-wide blocks that sit on the wrong side of the diagonal; each is one two-vector shuffle.
template <typename T>
inline void transpose_tile(typename TileRow<T>::type* v) {
  using Index = typename TileRow<T>::index;
  static constexpr Index lo[4] = {{0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23},
                                  {0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27},
                                  {0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29},
                                  {0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30}};
#pragma GCC unroll 4
  for (int stage = 0, d = kTile / 2; d > 0; ++stage, d /= 2) {
    const Index hi = lo[stage] + d;
#pragma GCC unroll 16
    for (int j = 0; j < kTile; ++j) {
      if (j & d) continue;
      const auto a = v[j], b = v[j + d];
      v[j] = __builtin_shuffle(a, b, lo[stage]);
      v[j + d] = __builtin_shuffle(a, b, hi);
    }
  }
}

}  // namespace fsskern
