// CUDA launcher and registration of lsh_hash (kernel in the .cuh beside this).
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS  // per-operator ATen headers only (setup.py)
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>

#include "common/launch.cuh"
#include "common/library.h"
#include "ops/cuda/lsh_hash_kernel.cuh"

namespace fsskern {
namespace {

at::Tensor lsh_hash_cuda(const at::Tensor& x, const at::Tensor& planes) {
  check_lsh_hash_inputs(x, planes);
  const DeviceGuard guard(x.device());
  const auto x3 = lsh_hash_as_3d(x);
  const auto pc = planes.contiguous();
  const int64_t M = x3.size(0), N = x3.size(1), E = x3.size(2), bits = pc.size(0);
  at::Tensor codes = at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(at::kLong));
  if (codes.numel() == 0) return codes;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fsskern_lsh_hash_cuda", [&] {
    using T = at::opmath_type<scalar_t>;
    launch(lsh_hash_kernel<T, scalar_t>,
           {grid_dims(std::min<int64_t>(ceil_div(M * N, 128), 65535)), dim3(128)},
           x3.const_data_ptr<scalar_t>(), pc.const_data_ptr<T>(), codes.mutable_data_ptr<int64_t>(), M, N, E,
           x3.stride(0), x3.stride(1), x3.stride(2), bits);
  });
  return codes;
}

}  // namespace

TORCH_LIBRARY_IMPL(FSSKERN_NAMESPACE, FSSKERN_CUDA_KEY, m) { m.impl("lsh_hash", &lsh_hash_cuda); }

}  // namespace fsskern
