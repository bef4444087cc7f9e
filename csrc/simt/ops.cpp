// Test-only ops of the SIMT emulation build: choose the thread schedule, list the kernels run.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS  // per-operator ATen headers only (setup.py)
#include <torch/library.h>

#include "simt/runtime.h"

namespace fsskern {
namespace simt {
namespace {

void set_schedule_op(c10::string_view name, int64_t seed) {
  set_schedule(schedule_from_string(std::string(name)), static_cast<uint64_t>(seed));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fsskern_simt, m) {
  m.def("_simt_set_schedule(str schedule, int seed=0) -> ()", &set_schedule_op);
  m.def("_simt_launched_kernels() -> str[]", [] { return launched_kernels(); });
}

}  // namespace simt
}  // namespace fsskern
