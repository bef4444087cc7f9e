#pragma once
// Every CUDA kernel fsskern ships is started through fsskern::launch, never with <<<>>> at the
// call site. One entry point means one place that skips empty grids, checks the launch and
// picks the stream, and one place the SIMT emulation build (FSSKERN_SIMT, tests only) redirects
// so the very same launchers run their kernels on the CPU.
#include <c10/core/Device.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <utility>

#if defined(FSSKERN_SIMT)
#include "simt/simt.h"
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace fsskern {

struct LaunchConfig {
  dim3 grid;
  dim3 block;
  size_t shared_bytes = 0;
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Grid dimensions from int64 counts, checked against CUDA's limits before they are narrowed to
// unsigned (a count of 2^32 + 1 would otherwise wrap to a grid of 1 and skip the rest silently).
// An empty grid launches nothing (launch skips it), however large its other sizes.
inline dim3 grid_dims(int64_t x, int64_t y = 1, int64_t z = 1) {
  TORCH_CHECK(x >= 0 && y >= 0 && z >= 0, "fsskern: negative grid size (", x, ", ", y, ", ", z, ")");
  if (x == 0 || y == 0 || z == 0) return dim3(0, 0, 0);
  TORCH_CHECK(x <= 2147483647 && y <= 65535 && z <= 65535, "fsskern: grid too large (", x, ", ", y, ", ", z,
              "): CUDA allows 2^31 - 1 blocks in x and 65535 in y and z");
  return dim3(static_cast<unsigned>(x), static_cast<unsigned>(y), static_cast<unsigned>(z));
}

#if defined(FSSKERN_SIMT)
// Launchers run on CPU tensors here: there is no device to switch to.
struct DeviceGuard {
  explicit DeviceGuard(c10::Device) {}
};
#else
using DeviceGuard = c10::cuda::CUDAGuard;
#endif

template <typename... KernelArgs, typename... Args>
void launch(void (*kernel)(KernelArgs...), const LaunchConfig& cfg, Args&&... args) {
  if (cfg.grid.x == 0 || cfg.grid.y == 0 || cfg.grid.z == 0) return;  // grids come from grid_dims, checked there
#if defined(FSSKERN_SIMT)
  simt::launch(simt::kernel_name(reinterpret_cast<const void*>(kernel)), cfg.grid, cfg.block, cfg.shared_bytes,
               [&] { kernel(args...); });
#else
  kernel<<<cfg.grid, cfg.block, cfg.shared_bytes, c10::cuda::getCurrentCUDAStream()>>>(
      std::forward<Args>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
#endif
}

}  // namespace fsskern
