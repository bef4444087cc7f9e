// hamming_kmeans: schema, input checks, and the orchestration both backends share (math:
// hamming_kmeans.h; kernels: cpu/, cuda/).
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS  // per-operator ATen headers only (setup.py)
#include "ops/hamming_kmeans.h"

#include <ATen/TensorOperators.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full_like.h>
#include <ATen/ops/ones_like.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>

namespace fsskern {
namespace {

void check_inputs(const at::Tensor& codes, const at::Tensor& valid, const at::Tensor& init, int64_t k,
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

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> hamming_kmeans_impl(const KmeansKernels& kernels,
                                                                   const at::Tensor& codes, const at::Tensor& valid,
                                                                   const at::Tensor& init, int64_t k, int64_t iters) {
  check_inputs(codes, valid, init, k, iters);
  const auto cc = codes.contiguous();
  const auto vc = valid.contiguous();
  const int64_t B = cc.size(0), N = cc.size(1);
  if (N == 0) return {at::empty({B, 0}, cc.options()), at::zeros({B, k}, cc.options()), at::zeros({B, k}, cc.options())};
  const auto active = (vc.sum(1) > k).to(at::kByte);

  // Rows with n <= k valid points: point r (in index order) is cluster r and its own centroid.
  const auto rank = vc.to(at::kLong).cumsum(1) - 1;
  at::Tensor assign = at::where(vc, rank, at::full_like(rank, -1));
  at::Tensor own = at::zeros({B, k + 1}, cc.options());  // column k collects what is dropped
  own.scatter_(1, at::where(vc, rank.clamp_max(k), at::full_like(rank, k)), cc);
  // init is only checked (and read) for active rows; an inactive row's init may name anything, so it is clamped
  // before the gather (an out-of-range index is an error on the CPU and a device-side assert on CUDA)
  at::Tensor centroids = at::where(active.unsqueeze(1).to(at::kBool), cc.gather(1, init.clamp(0, N - 1).contiguous()),
                                   own.narrow(1, 0, k))
                             .contiguous();

  for (int64_t it = 0; it < iters; ++it) {
    kernels.assign(cc, vc, centroids, active, assign);
    kernels.update(cc, assign, active, centroids);
  }
  kernels.assign(cc, vc, centroids, active, assign);
  at::Tensor counts = at::zeros({B, k + 1}, cc.options());
  counts.scatter_add_(1, at::where(assign < 0, at::full_like(assign, k), assign), at::ones_like(assign));
  return {assign, centroids, counts.narrow(1, 0, k).contiguous()};
}

TORCH_LIBRARY_FRAGMENT(FSSKERN_NAMESPACE, m) {
  m.def("hamming_kmeans(Tensor codes, Tensor valid, Tensor init, int k, int iters) -> (Tensor, Tensor, Tensor)");
}

}  // namespace fsskern
