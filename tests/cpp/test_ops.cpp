// The ops called from C++ through the dispatcher, as a libtorch user would, checked against
// dense ATen computations. Run by ctest (see CMakeLists.txt).
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS  // per-operator ATen headers only (CMakeLists.txt)
#include <ATen/Context.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/allclose.h>
#include <ATen/ops/einsum.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/rand.h>
#include <ATen/ops/randn.h>
#include <ATen/ops/upsample_bilinear2d.h>

#include <functional>
#include <iostream>
#include <string>
#include <tuple>

namespace {

int passed = 0, failed = 0;

void check(bool ok, const std::string& name) {
  (ok ? passed : failed) += 1;
  std::cout << (ok ? "ok   " : "FAIL ") << name << "\n";
}

bool close(const at::Tensor& a, const at::Tensor& b) { return at::allclose(a, b, 1e-5, 1e-5); }

bool throws_with(const std::function<void()>& f, const std::string& text) {
  try {
    f();
  } catch (const c10::Error& e) {
    return std::string(e.what()).find(text) != std::string::npos;
  }
  return false;
}

using MapOp = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, c10::string_view, double);
using MaxCosineOp = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&, double);

}  // namespace

int main() {
  at::manual_seed(0);
  auto map = c10::Dispatcher::singleton().findSchemaOrThrow("fsskern::masked_average_pool", "").typed<MapOp>();
  auto max_cosine = c10::Dispatcher::singleton().findSchemaOrThrow("fsskern::max_cosine", "").typed<MaxCosineOp>();

  const auto features = at::randn({2, 8, 5, 7});
  const auto masks = at::rand({2, 3, 9, 13});
  {
    const auto [protos, area] = map.call(features, masks, "mask", 5e-4);
    const auto w = at::upsample_bilinear2d(masks, {5, 7}, /*align_corners=*/true);
    const auto want = at::einsum("bchw,bnhw->bnc", {features, w}) / (w.sum({2, 3}) + 5e-4).unsqueeze(-1);
    check(close(protos, want), "masked_average_pool resize=mask");
  }
  {
    const auto [protos, area] = map.call(features, masks, "features", 1e-5);
    const auto up = at::upsample_bilinear2d(features, {9, 13}, /*align_corners=*/false);
    const auto want = at::einsum("bchw,bnhw->bnc", {up, masks}) / (masks.sum({2, 3}) + 1e-5).unsqueeze(-1);
    check(close(protos, want), "masked_average_pool resize=features");
  }
  {
    const auto q = at::randn({2, 6, 20});
    const auto s = at::randn({2, 3, 6, 15});
    const auto w = (at::rand({2, 3, 15}) < 0.5).to(at::kFloat);
    const auto [values, indices] = max_cosine.call(q, s, w, 1e-7);
    const auto sm = s * w.unsqueeze(2);
    const auto cos = at::einsum("bkcs,bcq->bksq", {sm, q}) /
                     (sm.norm(2, {2}).unsqueeze(-1) * q.norm(2, {1}).unsqueeze(1).unsqueeze(1) + 1e-7);
    check(close(values, std::get<0>(cos.max(2))), "max_cosine");
  }
  check(throws_with([&] { map.call(at::randn({2, 8, 5}), masks, "mask", 5e-4); }, "features must be 4-d"),
        "masked_average_pool rejects a 3-d feature map");
  check(throws_with([&] { max_cosine.call(at::randn({2, 5, 20}), at::randn({2, 3, 6, 15}), at::ones({2, 3, 15}), 0); },
                    "channel counts differ"),
        "max_cosine rejects mismatched channels");

  std::cout << passed << " passed, " << failed << " failed\n";
  return failed == 0 ? 0 : 1;
}
