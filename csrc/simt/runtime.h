#pragma once
// SIMT emulation runtime: runs CUDA kernels compiled by the host compiler on the CPU.
//
// A launch runs every block of the grid; blocks are spread over OS threads, and the threads of
// one block run as cooperatively scheduled fibers on one OS thread. A fiber runs until it reaches
// a synchronisation point (__syncthreads, a warp collective, or the end of the kernel) and then
// hands control back to the block's scheduler, which decides who runs next. So barriers and warp
// collectives have their real semantics, and the order in which threads run between them is a
// choice of the schedule (in order, reversed, seeded random): code that is only correct for one
// order, such as a missing barrier, gives different results under different schedules.
//
// Checks, in the spirit of compute-sanitizer (each raises fsskern::simt::SimtError, which the
// launch turns into a c10::Error naming the kernel, block and thread):
//   - barrier divergence: threads of a block waiting at different __syncthreads, or exiting
//     while others wait;
//   - warp collectives (__shfl*_sync, __ballot_sync, __any/__all_sync, __syncwarp): a mask that
//     names a lane which does not take part (exited, elsewhere, or beyond the block), a calling
//     lane missing from its own mask, or lanes of one mask at different collectives;
//   - shared memory (shared.h): out-of-bounds indices, reads of never-written elements (memory
//     starts poisoned: NaN for floats, 0xFF bytes otherwise), and read-after-write or
//     write-after-write by another thread with no barrier in between (a race);
//   - deadlock: no thread can run and the block has not finished.
#include <cstddef>
#include <cstdint>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

namespace fsskern {
namespace simt {

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};

class SimtError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

enum class Schedule { InOrder, Reversed, Random };

// The schedule every later launch uses (process-wide; tests set it per case).
void set_schedule(Schedule schedule, uint64_t seed = 0);
Schedule schedule_from_string(const std::string& name);

// Runs `kernel` (a closure calling the __global__ function with its arguments) over the grid.
// `kernel_name` is recorded in the registry of launched kernels.
void launch(const std::string& kernel_name, dim3 grid, dim3 block, size_t dynamic_shared_bytes,
            const std::function<void()>& kernel);

// The kernel's function name ("weighted_sum_kernel"), from its symbol.
std::string kernel_name(const void* kernel_function);

// Names of every kernel launched so far in this process (for the coverage test).
std::vector<std::string> launched_kernels();

// ---- used by simt.h and shared.h from inside a kernel ------------------------------------------
struct ThreadState {
  dim3 thread_idx, block_idx, block_dim, grid_dim;
  int linear_tid;
};
const ThreadState& current_thread();
[[noreturn]] void fail(const std::string& what);  // SimtError with the current block/thread

void sync_threads(const char* site);
// A warp collective: every lane of `mask` must call it from the same site. `value` is this
// lane's contribution (raw bits, up to 8 bytes); the result for this lane is computed by `op`
// from all lanes' values once they have arrived.
enum class WarpOp { Sync, ShflIdx, ShflUp, ShflDown, ShflXor, Ballot, Any, All };
uint64_t warp_collective(const char* site, WarpOp op, unsigned mask, uint64_t value, int arg, int width);

// Storage of the block's shared memory: static arrays are allocated on first use by their site
// and live until the block ends; the dynamic segment has the size given at launch.
void* block_shared(const void* site_key, size_t bytes, size_t element_size, bool is_float, size_t* shadow_index);
void* block_dynamic_shared(size_t* bytes, size_t* shadow_index);
// Shadow state of a shared element (see shared.h): record an access, raising on violations.
enum class Access { Read, Write, Atomic };
void shared_access(size_t shadow_index, size_t element, Access access, const char* name);

}  // namespace simt
}  // namespace fsskern
