// CUDA launchers of hamming_kmeans (kernels in the .cuh beside this; orchestration:
// ../hamming_kmeans.cpp). The iterations run on the device with no host synchronisation.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS  // per-operator ATen headers only (setup.py)
#include <ATen/ops/zeros.h>

#include "common/launch.cuh"
#include "ops/cuda/hamming_kmeans_kernel.cuh"

namespace fsskern {
namespace {

constexpr int kThreads = 256;

void assign_cuda(const at::Tensor& codes, const at::Tensor& valid, const at::Tensor& centroids,
                 const at::Tensor& active, at::Tensor& assign) {
  const DeviceGuard guard(codes.device());
  const int64_t B = codes.size(0), N = codes.size(1), k = centroids.size(1);
  TORCH_CHECK(k * sizeof(int64_t) <= 48 * 1024, "hamming_kmeans: k <= 6144 on CUDA, got ", k);
  launch(kmeans_assign_kernel,
         {grid_dims(ceil_div(N, kThreads), B), dim3(kThreads),
          static_cast<size_t>(k) * sizeof(int64_t)},
         codes.const_data_ptr<int64_t>(), valid.const_data_ptr<bool>(), centroids.const_data_ptr<int64_t>(),
         active.const_data_ptr<uint8_t>(), assign.mutable_data_ptr<int64_t>(), N, k);
}

void update_cuda(const at::Tensor& codes, const at::Tensor& assign, const at::Tensor& active,
                 at::Tensor& centroids) {
  const DeviceGuard guard(codes.device());
  const int64_t B = codes.size(0), N = codes.size(1), k = centroids.size(1);
  at::Tensor ones = at::zeros({B, k, 64}, codes.options().dtype(at::kInt));
  at::Tensor members = at::zeros({B, k}, codes.options().dtype(at::kInt));
  launch(kmeans_count_bits_kernel,
         {grid_dims(std::min<int64_t>(ceil_div(B * N, kThreads), 65535)), dim3(kThreads)},
         codes.const_data_ptr<int64_t>(), assign.const_data_ptr<int64_t>(), active.const_data_ptr<uint8_t>(),
         ones.mutable_data_ptr<int32_t>(), members.mutable_data_ptr<int32_t>(), B, N, k);
  launch(kmeans_update_kernel, {grid_dims(ceil_div(B * k, kThreads)), dim3(kThreads)},
         ones.const_data_ptr<int32_t>(), members.const_data_ptr<int32_t>(), active.const_data_ptr<uint8_t>(),
         centroids.mutable_data_ptr<int64_t>(), B, k);
}

constexpr KmeansKernels kCudaKernels{&assign_cuda, &update_cuda};

}  // namespace

TORCH_LIBRARY_IMPL(FSSKERN_NAMESPACE, FSSKERN_CUDA_KEY, m) { register_hamming_kmeans<kCudaKernels>(m); }

}  // namespace fsskern
