// Deliberately broken tiny kernels (and their correct twins) that the SIMT harness must catch.
// Compiled only into the test-only emulation build. fsskern_simt::_planted(name) runs one on a
// 64-thread block (two warps) and returns what it wrote.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS  // per-operator ATen headers only (setup.py)
#include <ATen/ops/full.h>
#include <torch/library.h>

#include <string>

#include "common/cuda_reduce.cuh"
#include "common/launch.cuh"
#include "common/shared_memory.cuh"

namespace fsskern {
namespace planted {  // named, not anonymous: the harness reads kernel names from exported symbols

constexpr int kThreads = 64;

// Each thread publishes its id and reads its neighbour's. Correct only with the barrier.
__global__ void neighbour_with_barrier(float* out) {
  FSSKERN_SHARED_ARRAY(float, ids, kThreads);
  ids[threadIdx.x] = float(threadIdx.x);
  __syncthreads();
  out[threadIdx.x] = ids[(threadIdx.x + 1) % kThreads];
}

__global__ void neighbour_missing_barrier(float* out) {
  FSSKERN_SHARED_ARRAY(float, ids, kThreads);
  ids[threadIdx.x] = float(threadIdx.x);
  out[threadIdx.x] = ids[(threadIdx.x + 1) % kThreads];
}

// Write-after-read with no barrier: each thread reads its neighbour's slot, then overwrites its
// own. Not a read-after-write, so only the schedule shows it: the result depends on the order.
__global__ void neighbour_overwrite_race(float* out) {
  FSSKERN_SHARED_ARRAY(float, vals, kThreads);
  vals[threadIdx.x] = float(threadIdx.x);
  __syncthreads();
  const float next = vals[(threadIdx.x + 1) % kThreads];
  vals[threadIdx.x] = next * 10.0f;
  __syncthreads();
  out[threadIdx.x] = vals[threadIdx.x];
}

// The same in global memory, where no shadow state is kept: only the schedules expose it.
__global__ void global_overwrite_race(float* buf) {
  buf[threadIdx.x] = float(threadIdx.x);
  __syncthreads();
  const float next = buf[(threadIdx.x + 1) % kThreads];
  buf[threadIdx.x] = next * 10.0f;
}

__global__ void shared_off_by_one(float* out) {
  FSSKERN_SHARED_ARRAY(float, vals, kThreads);
  vals[threadIdx.x + 1] = 1.0f;  // thread 63 writes vals[64]
  __syncthreads();
  out[threadIdx.x] = vals[threadIdx.x];
}

__global__ void shared_off_by_one_2d(float* out) {
  FSSKERN_SHARED_ARRAY2D(float, tile, 2, kThreads / 2);
  tile[threadIdx.x / 32][threadIdx.x % 32 + 1] = 1.0f;  // column 32 of a 32-column tile
  __syncthreads();
  out[threadIdx.x] = 0.0f;
}

__global__ void read_before_write(float* out) {
  FSSKERN_SHARED_ARRAY(float, vals, kThreads);
  out[threadIdx.x] = vals[threadIdx.x];
}

__global__ void barrier_in_branch(float* out) {
  if (threadIdx.x < 16) __syncthreads();  // threads 16.. never arrive
  out[threadIdx.x] = 1.0f;
}

__global__ void two_different_barriers(float* out) {
  if (threadIdx.x % 2 == 0) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1.0f;
}

// Lanes 16..31 skip the shuffle, but the full mask names them.
__global__ void shuffle_wrong_mask(float* out) {
  float v = float(threadIdx.x);
  if (threadIdx.x % 32 < 16) v = __shfl_down_sync(0xffffffffu, v, 1);
  out[threadIdx.x] = v;
}

__global__ void shuffle_partial_mask_ok(float* out) {
  float v = float(threadIdx.x);
  if (threadIdx.x % 32 < 16) v = __shfl_down_sync(0x0000ffffu, v, 1, 16);
  out[threadIdx.x] = v;
}

// A correct block reduction with the project helpers: every thread gets sum(0..63) = 2016.
__global__ void block_sum_ok(float* out) {
  FSSKERN_SHARED_ARRAY(float, scratch, 32);
  out[threadIdx.x] = block_sum(float(threadIdx.x), scratch);
}

// Votes, xor shuffles, dynamic shared memory and shared atomics, all correct.
__global__ void collectives_ok(float* out) {
  FSSKERN_DYNAMIC_SHARED(int, counter);
  if (threadIdx.x == 0) counter[0] = 0;
  __syncthreads();
  atomicAdd(&counter[0], 1);
  const unsigned ballot = __ballot_sync(0xffffffffu, threadIdx.x % 3 == 0);
  const float x = __shfl_xor_sync(0xffffffffu, float(threadIdx.x), 1);
  __syncthreads();
  out[threadIdx.x] = float(__popc(ballot)) * 1000.0f + x + (counter[0] == kThreads ? 0.5f : 0.0f);
}

__global__ void dynamic_shared_overflow(float* out) {
  FSSKERN_DYNAMIC_SHARED(float, vals);  // launched with 32 floats of dynamic memory
  vals[threadIdx.x] = 1.0f;
  __syncthreads();
  out[threadIdx.x] = vals[threadIdx.x % 32];
}

at::Tensor planted(c10::string_view name) {
  at::Tensor out = at::full({kThreads}, -1.0f);
  float* p = out.mutable_data_ptr<float>();
  const LaunchConfig one_block{dim3(1), dim3(kThreads)};
  const LaunchConfig with_dynamic{dim3(1), dim3(kThreads), 32 * sizeof(float)};
  if (name == "neighbour_with_barrier") launch(neighbour_with_barrier, one_block, p);
  else if (name == "neighbour_missing_barrier") launch(neighbour_missing_barrier, one_block, p);
  else if (name == "neighbour_overwrite_race") launch(neighbour_overwrite_race, one_block, p);
  else if (name == "global_overwrite_race") launch(global_overwrite_race, one_block, p);
  else if (name == "shared_off_by_one") launch(shared_off_by_one, one_block, p);
  else if (name == "shared_off_by_one_2d") launch(shared_off_by_one_2d, one_block, p);
  else if (name == "read_before_write") launch(read_before_write, one_block, p);
  else if (name == "barrier_in_branch") launch(barrier_in_branch, one_block, p);
  else if (name == "two_different_barriers") launch(two_different_barriers, one_block, p);
  else if (name == "shuffle_wrong_mask") launch(shuffle_wrong_mask, one_block, p);
  else if (name == "shuffle_partial_mask_ok") launch(shuffle_partial_mask_ok, one_block, p);
  else if (name == "block_sum_ok") launch(block_sum_ok, one_block, p);
  else if (name == "collectives_ok") launch(collectives_ok, {dim3(1), dim3(kThreads), sizeof(int)}, p);
  else if (name == "dynamic_shared_overflow") launch(dynamic_shared_overflow, with_dynamic, p);
  else TORCH_CHECK(false, "no planted kernel named ", name);
  return out;
}

}  // namespace planted

TORCH_LIBRARY_FRAGMENT(fsskern_simt, m) { m.def("_planted(str name) -> Tensor", &planted::planted); }

}  // namespace fsskern
