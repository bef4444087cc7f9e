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
  if (cfg.grid.x == 0 || cfg.grid.y == 0 || cfg.grid.z == 0) return;
  TORCH_CHECK(cfg.grid.y <= 65535 && cfg.grid.z <= 65535, "fsskern: grid too large in y/z (", cfg.grid.y, ", ",
              cfg.grid.z, ")");
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
