// prototype_attention and local_conditional_attention: schemas, input checks, and the
// orchestration both backends share (the core they call: attention.h; kernels: cpu/, cuda/).
// Everything here is tensor ops on the inputs' device: the backends see contiguous, packed
// tensors and never the masks.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS  // per-operator ATen headers only (setup.py)
#include "ops/attention.h"

#include <ATen/TensorOperators.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>

#include <limits>
#include <tuple>

namespace fsskern {
namespace {

constexpr double kNegInf = -std::numeric_limits<double>::infinity();

void check_float_inputs(const char* op, std::initializer_list<std::pair<const char*, const at::Tensor*>> tensors) {
  const auto& first = *tensors.begin()->second;
  const auto dt = first.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16, op, ": ",
              tensors.begin()->first, " must be float32, float64, float16 or bfloat16, got ", dt);
  for (const auto& [name, t] : tensors) {
    TORCH_CHECK(t->scalar_type() == dt, op, ": ", name, " must have the dtype of ", tensors.begin()->first, " (",
                dt, "), got ", t->scalar_type());
    TORCH_CHECK(t->device() == first.device(), op, ": all inputs must be on one device, got ", first.device(),
                " and ", t->device(), " (", name, ")");
  }
}

// The backward's extra inputs, shaped as the forward's outputs: autograd always passes those, a direct call must not
// make the kernels read past them.
void check_backward_inputs(const char* op, const at::Tensor& first, const at::Tensor& grad_out, const at::Tensor& out,
                           const at::Tensor& lse, at::IntArrayRef out_size, at::IntArrayRef lse_size) {
  const auto lse_dtype = attention_opmath(first.scalar_type());
  for (const auto& [name, t, size, dt] :
       {std::make_tuple("grad_out", &grad_out, out_size, first.scalar_type()),
        std::make_tuple("out", &out, out_size, first.scalar_type()), std::make_tuple("lse", &lse, lse_size, lse_dtype)})
    TORCH_CHECK(t->sizes() == size && t->scalar_type() == dt && t->device() == first.device(), op, ": ", name,
                " must be ", dt, " ", size, " on ", first.device(), ", got ", t->scalar_type(), " ", t->sizes(), " on ",
                t->device());
}

// Stable order with the selected entries first: packed position j holds original index
// key_index[b, j]; the first key_count[b] are the selected ones, in increasing index.
std::pair<at::Tensor, at::Tensor> selected_first(const at::Tensor& selected) {
  const auto order = std::get<1>(selected.logical_not().to(at::kByte).sort(/*stable=*/true, /*dim=*/-1, /*descending=*/false));
  return {order.contiguous(), selected.sum(-1).to(at::kLong)};
}

// Packed width: the largest number of selected keys (one host sync), so that unselected keys
// (CRCNet's background pixels) are neither copied nor visited.
int64_t packed_width(const at::Tensor& key_count) {
  return key_count.numel() == 0 ? 0 : key_count.max().item<int64_t>();
}

at::Tensor packed_index(const at::Tensor& key_index, int64_t width, int64_t H, int64_t E) {
  return key_index.narrow(1, 0, width).view({key_index.size(0), 1, width, 1}).expand({key_index.size(0), H, width, E});
}

// (B, H, P, E) -> (B, H, width, E): the selected keys of each image first.
at::Tensor pack_keys(const at::Tensor& x, const at::Tensor& key_index, int64_t width) {
  return x.gather(2, packed_index(key_index, width, x.size(1), x.size(3))).contiguous();
}

// Inverse of pack_keys for gradients: the packed rows go back to their original positions.
at::Tensor unpack_keys(const at::Tensor& packed, const at::Tensor& key_index) {
  const int64_t B = packed.size(0), H = packed.size(1), E = packed.size(3);
  return at::zeros({B, H, key_index.size(1), E}, packed.options())
      .scatter_(2, packed_index(key_index, packed.size(2), H, E), packed);
}

void check_prototype_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const std::optional<at::Tensor>& key_valid, double scale, double dropout_p) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
              "prototype_attention: q, k and v must be 4-d (B, H, N, D), (B, H, P, D), (B, H, P, Dv); got shapes ",
              q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  check_float_inputs("prototype_attention", {{"q", &q}, {"k", &k}, {"v", &v}});
  TORCH_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0) && k.size(1) == q.size(1) && v.size(1) == q.size(1),
              "prototype_attention: q, k and v must share (B, H), got ", q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK(k.size(3) == q.size(3), "prototype_attention: q and k must share D, got ", q.size(3), " and ",
              k.size(3));
  TORCH_CHECK(v.size(2) == k.size(2), "prototype_attention: k and v must have the same number of keys, got ",
              k.size(2), " and ", v.size(2));
  if (key_valid.has_value()) {
    const auto& m = *key_valid;
    TORCH_CHECK(m.scalar_type() == at::kBool, "prototype_attention: key_valid must be bool, got ", m.scalar_type());
    TORCH_CHECK(m.dim() == 2 && m.size(0) == k.size(0) && m.size(1) == k.size(2),
                "prototype_attention: key_valid must be (B, P) = (", k.size(0), ", ", k.size(2), "), got ", m.sizes());
    TORCH_CHECK(m.device() == q.device(), "prototype_attention: key_valid must be on ", q.device(), ", got ",
                m.device());
  }
  TORCH_CHECK(std::isfinite(scale), "prototype_attention: scale must be finite, got ", scale);
  TORCH_CHECK(dropout_p >= 0 && dropout_p < 1, "prototype_attention: dropout_p must be in [0, 1), got ", dropout_p);
}

AttentionInputs prototype_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const std::optional<at::Tensor>& key_valid, double scale, double dropout_p,
                                 int64_t seed) {
  const int64_t B = q.size(0), P = k.size(2);
  const auto valid = key_valid.has_value() ? *key_valid : at::ones({B, P}, q.options().dtype(at::kBool));
  auto [key_index, key_count] = selected_first(valid);
  const int64_t width = packed_width(key_count);
  return {q,
          pack_keys(k, key_index, width),
          pack_keys(v, key_index, width),
          key_index,
          key_count,
          at::full({B}, kNegInf, q.options().dtype(attention_opmath(q.scalar_type()))),
          at::zeros({B, v.size(3)}, q.options().dtype(attention_opmath(q.scalar_type()))),
          scale,
          dropout_threshold(dropout_p),
          1.0 / (1.0 - dropout_p),
          static_cast<uint64_t>(seed)};
}

void check_local_inputs(const at::Tensor& query, const at::Tensor& support, const at::Tensor& mask,
                        const at::Tensor& value, c10::string_view mode) {
  TORCH_CHECK(mode == "exclude" || mode == "multiply",
              "local_conditional_attention: mode must be 'exclude' or 'multiply', got '", std::string(mode), "'");
  TORCH_CHECK(query.dim() == 3 && support.dim() == 3 && value.dim() == 3,
              "local_conditional_attention: query, support and value must be 3-d (B, C, Nq), (B, C, Ns), "
              "(B, Cv, Ns); got shapes ",
              query.sizes(), ", ", support.sizes(), ", ", value.sizes());
  check_float_inputs("local_conditional_attention", {{"query", &query}, {"support", &support}, {"value", &value}});
  TORCH_CHECK(support.size(0) == query.size(0) && value.size(0) == query.size(0),
              "local_conditional_attention: batch sizes differ: query ", query.size(0), ", support ", support.size(0),
              ", value ", value.size(0));
  TORCH_CHECK(support.size(1) == query.size(1), "local_conditional_attention: channel counts differ: query ",
              query.size(1), ", support ", support.size(1));
  TORCH_CHECK(value.size(2) == support.size(2), "local_conditional_attention: value must have the support's ",
              support.size(2), " pixels, got ", value.size(2));
  TORCH_CHECK(mask.dim() == 2 && mask.size(0) == support.size(0) && mask.size(1) == support.size(2),
              "local_conditional_attention: support_mask must be (B, Ns) = (", support.size(0), ", ", support.size(2),
              "), got ", mask.sizes());
  TORCH_CHECK(mask.device() == query.device(), "local_conditional_attention: support_mask must be on ",
              query.device(), ", got ", mask.device());
  TORCH_CHECK(mask.scalar_type() == at::kBool || at::isFloatingType(mask.scalar_type()),
              "local_conditional_attention: support_mask must be bool or floating, got ", mask.scalar_type());
  if (mask.scalar_type() != at::kBool && mask.numel() > 0)
    TORCH_CHECK(mask.eq(0).logical_or(mask.eq(1)).all().item<bool>(),
                "local_conditional_attention: support_mask must hold only 0 and 1");
}

// CRCNet's problem as the core's: one head, pixels as tokens, no scaling. In "multiply" mode the
// background pixels become the constant key (logit log(#bg), value their mean value).
AttentionInputs local_inputs(const at::Tensor& query, const at::Tensor& support, const at::Tensor& mask,
                             const at::Tensor& value, c10::string_view mode) {
  const auto foreground = mask.to(at::kBool);
  auto [key_index, key_count] = selected_first(foreground);
  const int64_t Ns = support.size(2);
  const auto opmath = query.options().dtype(attention_opmath(query.scalar_type()));
  auto const_logit = at::full({query.size(0)}, kNegInf, opmath);
  auto const_value = at::zeros({query.size(0), value.size(1)}, opmath);
  if (mode == "multiply") {
    const auto background_count = (Ns - key_count).to(opmath.dtype());
    const_logit = at::where(background_count > 0, background_count.log(), const_logit);
    // The background sum is a GEMM in the values' dtype (fp32 accumulation, one rounding).
    const auto background = foreground.logical_not().to(value.scalar_type()).unsqueeze(2);  // (B, Ns, 1)
    const_value = at::bmm(value, background).squeeze(2).to(opmath.dtype()) /
                  background_count.clamp_min(1).unsqueeze(1);
  }
  const auto tokens = [](const at::Tensor& x) { return x.transpose(1, 2).unsqueeze(1); };  // (B, 1, N, C)
  const int64_t width = packed_width(key_count);
  const auto k = pack_keys(tokens(support), key_index, width);
  return {tokens(query),
          k,
          value.is_same(support) ? k : pack_keys(tokens(value), key_index, width),
          key_index,
          key_count,
          const_logit.contiguous(),
          const_value.contiguous(),
          1.0,
          0,
          1.0,
          0};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> prototype_attention_impl(const AttentionKernels& kernels, const at::Tensor& q,
                                                            const at::Tensor& k, const at::Tensor& v,
                                                            const std::optional<at::Tensor>& key_valid, double scale,
                                                            double dropout_p, int64_t seed) {
  check_prototype_inputs(q, k, v, key_valid, scale, dropout_p);
  const auto in = prototype_inputs(q, k, v, key_valid, scale, dropout_p, seed);
  at::Tensor out = at::empty({q.size(0), q.size(1), q.size(2), v.size(3)}, q.options());
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(attention_opmath(q.scalar_type())));
  if (out.numel() > 0 || lse.numel() > 0) kernels.forward(in, out, lse);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> prototype_attention_backward_impl(
    const AttentionKernels& kernels, const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const std::optional<at::Tensor>& key_valid, const at::Tensor& out, const at::Tensor& lse,
    double scale, double dropout_p, int64_t seed) {
  check_prototype_inputs(q, k, v, key_valid, scale, dropout_p);
  check_backward_inputs("_prototype_attention_backward", q, grad_out, out, lse,
                        {q.size(0), q.size(1), q.size(2), v.size(3)}, {q.size(0), q.size(1), q.size(2)});
  const auto in = prototype_inputs(q, k, v, key_valid, scale, dropout_p, seed);
  // Gradients accumulate in opmath (fp32 for reduced-precision inputs) and are rounded once at the end.
  const auto opmath = q.options().dtype(attention_opmath(q.scalar_type()));
  // Rows and keys, not q.numel(): with D = 0 every score is 0 and v still gets its gradient.
  const bool work = q.size(0) * q.size(1) * q.size(2) > 0 && k.size(2) > 0;
  at::Tensor grad_q = work ? at::empty(q.sizes(), q.options()) : at::zeros(q.sizes(), q.options());
  at::Tensor grad_k = at::zeros(in.k.sizes(), opmath);
  at::Tensor grad_v = at::zeros(in.v.sizes(), opmath);
  at::Tensor grad_const = at::zeros({q.size(0), q.size(1), v.size(3)}, opmath);
  if (work)
    kernels.backward(in, out.contiguous(), lse.contiguous(), grad_out.contiguous(), grad_q, grad_k, grad_v,
                     grad_const);
  const auto dt = q.scalar_type();
  return {grad_q, unpack_keys(grad_k, in.key_index).to(dt), unpack_keys(grad_v, in.key_index).to(dt)};
}

std::tuple<at::Tensor, at::Tensor> local_conditional_attention_impl(const AttentionKernels& kernels,
                                                                    const at::Tensor& query, const at::Tensor& support,
                                                                    const at::Tensor& support_mask,
                                                                    const at::Tensor& value, c10::string_view mode) {
  check_local_inputs(query, support, support_mask, value, mode);
  const auto in = local_inputs(query, support, support_mask, value, mode);
  const int64_t B = query.size(0), Nq = query.size(2), Cv = value.size(1);
  at::Tensor out = at::empty({B, Cv, Nq}, query.options());
  at::Tensor lse = at::empty({B, 1, Nq}, query.options().dtype(attention_opmath(query.scalar_type())));
  at::Tensor out_tokens = out.transpose(1, 2).unsqueeze(1);  // written in place, channels first
  if (out.numel() > 0 || lse.numel() > 0) kernels.forward(in, out_tokens, lse);
  return {out, lse.squeeze(1)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> local_conditional_attention_backward_impl(
    const AttentionKernels& kernels, const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& support,
    const at::Tensor& support_mask, const at::Tensor& value, const at::Tensor& out, const at::Tensor& lse,
    c10::string_view mode) {
  check_local_inputs(query, support, support_mask, value, mode);
  check_backward_inputs("_local_conditional_attention_backward", query, grad_out, out, lse,
                        {query.size(0), value.size(1), query.size(2)}, {query.size(0), query.size(2)});
  const auto in = local_inputs(query, support, support_mask, value, mode);
  const int64_t B = query.size(0);
  const auto opmath = query.options().dtype(attention_opmath(query.scalar_type()));
  // Rows and keys, not query.numel(): with C = 0 every logit is 0 and value still gets its gradient.
  const bool work = B * query.size(2) > 0 && support.size(2) > 0;
  const std::vector<int64_t> grad_q_size{B, 1, query.size(2), query.size(1)};
  at::Tensor grad_q = work ? at::empty(grad_q_size, query.options()) : at::zeros(grad_q_size, query.options());
  at::Tensor grad_k = at::zeros(in.k.sizes(), opmath);
  at::Tensor grad_v = at::zeros({B, 1, in.k.size(2), value.size(1)}, opmath);
  at::Tensor grad_const = at::zeros({B, 1, value.size(1)}, opmath);
  const auto tokens = [](const at::Tensor& x) { return x.transpose(1, 2).unsqueeze(1).contiguous(); };
  if (work)
    kernels.backward(in, tokens(out), lse.unsqueeze(1).contiguous(), tokens(grad_out), grad_q, grad_k, grad_v,
                     grad_const);
  const auto channels_first = [](const at::Tensor& x) { return x.squeeze(1).transpose(1, 2).contiguous(); };
  at::Tensor grad_value = channels_first(unpack_keys(grad_v, in.key_index));
  if (mode == "multiply") {
    // The constant key's value is the mean of the background values.
    const auto background = support_mask.to(at::kBool).logical_not();
    const auto count = background.sum(-1, /*keepdim=*/true).clamp_min(1).to(opmath.dtype());
    grad_value += grad_const.squeeze(1).unsqueeze(2) * (background.to(opmath.dtype()) / count).unsqueeze(1);
  }
  const auto dt = query.scalar_type();
  return {channels_first(grad_q), channels_first(unpack_keys(grad_k, in.key_index)).to(dt), grad_value.to(dt)};
}

TORCH_LIBRARY_FRAGMENT(FSSKERN_NAMESPACE, m) {
  m.def(
      "prototype_attention(Tensor q, Tensor k, Tensor v, Tensor? key_valid, float scale, float dropout_p, "
      "int seed) -> (Tensor, Tensor)");
  m.def(
      "_prototype_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor? key_valid, Tensor out, "
      "Tensor lse, float scale, float dropout_p, int seed) -> (Tensor, Tensor, Tensor)");
  m.def(
      "local_conditional_attention(Tensor query, Tensor support, Tensor support_mask, Tensor value, str mode) "
      "-> (Tensor, Tensor)");
  m.def(
      "_local_conditional_attention_backward(Tensor grad_out, Tensor query, Tensor support, Tensor support_mask, "
      "Tensor value, Tensor out, Tensor lse, str mode) -> (Tensor, Tensor, Tensor)");
}

}  // namespace fsskern
