// CUDA launchers and registration of max_cosine (kernels in the .cuh beside this).
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS  // per-operator ATen headers only (setup.py)
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/TensorOperators.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linalg_vector_norm.h>
#include <ATen/ops/zeros.h>

#include "common/launch.cuh"
#include "common/library.h"
#include "ops/cuda/max_cosine_kernel.cuh"

namespace fsskern {
namespace {

std::tuple<at::Tensor, at::Tensor> max_cosine_cuda(const at::Tensor& query, const at::Tensor& support,
                                                   const at::Tensor& support_weights, double eps) {
  check_max_cosine_inputs(query, support, support_weights, eps);
  const DeviceGuard guard(query.device());
  const auto q = query.contiguous();
  const auto s = support.contiguous();
  const auto w = support_weights.contiguous();
  const int64_t B = s.size(0), K = s.size(1), C = s.size(2), Ns = s.size(3), Nq = q.size(2);
  const auto opmath = q.options().dtype(max_cosine_opmath(q.scalar_type()));
  at::Tensor values = at::empty({B, K, Nq}, opmath);
  at::Tensor indices = at::empty({B, K, Nq}, q.options().dtype(at::kLong));
  if (values.numel() == 0) return {values, indices};

  // Foreground pixels first, in index order (stable sort of "is background"), and their count:
  // device-side, so the host never waits for the masks.
  const auto background = (w == 0).to(at::kByte);
  const auto fg_index = std::get<1>(background.sort(/*stable=*/true, /*dim=*/-1, /*descending=*/false));
  const auto fg_count = (w != 0).sum(-1);
  // (B, Nq) in opmath, as torch.norm
  const auto query_norms = at::linalg_vector_norm(q, 2, {1}, false, opmath.dtype().toScalarType());
  at::Tensor support_norms = at::empty({B, K, Ns}, opmath);
  at::Tensor bad_background = at::empty({B, K, Ns}, q.options().dtype(at::kByte));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "fsskern_max_cosine_cuda", [&] {
    using T = at::opmath_type<scalar_t>;
    const int64_t total = B * K * Ns;
    launch(support_norms_kernel<T, scalar_t>,
           {grid_dims(std::min<int64_t>(ceil_div(total, 256), 65535)), dim3(256)},
           s.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(), support_norms.mutable_data_ptr<T>(),
           bad_background.mutable_data_ptr<uint8_t>(), B * K, C, Ns);
    const auto poisoned = bad_background.any(-1);
    const MaxCosineParams params{K, C, Nq, Ns, eps};
    launch(max_cosine_forward_kernel<T, scalar_t>,
           {grid_dims(ceil_div(Nq, kTileQ), K, B), dim3(kMaxCosineThreads)},
           q.const_data_ptr<scalar_t>(), s.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
           query_norms.const_data_ptr<T>(), support_norms.const_data_ptr<T>(), fg_index.const_data_ptr<int64_t>(),
           fg_count.const_data_ptr<int64_t>(), poisoned.const_data_ptr<uint8_t>(), values.mutable_data_ptr<T>(),
           indices.mutable_data_ptr<int64_t>(), params);
  });
  return {values, indices};
}

std::tuple<at::Tensor, at::Tensor> max_cosine_backward_cuda(const at::Tensor& grad_values, const at::Tensor& query,
                                                            const at::Tensor& support,
                                                            const at::Tensor& support_weights,
                                                            const at::Tensor& indices, double eps) {
  check_max_cosine_backward_inputs(grad_values, query, support, support_weights, indices, eps);
  // grad_support gathers every query pixel whose best match is the same support pixel with float atomics:
  // the order, and so the last bits, vary between runs (as index_add_ on CUDA, which says so too)
  at::globalContext().alertNotDeterministic("fsskern::max_cosine backward (CUDA: atomic adds into grad_support)");
  const DeviceGuard guard(query.device());
  const auto q = query.contiguous();
  const auto s = support.contiguous();
  const int64_t B = s.size(0), K = s.size(1), C = s.size(2), Ns = s.size(3), Nq = q.size(2);
  // Accumulated in opmath (atomics included), rounded once to the inputs' dtype.
  const auto opmath = q.options().dtype(max_cosine_opmath(q.scalar_type()));
  at::Tensor grad_query = at::zeros(q.sizes(), opmath);
  at::Tensor grad_support = at::zeros(s.sizes(), opmath);
  const auto grad = grad_values.to(opmath.dtype().toScalarType()).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "fsskern_max_cosine_backward_cuda", [&] {
    using T = at::opmath_type<scalar_t>;
    const MaxCosineParams params{K, C, Nq, Ns, eps};
    launch(max_cosine_backward_kernel<T, scalar_t>,
           {grid_dims(Nq, B), dim3(kBackwardThreads)},
           grad.const_data_ptr<T>(), q.const_data_ptr<scalar_t>(), s.const_data_ptr<scalar_t>(),
           support_weights.contiguous().const_data_ptr<scalar_t>(), indices.contiguous().const_data_ptr<int64_t>(),
           grad_query.mutable_data_ptr<T>(), grad_support.mutable_data_ptr<T>(), params);
  });
  return {grad_query.to(q.scalar_type()), grad_support.to(q.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(FSSKERN_NAMESPACE, FSSKERN_CUDA_KEY, m) {
  m.impl("max_cosine", &max_cosine_cuda);
  m.impl("_max_cosine_backward", &max_cosine_backward_cuda);
}

}  // namespace fsskern
