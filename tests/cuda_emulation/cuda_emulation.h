// A small CUDA execution model on the CPU, for running the project's CUDA kernels in CI
// (no GPU there). One OS thread per CUDA thread; blocks run one at a time, so a
// function-scope __shared__ array can be a static; __syncthreads is a block barrier; warp
// shuffles exchange through a per-warp slot array between two warp barriers; the WMMA
// tensor-core API (nvcuda::wmma) is emulated at the level its documentation specifies:
// tiles in memory, with its pointer-alignment and leading-dimension rules checked. Only what
// csrc/cuda/ uses is provided.
#pragma once

#include <array>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
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

// 16-bit float types of cuda_fp16.h / cuda_bf16.h (same bits; conversions round to nearest even).
using __half = c10::Half;
using __nv_bfloat16 = c10::BFloat16;
inline __half __float2half_rn(float v) { return __half(v); }
inline __nv_bfloat16 __float2bfloat16_rn(float v) { return __nv_bfloat16(v); }

namespace cuda_emulation {
// A misuse of the emulated API is recorded (the kernel runs on) and launch() throws it.
inline std::atomic<const char*> misuse{nullptr};
inline void report_misuse(const char* what) {
  const char* none = nullptr;
  misuse.compare_exchange_strong(none, what);
}

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
  if (const char* what = misuse.exchange(nullptr))
    throw std::runtime_error(std::string("emulated CUDA kernel misused the CUDA API: ") + what);
}

}  // namespace cuda_emulation
