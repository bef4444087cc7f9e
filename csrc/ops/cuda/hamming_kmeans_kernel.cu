// CUDA launcher and registration of hamming_kmeans (kernels in the .cuh beside this). The rows
// with no more valid points than clusters are set up with tensor ops; the others iterate
// assign -> count bits -> majority vote on the device, with no host synchronisation.
#include <ATen/ATen.h>

#include "common/launch.cuh"
#include "common/library.h"
#include "ops/cuda/hamming_kmeans_kernel.cuh"

namespace fsskern {
namespace {

constexpr int kThreads = 256;

std::tuple<at::Tensor, at::Tensor, at::Tensor> hamming_kmeans_cuda(const at::Tensor& codes, const at::Tensor& valid,
                                                                   const at::Tensor& init, int64_t k, int64_t iters) {
  check_hamming_kmeans_inputs(codes, valid, init, k, iters);
  const DeviceGuard guard(codes.device());
  const auto cc = codes.contiguous();
  const auto vc = valid.contiguous();
  const int64_t B = cc.size(0), N = cc.size(1);
  if (N == 0) return {at::empty({B, 0}, cc.options()), at::zeros({B, k}, cc.options()), at::zeros({B, k}, cc.options())};
  TORCH_CHECK(k * sizeof(int64_t) <= 48 * 1024, "hamming_kmeans: k <= 6144 on CUDA, got ", k);
  const auto n_valid = vc.sum(1);
  const auto active = (n_valid > k).to(at::kByte);  // (B,) rows that cluster

  // Rows with n <= k: point r (in index order) is cluster r.
  const auto rank = vc.to(at::kLong).cumsum(1) - 1;
  at::Tensor assign = at::where(vc, rank, at::full_like(rank, -1));
  at::Tensor raw_centroids = at::zeros({B, k + 1}, cc.options());
  raw_centroids.scatter_(1, at::where(vc, rank.clamp_max(k), at::full_like(rank, k)), cc);
  at::Tensor centroids = at::where(active.unsqueeze(1).to(at::kBool), cc.gather(1, init.contiguous()),
                                   raw_centroids.narrow(1, 0, k));

  at::Tensor ones = at::empty({B, k, 64}, cc.options().dtype(at::kInt));
  at::Tensor members = at::empty({B, k}, cc.options().dtype(at::kInt));
  const LaunchConfig assign_cfg{dim3(static_cast<unsigned>(ceil_div(N, kThreads)), static_cast<unsigned>(B)),
                                dim3(kThreads), static_cast<size_t>(k) * sizeof(int64_t)};
  const LaunchConfig points_cfg{dim3(static_cast<unsigned>(std::min<int64_t>(ceil_div(B * N, kThreads), 65535))),
                                dim3(kThreads)};
  const LaunchConfig clusters_cfg{dim3(static_cast<unsigned>(ceil_div(B * k, kThreads))), dim3(kThreads)};
  auto assign_step = [&] {
    launch(kmeans_assign_kernel, assign_cfg, cc.const_data_ptr<int64_t>(), vc.const_data_ptr<bool>(),
           centroids.const_data_ptr<int64_t>(), active.const_data_ptr<uint8_t>(), assign.mutable_data_ptr<int64_t>(),
           N, k);
  };
  for (int64_t it = 0; it < iters; ++it) {
    assign_step();
    ones.zero_();
    members.zero_();
    launch(kmeans_count_bits_kernel, points_cfg, cc.const_data_ptr<int64_t>(), assign.const_data_ptr<int64_t>(),
           active.const_data_ptr<uint8_t>(), ones.mutable_data_ptr<int32_t>(), members.mutable_data_ptr<int32_t>(), B,
           N, k);
    launch(kmeans_update_kernel, clusters_cfg, ones.const_data_ptr<int32_t>(), members.const_data_ptr<int32_t>(),
           active.const_data_ptr<uint8_t>(), centroids.mutable_data_ptr<int64_t>(), B, k);
  }
  assign_step();
  at::Tensor counts = at::zeros({B, k + 1}, cc.options());
  counts.scatter_add_(1, at::where(assign < 0, at::full_like(assign, k), assign), at::ones_like(assign));
  return {assign, centroids, counts.narrow(1, 0, k).contiguous()};
}

}  // namespace

TORCH_LIBRARY_IMPL(FSSKERN_NAMESPACE, FSSKERN_CUDA_KEY, m) { m.impl("hamming_kmeans", &hamming_kmeans_cuda); }

}  // namespace fsskern
