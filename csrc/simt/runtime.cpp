// SIMT emulation runtime (see runtime.h for what it does and checks).
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS  // per-operator ATen headers only (setup.py)
#include "simt/runtime.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <cxxabi.h>
#include <dlfcn.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <memory>
#include <mutex>
#include <numeric>
#include <random>
#include <set>
#include <sstream>
#include <unordered_map>

namespace fsskern {
namespace simt {
namespace {

constexpr int kWarpSize = 32;
constexpr size_t kStackBytes = 256 * 1024;

std::atomic<int> g_schedule{static_cast<int>(Schedule::InOrder)};
std::atomic<uint64_t> g_seed{0};
std::mutex g_registry_mutex;
std::set<std::string> g_launched;

enum class State { Ready, AtBarrier, AtWarp, Done };

struct Fiber {
  ucontext_t context;
  ThreadState thread;
  State state = State::Ready;
  const char* site = nullptr;  // where it waits
  WarpOp op = WarpOp::Sync;
  unsigned mask = 0;
  uint64_t value = 0, result = 0;
  int arg = 0, width = kWarpSize;
};

struct Shadow {
  int32_t writer = -1;  // thread that wrote last, -1: never written
  bool atomic = false;  // that write was an atomic
  uint64_t epoch = 0;   // block barrier epoch of that write
  uint64_t warp_epoch = 0;
};

struct Segment {
  std::unique_ptr<unsigned char[]> bytes;
  size_t size = 0, element_size = 1;
  std::vector<Shadow> shadow;
};

// A fiber stack with a guard page below it, so an overflow faults instead of corrupting.
struct Stack {
  void* base = nullptr;
  Stack() {
    const size_t page = 4096;
    base = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    TORCH_CHECK(base != MAP_FAILED, "simt: cannot map a fiber stack");
    mprotect(base, page, PROT_NONE);
  }
  ~Stack() { munmap(base, kStackBytes + 4096); }
  void* top() const { return static_cast<char*>(base) + 4096; }
};

struct Block {
  std::vector<Fiber> fibers;
  ucontext_t scheduler;
  const std::function<void()>* kernel = nullptr;
  uint64_t epoch = 0;
  std::vector<uint64_t> warp_epoch;
  std::unordered_map<const void*, size_t> static_segments;
  std::vector<Segment> segments;
  size_t dynamic_bytes = 0;
  std::string error;
};

thread_local Block* tl_block = nullptr;
thread_local Fiber* tl_fiber = nullptr;
thread_local std::vector<std::unique_ptr<Stack>> tl_stacks;

std::string describe(const Fiber& f) {
  std::ostringstream s;
  s << "thread (" << f.thread.thread_idx.x << "," << f.thread.thread_idx.y << "," << f.thread.thread_idx.z
    << ") of block (" << f.thread.block_idx.x << "," << f.thread.block_idx.y << "," << f.thread.block_idx.z << ")";
  return s.str();
}

[[noreturn]] void raise(const std::string& what) { throw SimtError(what); }

void yield_to_scheduler() {
  Fiber* self = tl_fiber;
  swapcontext(&self->context, &tl_block->scheduler);
}

void fiber_entry(unsigned hi, unsigned lo) {
  Fiber* self = reinterpret_cast<Fiber*>((static_cast<uintptr_t>(hi) << 32) | lo);
  try {
    (*tl_block->kernel)();
  } catch (const std::exception& e) {
    if (tl_block->error.empty()) tl_block->error = e.what();
  }
  self->state = State::Done;
  swapcontext(&self->context, &tl_block->scheduler);  // never resumed
}

// ---- warp collectives ---------------------------------------------------------------------------

uint64_t collective_result(const std::vector<Fiber*>& lanes, const Fiber& f, int lane) {
  const unsigned mask = f.mask;
  auto value_of = [&](int l) { return lanes[l]->value; };
  auto in_mask = [&](int l) { return l >= 0 && l < kWarpSize && ((mask >> l) & 1u); };
  const int width = f.width, base = lane - lane % width, offset = lane % width;
  int src = lane;
  switch (f.op) {
    case WarpOp::Sync:
      return 0;
    case WarpOp::Ballot:
    case WarpOp::Any:
    case WarpOp::All: {
      uint64_t ballot = 0;
      for (int l = 0; l < kWarpSize; ++l)
        if (in_mask(l) && value_of(l)) ballot |= (1ull << l);
      if (f.op == WarpOp::Ballot) return ballot;
      if (f.op == WarpOp::Any) return ballot != 0;
      return ballot == mask;
    }
    case WarpOp::ShflIdx:
      src = base + ((f.arg % width) + width) % width;
      break;
    case WarpOp::ShflUp:
      src = offset - f.arg >= 0 ? lane - f.arg : lane;
      break;
    case WarpOp::ShflDown:
      src = offset + f.arg < width ? lane + f.arg : lane;
      break;
    case WarpOp::ShflXor:
      src = base + ((offset ^ f.arg) % width);
      break;
  }
  if (!in_mask(src) || lanes[src] == nullptr) {
    raise("simt: " + describe(f) + " shuffles from lane " + std::to_string(src) + ", which is not in mask 0x" +
          [&] { std::ostringstream s; s << std::hex << mask; return s.str(); }() + " at " + f.site);
  }
  return value_of(src);
}

// Completes every warp collective whose lanes have all arrived; raises when one never can.
// Called only when no thread is ready to run, so a lane that is not there now never will be.
bool complete_warp_collectives(Block& block) {
  bool progressed = false;
  const int n = static_cast<int>(block.fibers.size());
  for (int w0 = 0; w0 < n; w0 += kWarpSize) {
    std::vector<Fiber*> lanes(kWarpSize, nullptr);
    Fiber* first = nullptr;
    for (int l = 0; l < kWarpSize && w0 + l < n; ++l) {
      Fiber& f = block.fibers[w0 + l];
      if (f.state == State::AtWarp) {
        lanes[l] = &f;
        if (!first) first = &f;
      }
    }
    if (!first) continue;
    const unsigned mask = first->mask;
    for (int l = 0; l < kWarpSize; ++l) {
      if (!((mask >> l) & 1u)) continue;
      if (w0 + l >= n) {
        raise("simt: " + describe(*first) + " names lane " + std::to_string(l) + " in its mask at " + first->site +
              ", but the block has no such thread");
      }
      Fiber& f = block.fibers[w0 + l];
      if (f.state == State::Done) {
        raise("simt: " + describe(*first) + " waits at " + first->site + " for lane " + std::to_string(l) +
              ", which has exited (the mask names a lane that does not take part)");
      }
      if (f.state != State::AtWarp || f.site != first->site || f.mask != mask) {
        raise("simt: " + describe(*first) + " waits at " + first->site + " for lane " + std::to_string(l) +
              ", which is at " + (f.state == State::AtBarrier ? std::string("__syncthreads ") : std::string("")) +
              (f.site ? f.site : "?") + " (divergent warp collective)");
      }
    }
    for (int l = 0; l < kWarpSize; ++l)
      if (lanes[l] && !((mask >> l) & 1u)) lanes[l] = nullptr;  // lanes of another collective
    std::vector<uint64_t> results(kWarpSize);
    for (int l = 0; l < kWarpSize; ++l)
      if (lanes[l]) results[l] = collective_result(lanes, *lanes[l], l);
    for (int l = 0; l < kWarpSize; ++l) {
      if (!lanes[l]) continue;
      lanes[l]->result = results[l];
      lanes[l]->state = State::Ready;
    }
    if (first->op == WarpOp::Sync) ++block.warp_epoch[w0 / kWarpSize];
    progressed = true;
  }
  return progressed;
}

void release_barrier(Block& block) {
  const Fiber* waiting = nullptr;
  const Fiber* exited = nullptr;
  for (const Fiber& f : block.fibers) {
    if (f.state == State::AtBarrier && !waiting) waiting = &f;
    if (f.state == State::Done && !exited) exited = &f;
  }
  if (exited) {
    raise("simt: barrier divergence: " + describe(*waiting) + " waits at __syncthreads " + waiting->site + " but " +
          describe(*exited) + " has exited");
  }
  for (const Fiber& f : block.fibers) {
    if (f.site != waiting->site) {
      raise("simt: barrier divergence: " + describe(*waiting) + " waits at __syncthreads " + waiting->site + ", " +
            describe(f) + " at " + f.site);
    }
  }
  for (Fiber& f : block.fibers) f.state = State::Ready;
  ++block.epoch;
}

std::vector<int> run_order(const Block& block, std::mt19937_64& rng) {
  std::vector<int> order;
  for (int i = 0; i < static_cast<int>(block.fibers.size()); ++i)
    if (block.fibers[i].state == State::Ready) order.push_back(i);
  const auto schedule = static_cast<Schedule>(g_schedule.load());
  if (schedule == Schedule::Reversed) std::reverse(order.begin(), order.end());
  if (schedule == Schedule::Random) std::shuffle(order.begin(), order.end(), rng);
  return order;
}

void run_block(Block& block, dim3 grid, dim3 block_dim, dim3 block_idx, uint64_t block_linear) {
  const int n = static_cast<int>(block_dim.x * block_dim.y * block_dim.z);
  while (static_cast<int>(tl_stacks.size()) < n) tl_stacks.push_back(std::make_unique<Stack>());
  block.fibers.assign(n, Fiber{});
  block.warp_epoch.assign((n + kWarpSize - 1) / kWarpSize, 0);
  for (int t = 0; t < n; ++t) {
    Fiber& f = block.fibers[t];
    f.thread = {dim3(t % block_dim.x, (t / block_dim.x) % block_dim.y, t / (block_dim.x * block_dim.y)), block_idx,
                block_dim, grid, t};
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = tl_stacks[t]->top();
    f.context.uc_stack.ss_size = kStackBytes;
    f.context.uc_link = nullptr;
    const auto bits = reinterpret_cast<uintptr_t>(&f);
    makecontext(&f.context, reinterpret_cast<void (*)()>(fiber_entry), 2, static_cast<unsigned>(bits >> 32),
                static_cast<unsigned>(bits & 0xffffffffu));
  }
  std::mt19937_64 rng(g_seed.load() * 0x9E3779B97F4A7C15ull + block_linear);
  tl_block = &block;
  while (true) {
    const std::vector<int> order = run_order(block, rng);
    for (int t : order) {
      Fiber& f = block.fibers[t];
      if (f.state != State::Ready) continue;
      tl_fiber = &f;
      swapcontext(&block.scheduler, &f.context);
      tl_fiber = nullptr;
      if (!block.error.empty()) raise(block.error);
    }
    if (!order.empty()) continue;
    if (complete_warp_collectives(block)) continue;
    const bool all_done =
        std::all_of(block.fibers.begin(), block.fibers.end(), [](const Fiber& f) { return f.state == State::Done; });
    if (all_done) return;
    release_barrier(block);
  }
}

std::string demangled(const char* name) {
  int status = 0;
  std::unique_ptr<char, void (*)(void*)> out(abi::__cxa_demangle(name, nullptr, nullptr, &status), std::free);
  return status == 0 && out ? std::string(out.get()) : std::string(name);
}

}  // namespace

void set_schedule(Schedule schedule, uint64_t seed) {
  g_schedule = static_cast<int>(schedule);
  g_seed = seed;
}

Schedule schedule_from_string(const std::string& name) {
  if (name == "in_order") return Schedule::InOrder;
  if (name == "reversed") return Schedule::Reversed;
  if (name == "random") return Schedule::Random;
  TORCH_CHECK(false, "simt: schedule must be 'in_order', 'reversed' or 'random', got '", name, "'");
}

std::string kernel_name(const void* fn) {
  Dl_info info;
  if (dladdr(fn, &info) && info.dli_sname) {
    std::string name = demangled(info.dli_sname);
    // "void fsskern::weighted_sum_kernel<float, float>(...)" -> "weighted_sum_kernel"
    const auto paren = name.find('(');
    auto end = name.find('<');
    if (end == std::string::npos || end > paren) end = paren;
    const auto start = name.rfind("::", end);
    return name.substr(start == std::string::npos ? 0 : start + 2, end - (start == std::string::npos ? 0 : start + 2));
  }
  std::ostringstream s;
  s << "kernel@" << fn;
  return s.str();
}

void launch(const std::string& name, dim3 grid, dim3 block_dim, size_t dynamic_shared_bytes,
            const std::function<void()>& kernel) {
  TORCH_CHECK(block_dim.x * block_dim.y * block_dim.z >= 1 && block_dim.x * block_dim.y * block_dim.z <= 1024,
              "simt: ", name, ": a block has 1..1024 threads, got ", block_dim.x, "x", block_dim.y, "x", block_dim.z);
  {
    std::lock_guard<std::mutex> lock(g_registry_mutex);
    g_launched.insert(name);
  }
  const int64_t blocks = int64_t(grid.x) * grid.y * grid.z;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      Block block;
      block.kernel = &kernel;
      block.dynamic_bytes = dynamic_shared_bytes;
      const dim3 idx(b % grid.x, (b / grid.x) % grid.y, b / (int64_t(grid.x) * grid.y));
      try {
        run_block(block, grid, block_dim, idx, static_cast<uint64_t>(b));
      } catch (const SimtError& e) {
        tl_block = nullptr;
        TORCH_CHECK(false, "in kernel ", name, ": ", e.what());
      }
      tl_block = nullptr;
    }
  });
}

std::vector<std::string> launched_kernels() {
  std::lock_guard<std::mutex> lock(g_registry_mutex);
  return {g_launched.begin(), g_launched.end()};
}

const ThreadState& current_thread() {
  TORCH_CHECK(tl_fiber != nullptr, "simt: a CUDA built-in was used outside a kernel launch");
  return tl_fiber->thread;
}

void fail(const std::string& what) { raise("simt: " + describe(*tl_fiber) + ": " + what); }

void sync_threads(const char* site) {
  Fiber* self = tl_fiber;
  self->state = State::AtBarrier;
  self->site = site;
  yield_to_scheduler();
}

uint64_t warp_collective(const char* site, WarpOp op, unsigned mask, uint64_t value, int arg, int width) {
  Fiber* self = tl_fiber;
  const int lane = self->thread.linear_tid % kWarpSize;
  if (!((mask >> lane) & 1u)) {
    std::ostringstream s;
    s << "calls a warp collective at " << site << " with mask 0x" << std::hex << mask << " that omits its own lane "
      << std::dec << lane;
    fail(s.str());
  }
  if (width < 1 || width > kWarpSize || (width & (width - 1)) != 0) fail("shuffle width must be a power of two <= 32");
  self->state = State::AtWarp;
  self->site = site;
  self->op = op;
  self->mask = mask;
  self->value = value;
  self->arg = arg;
  self->width = width;
  yield_to_scheduler();
  return self->result;
}

void* block_shared(const void* site_key, size_t bytes, size_t element_size, bool is_float, size_t* shadow_index) {
  Block& block = *tl_block;
  auto it = block.static_segments.find(site_key);
  if (it == block.static_segments.end()) {
    Segment seg;
    seg.bytes.reset(new unsigned char[bytes]);
    seg.size = bytes;
    seg.element_size = element_size;
    // Poison: NaN for floating point (every reader's arithmetic shows it), 0xFF bytes otherwise.
    if (is_float && element_size == sizeof(float)) {
      std::fill_n(reinterpret_cast<float*>(seg.bytes.get()), bytes / sizeof(float), std::nanf(""));
    } else if (is_float && element_size == sizeof(double)) {
      std::fill_n(reinterpret_cast<double*>(seg.bytes.get()), bytes / sizeof(double), std::nan(""));
    } else {
      std::memset(seg.bytes.get(), 0xFF, bytes);
    }
    seg.shadow.assign(bytes / element_size, Shadow{});
    block.segments.push_back(std::move(seg));
    it = block.static_segments.emplace(site_key, block.segments.size() - 1).first;
  }
  *shadow_index = it->second;
  return block.segments[it->second].bytes.get();
}

void* block_dynamic_shared(size_t* bytes, size_t* shadow_index) {
  Block& block = *tl_block;
  *bytes = block.dynamic_bytes;
  static const char dynamic_key = 0;
  return block_shared(&dynamic_key, block.dynamic_bytes, 1, false, shadow_index);
}

void shared_access(size_t shadow_index, size_t element, Access access, const char* name) {
  Block& block = *tl_block;
  Fiber& self = *tl_fiber;
  Shadow& s = block.segments[shadow_index].shadow[element];
  const int me = self.thread.linear_tid, warp = me / kWarpSize;
  const bool other = s.writer >= 0 && s.writer != me;
  const bool warp_synced = other && s.writer / kWarpSize == warp && block.warp_epoch[warp] > s.warp_epoch;
  const bool both_atomic = s.atomic && access == Access::Atomic;
  auto where = [&] { return std::string(name) + "[" + std::to_string(element) + "]"; };
  if (access != Access::Write && s.writer < 0) fail("reads shared " + where() + " before any thread wrote it");
  if (other && s.epoch == block.epoch && !warp_synced && !both_atomic) {
    static const char* verbs[] = {"reads", "writes", "atomically updates"};
    fail(std::string(verbs[static_cast<int>(access)]) + " shared " + where() + ", which thread " +
         std::to_string(s.writer) + (s.atomic ? " updated atomically" : " wrote") + " with no barrier in between (race)");
  }
  if (access != Access::Read) s = Shadow{me, access == Access::Atomic, block.epoch, block.warp_epoch[warp]};
}

}  // namespace simt
}  // namespace fsskern
