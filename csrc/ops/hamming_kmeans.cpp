// hamming_kmeans: schema and input checks (math: hamming_kmeans.h; kernels: cpu/, cuda/).
#include "ops/hamming_kmeans.h"

#include "common/library.h"

namespace fsskern {

void check_hamming_kmeans_inputs(const at::Tensor& codes, const at::Tensor& valid, const at::Tensor& init, int64_t k,
                                 int64_t iters) {
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == at::kLong,
              "hamming_kmeans: codes must be an int64 (B, N) tensor, got ", codes.scalar_type(), " of shape ",
              codes.sizes());
  TORCH_CHECK(valid.scalar_type() == at::kBool && valid.sizes() == codes.sizes(),
              "hamming_kmeans: valid must be a bool tensor of the shape of codes ", codes.sizes(), ", got ",
              valid.scalar_type(), " of shape ", valid.sizes());
  TORCH_CHECK(k >= 1, "hamming_kmeans: k must be >= 1, got ", k);
  TORCH_CHECK(iters >= 0, "hamming_kmeans: iters must be >= 0, got ", iters);
  TORCH_CHECK(init.dim() == 2 && init.scalar_type() == at::kLong && init.size(0) == codes.size(0) &&
                  init.size(1) == k,
              "hamming_kmeans: init must be int64 (B, k) = (", codes.size(0), ", ", k, "), got ", init.scalar_type(),
              " of shape ", init.sizes());
  TORCH_CHECK(valid.device() == codes.device() && init.device() == codes.device(),
              "hamming_kmeans: codes, valid and init must be on one device");
  // init must name k distinct valid points wherever it is used (more than k valid points);
  // checked with tensor ops so it holds for every device (one host sync).
  const int64_t N = codes.size(1);
  if (init.numel() == 0 || N == 0) return;  // no row has more than k valid points
  const auto used = valid.sum(1) > k;  // (B,)
  const auto in_range = (init >= 0).logical_and(init < N).all(1);
  TORCH_CHECK(in_range.logical_or(used.logical_not()).all().item<bool>(),
              "hamming_kmeans: init indices must lie in [0, ", N, ")");
  const auto picked_valid = valid.gather(1, init.clamp(0, std::max<int64_t>(N - 1, 0))).all(1);
  const auto sorted = std::get<0>(init.sort(1));
  const auto distinct = k > 1 ? (sorted.narrow(1, 1, k - 1) != sorted.narrow(1, 0, k - 1)).all(1)
                              : at::ones_like(used);
  TORCH_CHECK(picked_valid.logical_and(distinct).logical_or(used.logical_not()).all().item<bool>(),
              "hamming_kmeans: init must name k distinct valid points in every batch item with more than k valid "
              "points");
}

TORCH_LIBRARY_FRAGMENT(FSSKERN_NAMESPACE, m) {
  m.def("hamming_kmeans(Tensor codes, Tensor valid, Tensor init, int k, int iters) -> (Tensor, Tensor, Tensor)");
}

}  // namespace fsskern
