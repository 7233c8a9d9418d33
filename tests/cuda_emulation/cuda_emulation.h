// A small CUDA execution model on the CPU, for running the project's CUDA kernels in CI
// (no GPU there). One OS thread per CUDA thread. What it lets the tests see:
//  - blocks run in a seeded shuffled order, several at once (set_schedule), so code that
//    depends on the order of blocks, or races between them, gives other bits or fails;
//  - each block gets its own shared memory (ICD_SHARED), filled with 0xFF bytes (NaN in every
//    float type), so a read before a write poisons the result;
//  - __syncthreads is a block barrier; warp shuffles meet only the lanes their mask names, and
//    a lane outside its own mask, a source lane outside the mask, or lanes meeting with
//    different masks are reported;
//  - the completion counter's memory ordering: an atomicAdd not preceded by a __threadfence
//    (by this thread since the last barrier, or by every thread before it), and a
//    read_published() by a thread that has not fenced since its block's atomicAdd, are
//    reported (on a GPU they may read stale results);
//  - the WMMA tensor-core API (nvcuda::wmma) at the level its documentation specifies: tiles
//    in memory, with its pointer-alignment and leading-dimension rules checked.
// Reported misuses make launch() throw. Only what csrc/cuda/ uses is provided.
#pragma once

#include <algorithm>
#include <array>
#include <atomic>
#include <barrier>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <new>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

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
#define __launch_bounds__(...)
// A static would be shared by all blocks and keep its values between them: the kernels
// declare shared memory with ICD_SHARED instead, which gets each block its own.
#define __shared__ __shared___is_not_emulated_declare_shared_memory_with_ICD_SHARED

namespace cuda_emulation {

constexpr unsigned int kWarpSize = 32;

// A misuse of the emulated API is recorded (the kernel runs on) and launch() throws it.
inline std::atomic<const char*> misuse{nullptr};
inline void report_misuse(const char* what) {
  const char* none = nullptr;
  misuse.compare_exchange_strong(none, what);
}

// Orders fences and counter increments (a logical clock: later events get larger values).
inline std::atomic<uint64_t> event_clock{0};

// The lanes of one warp that meet in a shuffle: all lanes its mask names must arrive.
struct Warp {
  std::mutex mutex;
  std::condition_variable met;
  unsigned int arrived = 0, expected = 0;
  uint64_t generation = 0;
  std::array<uint64_t, kWarpSize> slots{};
  unsigned int present = 0;  // the lanes that exist (a last warp may be partial)

  void meet(unsigned int mask, unsigned int lane) {
    std::unique_lock<std::mutex> lock(mutex);
    if (arrived == 0) {
      expected = mask;
    } else if (expected != mask) {
      report_misuse("lanes of a warp met in a shuffle with different masks");
      mask = expected;  // let the warp go on; launch() throws at the end
    }
    arrived |= 1u << lane;
    if ((arrived & expected) == expected) {
      arrived = 0;
      ++generation;
      met.notify_all();
      return;
    }
    const uint64_t mine = generation;
    met.wait(lock, [&] { return generation != mine; });
  }
};

struct Block;
// Runs when every thread of a block has arrived at __syncthreads, before any leaves it.
struct BarrierPhase {
  Block* block;
  void operator()() noexcept;
};

struct Block {
  explicit Block(unsigned int threads)
      : barrier(threads, BarrierPhase{this}), warps((threads + kWarpSize - 1) / kWarpSize) {
    for (unsigned int w = 0; w < warps.size(); ++w) {
      const unsigned int lanes = std::min(kWarpSize, threads - w * kWarpSize);
      warps[w].present = lanes == kWarpSize ? ~0u : (1u << lanes) - 1;
    }
  }
  ~Block() {
    for (auto& region : shared) ::operator delete(region.data, std::align_val_t{kAlign});
  }
  std::barrier<BarrierPhase> barrier;
  std::vector<Warp> warps;

  // Shared memory: one region per ICD_SHARED declaration, in the order threads reach them.
  static constexpr size_t kAlign = 128;
  struct Region {
    void* data;
    size_t bytes;
  };
  std::mutex shared_mutex;
  std::vector<Region> shared;

  // The completion counter's ordering rules (see the header comment).
  std::atomic<unsigned int> unfenced_in_phase{0};  // threads that reached this barrier unfenced
  std::atomic<bool> all_fenced_at_last_barrier{false};
  std::atomic<uint64_t> counter_increment{0};  // event_clock at this block's atomicAdd
};

inline void BarrierPhase::operator()() noexcept {
  block->all_fenced_at_last_barrier = block->unfenced_in_phase.exchange(0) == 0;
}

// What each emulated thread keeps (a fresh OS thread per CUDA thread, so it starts clear).
struct ThreadState {
  Block* block = nullptr;
  size_t shared_declarations = 0;
  uint64_t last_fence = 0;  // event_clock at this thread's last __threadfence
  bool fenced_since_barrier = false;
};
inline thread_local ThreadState this_thread;

template <typename T>
T& block_shared() {
  static_assert(alignof(T) <= Block::kAlign);
  Block& block = *this_thread.block;
  const size_t index = this_thread.shared_declarations++;
  std::lock_guard<std::mutex> lock(block.shared_mutex);
  if (index < block.shared.size() && block.shared[index].bytes != sizeof(T))
    report_misuse("threads of a block declared different shared variables");
  while (index >= block.shared.size() || block.shared[index].bytes < sizeof(T)) {
    void* data = ::operator new(sizeof(T), std::align_val_t{Block::kAlign});
    std::memset(data, 0xFF, sizeof(T));  // NaN in fp16, bf16, fp32 and fp64
    if (index < block.shared.size()) {  // only after a misuse: keep going safely
      block.shared.push_back(block.shared[index]);
      block.shared[index] = {data, sizeof(T)};
    } else {
      block.shared.push_back({data, sizeof(T)});
    }
  }
  return *static_cast<T*>(block.shared[index].data);
}

// The order and concurrency of blocks: `seed` shuffles the blocks of each launch (the n-th
// launch after set_schedule uses seed + n), `concurrent_blocks` run at a time.
struct Schedule {
  uint64_t seed = 1;
  unsigned int concurrent_blocks = 3;
  uint64_t launches = 0;
};
inline Schedule schedule;
inline void set_schedule(uint64_t seed, unsigned int concurrent_blocks) {
  schedule = Schedule{.seed = seed, .concurrent_blocks = std::max(1u, concurrent_blocks),
                      .launches = 0};
}

}  // namespace cuda_emulation

#define ICD_SHARED(type, name) type& name = cuda_emulation::block_shared<type>()

inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline dim3 blockDim, gridDim;

inline void __syncthreads() {
  cuda_emulation::ThreadState& me = cuda_emulation::this_thread;
  if (!me.fenced_since_barrier) me.block->unfenced_in_phase.fetch_add(1);
  me.fenced_since_barrier = false;
  me.block->barrier.arrive_and_wait();
}

inline void __threadfence() {
  std::atomic_thread_fence(std::memory_order_seq_cst);
  cuda_emulation::this_thread.last_fence = ++cuda_emulation::event_clock;
  cuda_emulation::this_thread.fenced_since_barrier = true;
}

// The kernels' only atomic: the completion counter, whose increment publishes the block's
// results to the block that finishes last.
inline unsigned int atomicAdd(unsigned int* address, unsigned int value) {
  cuda_emulation::ThreadState& me = cuda_emulation::this_thread;
  if (!me.fenced_since_barrier && !me.block->all_fenced_at_last_barrier)
    cuda_emulation::report_misuse(
        "completion counter incremented without a __threadfence after the block's results");
  const unsigned int old = std::atomic_ref<unsigned int>(*address).fetch_add(value);
  me.block->counter_increment = ++cuda_emulation::event_clock;
  return old;
}

#define ICD_FAST_CHECK_PUBLISHED_READ()                                                    \
  do {                                                                                     \
    const uint64_t increment = cuda_emulation::this_thread.block->counter_increment;       \
    if (increment == 0 || cuda_emulation::this_thread.last_fence < increment)              \
      cuda_emulation::report_misuse(                                                       \
          "another block's result read without a __threadfence after the counter");        \
  } while (0)

template <typename T>
T __shfl_xor_sync(unsigned int mask, T value, int lane_mask) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle of a type wider than 64 bits");
  using cuda_emulation::report_misuse;
  cuda_emulation::Block& block = *cuda_emulation::this_thread.block;
  const unsigned int lane = threadIdx.x % cuda_emulation::kWarpSize;
  const unsigned int source = lane ^ static_cast<unsigned int>(lane_mask);
  cuda_emulation::Warp& warp = block.warps[threadIdx.x / cuda_emulation::kWarpSize];
  if (!(mask >> lane & 1u)) {
    report_misuse("a lane called a shuffle whose mask leaves it out");
    return value;
  }
  if (mask & ~warp.present) {
    report_misuse("a shuffle's mask names lanes that do not exist");
    mask &= warp.present;
  }
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  warp.slots[lane] = bits;
  warp.meet(mask, lane);
  uint64_t other = ~uint64_t{0};  // NaN bits: the value of a lane outside the mask is undefined
  if (source < cuda_emulation::kWarpSize && (mask >> source & 1u))
    other = warp.slots[source];
  else
    report_misuse("a shuffle read a lane outside its mask");
  warp.meet(mask, lane);
  T out;
  std::memcpy(&out, &other, sizeof(T));
  return out;
}

// 16-bit float types of cuda_fp16.h / cuda_bf16.h (same bits; conversions round to nearest even).
using __half = c10::Half;
using __nv_bfloat16 = c10::BFloat16;
inline __half __float2half_rn(float v) { return __half(v); }
inline __nv_bfloat16 __float2bfloat16_rn(float v) { return __nv_bfloat16(v); }

namespace cuda_emulation {
// The virtual arch the emulated device code stands for (cudaFuncAttributes::ptxVersion, set by
// the launcher): the kernels compile their tensor-core products to __trap() below compute_80,
// so a WMMA call in code "compiled" for an older arch is reported as that trap.
inline std::atomic<int> device_code_arch{90};
inline void check_tensor_cores_compiled() {
  if (device_code_arch.load() < 80)
    report_misuse("__trap(): tensor-core products in device code compiled below compute_80");
}
}  // namespace cuda_emulation

// A 16-byte vector load or store (the kernels' Pack16) faults on a GPU unless its address is
// 16-byte aligned; the host would not notice, so it is checked here.
#define ICD_FAST_CHECK_PACK_ALIGNMENT(pointer)                                            \
  do {                                                                                    \
    if (reinterpret_cast<std::uintptr_t>(pointer) % 16 != 0)                              \
      cuda_emulation::report_misuse("16-byte vector access at a misaligned address");     \
  } while (0)

// Warp-level matrix multiply-accumulate. Each emulated thread holds the whole tile in its
// fragment (the hardware spreads it over the warp in an unspecified layout, which correct
// code never depends on); store_matrix_sync writes from lane 0 only, so code that reads a
// stored tile without a barrier first can read stale memory here as on a GPU.
namespace nvcuda::wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
namespace precision {
struct tf32 {};  // operands read as float, of which the tensor cores use 10 mantissa bits
}  // namespace precision

// cvt.rna.tf32.f32: round to 10 mantissa bits, ties away from zero.
inline float __float_to_tf32(float v) {
  if (!std::isfinite(v)) return v;
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  bits = (bits + 0x1000u) & ~0x1FFFu;
  std::memcpy(&v, &bits, sizeof bits);
  return v;
}

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(std::is_same_v<Use, accumulator> || M != 16 || N != 16 ||
                    (std::is_same_v<T, precision::tf32> ? K == 8 : K == 16),
                "WMMA shapes: m16n16k16 for 16-bit operands, m16n16k8 for tf32");
  using element_t = std::conditional_t<std::is_same_v<T, precision::tf32>, float, T>;
  static constexpr int kRows = std::is_same_v<Use, matrix_b> ? K : M;
  static constexpr int kCols = std::is_same_v<Use, matrix_a> ? K : N;
  element_t v[kRows][kCols];
};

template <typename T>
void check_tile_pointer(const T* p, unsigned int ldm) {
  if (reinterpret_cast<std::uintptr_t>(p) % 32 != 0)
    cuda_emulation::report_misuse("tile pointer not 256-bit aligned");
  if ((ldm * sizeof(T)) % 16 != 0)
    cuda_emulation::report_misuse("ldm not a multiple of 16 bytes");
}

template <typename Use, int M, int N, int K, typename T, typename Layout>
void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f,
                      const typename fragment<Use, M, N, K, T, Layout>::element_t* p,
                      unsigned int ldm) {
  static_assert(!std::is_same_v<Use, accumulator>, "this emulation loads operands only");
  cuda_emulation::check_tensor_cores_compiled();
  check_tile_pointer(p, ldm);
  using F = fragment<Use, M, N, K, T, Layout>;
  for (int r = 0; r < F::kRows; ++r)
    for (int c = 0; c < F::kCols; ++c)
      f.v[r][c] = std::is_same_v<Layout, row_major> ? p[r * ldm + c] : p[c * ldm + r];
}

template <int M, int N, int K, typename T>
void fill_fragment(fragment<accumulator, M, N, K, T>& f, T value) {
  for (auto& row : f.v)
    for (auto& x : row) x = value;
}

template <int M, int N, int K, typename Tab, typename LayoutA, typename LayoutB>
void mma_sync(fragment<accumulator, M, N, K, float>& d,
              const fragment<matrix_a, M, N, K, Tab, LayoutA>& a,
              const fragment<matrix_b, M, N, K, Tab, LayoutB>& b,
              const fragment<accumulator, M, N, K, float>& c) {
  cuda_emulation::check_tensor_cores_compiled();
  if constexpr (std::is_same_v<Tab, precision::tf32>) {  // the hardware ignores the low bits
    const auto check = [](const auto& tile) {
      for (const auto& row : tile)
        for (float x : row)
          if (std::isfinite(x) && __float_to_tf32(x) != x)
            cuda_emulation::report_misuse("tf32 operand not rounded with __float_to_tf32");
    };
    check(a.v);
    check(b.v);
  }
  fragment<accumulator, M, N, K, float> out;
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      float sum = c.v[i][j];
      for (int k = 0; k < K; ++k)
        sum += static_cast<float>(a.v[i][k]) * static_cast<float>(b.v[k][j]);
      out.v[i][j] = sum;
    }
  d = out;
}

template <int M, int N, int K>
void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& f,
                       unsigned int ldm, layout_t layout) {
  check_tile_pointer(p, ldm);
  if (threadIdx.x % cuda_emulation::kWarpSize != 0) return;
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c)
      (layout == mem_row_major ? p[r * ldm + c] : p[c * ldm + r]) = f.v[r][c];
}
}  // namespace nvcuda::wmma

namespace cuda_emulation {

// Runs body() as a kernel of grid_x x grid_y blocks of `threads` threads, in the schedule's
// order.
template <typename Body>
void launch(unsigned int grid_x, unsigned int grid_y, unsigned int threads, const Body& body) {
  gridDim = dim3{grid_x, grid_y, 1};
  const unsigned int grid = grid_x * grid_y;
  blockDim = dim3{threads, 1, 1};
  std::vector<unsigned int> order(grid);
  std::iota(order.begin(), order.end(), 0u);
  std::mt19937_64 random(schedule.seed + schedule.launches++);
  std::shuffle(order.begin(), order.end(), random);
  std::atomic<unsigned int> next{0};
  const auto run_blocks = [&] {
    for (unsigned int k; (k = next.fetch_add(1)) < grid;) {
      Block block(threads);
      const uint3 block_index{order[k] % grid_x, order[k] / grid_x, 0};
      std::vector<std::thread> workers;
      workers.reserve(threads);
      for (unsigned int t = 0; t < threads; ++t)
        workers.emplace_back([&body, &block, block_index, t] {
          this_thread.block = &block;
          threadIdx = uint3{t, 0, 0};
          blockIdx = block_index;
          body();
        });
      for (auto& w : workers) w.join();
    }
  };
  std::vector<std::thread> runners;
  for (unsigned int r = 1; r < std::min(schedule.concurrent_blocks, grid); ++r)
    runners.emplace_back(run_blocks);
  run_blocks();
  for (auto& r : runners) r.join();
  if (const char* what = misuse.exchange(nullptr))
    throw std::runtime_error(std::string("emulated CUDA kernel misused the CUDA API: ") + what);
}

}  // namespace cuda_emulation
