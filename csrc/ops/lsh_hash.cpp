// lsh_hash: schema and input checks (math: lsh_hash.h; kernels: cpu/, cuda/).
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS  // per-operator ATen headers only (setup.py)
#include "ops/lsh_hash.h"

#include "common/library.h"

namespace fsskern {

void check_lsh_hash_inputs(const at::Tensor& x, const at::Tensor& planes) {
  TORCH_CHECK(x.dim() == 2 || x.dim() == 3, "lsh_hash: x must be 2-d (N, E) or 3-d (M, N, E), got shape ",
              x.sizes());
  TORCH_CHECK(planes.dim() == 2, "lsh_hash: planes must be 2-d (bits, E + 1), got shape ", planes.sizes());
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
              "lsh_hash: x must be float32, float64, float16 or bfloat16, got ", dt);
  TORCH_CHECK(planes.scalar_type() == lsh_planes_dtype(dt), "lsh_hash: planes must be ",
              lsh_planes_dtype(dt), " for x of dtype ", dt, ", got ", planes.scalar_type());
  TORCH_CHECK(planes.device() == x.device(), "lsh_hash: x and planes must be on one device, got ", x.device(),
              " and ", planes.device());
  TORCH_CHECK(planes.size(1) == x.size(-1) + 1, "lsh_hash: planes must be (bits, E + 1) = (bits, ", x.size(-1) + 1,
              ") with the threshold last, got ", planes.sizes());
  TORCH_CHECK(planes.size(0) >= 1 && planes.size(0) <= 64, "lsh_hash: 1 <= bits <= 64, got ", planes.size(0));
}

at::Tensor lsh_hash_as_3d(const at::Tensor& x) { return x.dim() == 3 ? x : x.unsqueeze(0); }

TORCH_LIBRARY_FRAGMENT(FSSKERN_NAMESPACE, m) { m.def("lsh_hash(Tensor x, Tensor planes) -> Tensor"); }

}  // namespace fsskern
