#pragma once
// Tasks handed out on demand. at::parallel_for gives each thread a fixed share up front, so a
// thread that is held up (on a shared VM, a core taken away for a few milliseconds) holds the
// whole op back; here the other threads take over its remaining tasks. Which thread runs a
// task never changes its result.
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace fsskern {

// worker(claim) runs once per thread; claim() returns the next unclaimed task, or a value
// >= tasks when none is left. A worker sets up its scratch once and then loops:
//   for (int64_t task = claim(); task < tasks; task = claim()) { ... }
template <typename Worker>
void parallel_tasks(int64_t tasks, const Worker& worker) {
  std::atomic<int64_t> next{0};
  const auto claim = [&next] { return next.fetch_add(1, std::memory_order_relaxed); };
  const int64_t threads = std::clamp<int64_t>(tasks, 1, at::get_num_threads());
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) worker(claim);
  });
}

}  // namespace fsskern
