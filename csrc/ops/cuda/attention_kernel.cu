// CUDA launchers of the attention core and registration of prototype_attention and
// local_conditional_attention (kernels in the .cuh beside this; orchestration: attention.cpp).
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS  // per-operator ATen headers only (setup.py)
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>

#include "common/launch.cuh"
#include "ops/attention.h"
#include "ops/cuda/attention_kernel.cuh"

namespace fsskern {
namespace {

// q must be contiguous (the launchers pass in.q.contiguous()).
template <typename T, typename In>
AttentionParams<T, In> make_params(const AttentionInputs& in, const at::Tensor& q) {
  return {q.const_data_ptr<In>(),
          in.k.const_data_ptr<In>(),
          in.v.const_data_ptr<In>(),
          in.key_index.const_data_ptr<int64_t>(),
          in.key_count.const_data_ptr<int64_t>(),
          in.const_logit.const_data_ptr<T>(),
          in.const_value.const_data_ptr<T>(),
          in.q.size(1),
          in.q.size(2),
          in.key_index.size(1),
          in.k.size(2),
          in.q.size(3),
          in.v.size(3),
          static_cast<T>(in.scale),
          in.drop_threshold,
          static_cast<T>(in.keep_scale),
          in.seed};
}

// One warp per item (query row or key), up to kAttentionWarps items per block, grid (items, H, B).
template <typename T>
LaunchConfig warp_per_item_config(int64_t items, int64_t H, int64_t B, int64_t shared_per_warp) {
  const size_t bytes_per_warp = static_cast<size_t>(shared_per_warp) * sizeof(T);
  TORCH_CHECK(bytes_per_warp <= kAttentionSharedBytes, "attention (CUDA): a row of ", shared_per_warp,
              " values (query/key and value channels) does not fit in shared memory; at most ",
              kAttentionSharedBytes / sizeof(T), " in this dtype");
  // Zero channels (D = 0 and Dv = 0, or D = 0 in the query backward): nothing to stage, full blocks.
  const int64_t warps = bytes_per_warp == 0 ? kAttentionWarps
                                            : std::min<int64_t>(kAttentionWarps,
                                                                static_cast<int64_t>(kAttentionSharedBytes / bytes_per_warp));
  return {grid_dims(ceil_div(items, warps), H, B), dim3(static_cast<unsigned>(32 * warps)),
          static_cast<size_t>(warps) * bytes_per_warp};
}

void attention_forward_cuda(const AttentionInputs& in, at::Tensor& out, at::Tensor& lse) {
  const DeviceGuard guard(in.q.device());
  const auto q = in.q.contiguous();
  at::Tensor out_rows = out.is_contiguous() ? out : at::empty(out.sizes(), out.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.q.scalar_type(), "fsskern_attention_forward_cuda", [&] {
    using T = at::opmath_type<scalar_t>;
    const auto p = make_params<T, scalar_t>(in, q);
    launch(attention_forward_kernel<T, scalar_t>, warp_per_item_config<T>(p.N, p.H, in.q.size(0), p.D + p.Dv), p,
           out_rows.mutable_data_ptr<scalar_t>(), lse.mutable_data_ptr<T>());
  });
  if (!out_rows.is_same(out)) out.copy_(out_rows);
}

void attention_backward_cuda(const AttentionInputs& in, const at::Tensor& out, const at::Tensor& lse,
                             const at::Tensor& grad_out, at::Tensor& grad_q, at::Tensor& grad_k, at::Tensor& grad_v,
                             at::Tensor& grad_const) {
  const DeviceGuard guard(in.q.device());
  at::Tensor delta = at::empty(lse.sizes(), lse.options());
  const auto q = in.q.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.q.scalar_type(), "fsskern_attention_backward_cuda", [&] {
    using T = at::opmath_type<scalar_t>;
    const auto p = make_params<T, scalar_t>(in, q);
    const int64_t B = in.q.size(0);
    launch(attention_backward_query_kernel<T, scalar_t>, warp_per_item_config<T>(p.N, p.H, B, 2 * p.D), p,
           out.const_data_ptr<scalar_t>(), lse.const_data_ptr<T>(), grad_out.const_data_ptr<scalar_t>(),
           delta.mutable_data_ptr<T>(), grad_q.mutable_data_ptr<scalar_t>());
    // W + 1 warps: the packed keys and the constant key.
    launch(attention_backward_key_kernel<T, scalar_t>, warp_per_item_config<T>(p.W + 1, p.H, B, 2 * p.D + p.Dv), p,
           lse.const_data_ptr<T>(), grad_out.const_data_ptr<scalar_t>(), delta.const_data_ptr<T>(),
           grad_k.mutable_data_ptr<T>(), grad_v.mutable_data_ptr<T>(), grad_const.mutable_data_ptr<T>());
  });
}

constexpr AttentionKernels kCudaKernels{&attention_forward_cuda, &attention_backward_cuda};

}  // namespace

TORCH_LIBRARY_IMPL(FSSKERN_NAMESPACE, FSSKERN_CUDA_KEY, m) { register_attention<kCudaKernels>(m); }

}  // namespace fsskern
