// CUDA launcher and registration of lsh_hash (kernel in the .cuh beside this).
#include <ATen/ATen.h>

#include "common/launch.cuh"
#include "common/library.h"
#include "ops/cuda/lsh_hash_kernel.cuh"

namespace fsskern {
namespace {

at::Tensor lsh_hash_cuda(const at::Tensor& x, const at::Tensor& planes) {
  check_lsh_hash_inputs(x, planes);
  const DeviceGuard guard(x.device());
  const auto xc = x.contiguous();
  const auto pc = planes.contiguous();
  const int64_t N = xc.size(0), E = xc.size(1), bits = pc.size(0);
  at::Tensor codes = at::empty({N}, xc.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(xc.scalar_type(), "fsskern_lsh_hash_cuda", [&] {
    launch(lsh_hash_kernel<scalar_t>, {dim3(static_cast<unsigned>(std::min<int64_t>(ceil_div(N, 128), 65535))), dim3(128)},
           xc.const_data_ptr<scalar_t>(), pc.const_data_ptr<scalar_t>(), codes.mutable_data_ptr<int64_t>(), N, E,
           bits);
  });
  return codes;
}

}  // namespace

TORCH_LIBRARY_IMPL(FSSKERN_NAMESPACE, FSSKERN_CUDA_KEY, m) { m.impl("lsh_hash", &lsh_hash_cuda); }

}  // namespace fsskern
