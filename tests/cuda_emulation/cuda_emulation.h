// A small CUDA execution model on the CPU, for running the project's CUDA kernels in CI
// (no GPU there). One OS thread per CUDA thread; blocks run one at a time, so a
// function-scope __shared__ array can be a static; __syncthreads is a block barrier; warp
// shuffles exchange through a per-warp slot array between two warp barriers. Only what
// csrc/cuda/icd_kernels.cuh uses is provided.
#pragma once

#include <array>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

struct uint3 {
  unsigned int x = 0, y = 0, z = 0;
};
struct dim3 {
  unsigned int x = 1, y = 1, z = 1;
};

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)

namespace cuda_emulation {

constexpr unsigned int kWarpSize = 32;

struct Block {
  explicit Block(unsigned int threads)
      : barrier(threads), warp_slots((threads + kWarpSize - 1) / kWarpSize) {
    for (unsigned int w = 0; w < warp_slots.size(); ++w)
      warp_barriers.push_back(std::make_unique<std::barrier<>>(
          std::min(kWarpSize, threads - w * kWarpSize)));
  }
  std::barrier<> barrier;
  std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
  std::vector<std::array<uint64_t, kWarpSize>> warp_slots;
};

inline Block* current_block = nullptr;

}  // namespace cuda_emulation

inline thread_local uint3 threadIdx;
inline uint3 blockIdx;
inline dim3 blockDim, gridDim;

inline void __syncthreads() { cuda_emulation::current_block->barrier.arrive_and_wait(); }

inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }

template <typename T>
T __shfl_xor_sync(unsigned int /*mask*/, T value, int lane_mask) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle of a type wider than 64 bits");
  cuda_emulation::Block& block = *cuda_emulation::current_block;
  const unsigned int warp = threadIdx.x / cuda_emulation::kWarpSize;
  const unsigned int lane = threadIdx.x % cuda_emulation::kWarpSize;
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  block.warp_slots[warp][lane] = bits;
  block.warp_barriers[warp]->arrive_and_wait();
  const uint64_t other = block.warp_slots[warp][lane ^ static_cast<unsigned int>(lane_mask)];
  block.warp_barriers[warp]->arrive_and_wait();
  T out;
  std::memcpy(&out, &other, sizeof(T));
  return out;
}

inline unsigned int atomicAdd(unsigned int* address, unsigned int value) {
  return std::atomic_ref<unsigned int>(*address).fetch_add(value);
}

namespace cuda_emulation {

// Runs body() as a kernel of `grid` blocks of `threads` threads.
template <typename Body>
void launch(unsigned int grid, unsigned int threads, const Body& body) {
  gridDim = dim3{grid, 1, 1};
  blockDim = dim3{threads, 1, 1};
  for (unsigned int b = 0; b < grid; ++b) {
    blockIdx = uint3{b, 0, 0};
    Block block(threads);
    current_block = &block;
    std::vector<std::thread> workers;
    workers.reserve(threads);
    for (unsigned int t = 0; t < threads; ++t)
      workers.emplace_back([&body, t] {
        threadIdx = uint3{t, 0, 0};
        body();
      });
    for (auto& w : workers) w.join();
    current_block = nullptr;
  }
}

}  // namespace cuda_emulation
