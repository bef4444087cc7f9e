#pragma once
// Tasks handed out on demand. at::parallel_for gives each thread a fixed share up front, so a
// thread that is held up (on a shared VM, a core taken away for a few milliseconds) holds the
// whole op back; here the other threads take over its remaining tasks. Which thread runs a
// task never changes its result.
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

// MKL, torch's BLAS on x86, runs a GEMM on several threads when it is not called from inside an OpenMP
// parallel region (at::parallel_for with one task runs inline, outside one), and may then sum in another
// order: a kernel's result would depend on the thread count. Within a task GEMMs are pinned to one thread,
// so results depend on the (thread-independent) task split alone. Weak: a torch without MKL has no such
// symbol, and its BLAS is left as it is. (MKL_Set_Num_Threads_Local is the C entry point that mkl_service.h
// names mkl_set_num_threads_local; the lower-case symbol itself is the Fortran one, taking a pointer.)
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));

namespace fsskern {

class SingleThreadedBlas {
 public:
  SingleThreadedBlas() : previous_(MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(1) : 0) {}
  ~SingleThreadedBlas() {
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(previous_);  // 0 restores the global setting
  }
  SingleThreadedBlas(const SingleThreadedBlas&) = delete;
  SingleThreadedBlas& operator=(const SingleThreadedBlas&) = delete;

 private:
  int previous_;
};

// worker(claim) runs once per thread; claim() returns the next unclaimed task, or a value
// >= tasks when none is left. A worker sets up its scratch once and then loops:
//   for (int64_t task = claim(); task < tasks; task = claim()) { ... }
template <typename Worker>
void parallel_tasks(int64_t tasks, const Worker& worker) {
  std::atomic<int64_t> next{0};
  const auto claim = [&next] { return next.fetch_add(1, std::memory_order_relaxed); };
  const int64_t threads = std::clamp<int64_t>(tasks, 1, at::get_num_threads());
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    const SingleThreadedBlas one_thread;
    for (int64_t t = begin; t < end; ++t) worker(claim);
  });
}

}  // namespace fsskern
