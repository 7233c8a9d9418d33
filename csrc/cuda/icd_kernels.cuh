// CUDA kernels of the fused ICD loss. Plain CUDA C++ plus the WMMA API (the tile products,
// icd_tile_products.cuh), so that the same source also runs on the CPU under the tests'
// emulation layer (tests/cuda_emulation/): keep to __syncthreads, __shfl_xor_sync,
// atomicAdd, __threadfence, nvcuda::wmma and function-scope shared variables declared with
// ICD_SHARED (the emulation gives each block its own, poisoned), read other blocks' results
// through read_published(), and let every thread of a block reach every barrier (no early
// return).
//
// Row-block ownership, deterministic, no floating-point atomics: the block that owns rows
// I = [32 b, 32 b + 32) loops over all column blocks J, forms L_IJ and L_JI tile by tile in
// registers, and accumulates what belongs to rows I only. A final reduction to the scalars
// is done by the last block to finish, in a fixed order.
#pragma once

#include <cmath>
#include <cstdint>

#include "../icd_math.h"
#include "icd_params.h"
#include "icd_tile_products.cuh"

namespace icd_fast::cuda {

// The tile kernels promise two resident blocks per SM (at most 255 registers a thread), what
// the launcher's grid aims at (target_blocks). Measured with nvcc 13 (sm_80 / sm_90,
// bench/kernel_occupancy.py on the build log): with __launch_bounds__(128) alone ptxas held
// the fp32 CUDA-core forward at 128 registers and spilled (20 / 140 bytes), with a minimum
// of 3 blocks (168 registers) the fp32 CUDA-core backward spilled 188 bytes; with 2 nothing
// spills (170-225 registers on the CUDA cores, 2 blocks per SM; 120-170 on the tensor cores,
// 3-4 blocks per SM; the TF32 backward's earlier 56-byte spill on sm_80 is gone too).
constexpr int kTileKernelMinBlocksPerSm = 2;

// The columns of this block's split (ColumnSplit, icd_params.h).
__device__ __forceinline__ int split_columns_begin(const ColumnSplit& split) {
  return blockIdx.y * split.tiles * Traits::kTileRows;
}
__device__ __forceinline__ int split_columns_end(const ColumnSplit& split, int n) {
  const int end = (blockIdx.y + 1) * split.tiles * Traits::kTileRows;
  return end < n ? end : n;
}

// a := the sums of a and b over the union of their columns (onto the larger shifts).
template <typename acc_t>
__device__ __forceinline__ void merge_partial(RowPartial<acc_t>& a, const RowPartial<acc_t>& b) {
  const ShiftMerge<acc_t> mr = merge_shifts(a.shift_r, b.shift_r);
  a.sum_r = a.sum_r * mr.factor1 + b.sum_r * mr.factor2;
  a.shift_r = mr.shift;
  const ShiftMerge<acc_t> mc = merge_shifts(a.shift_c, b.shift_c);
  a.sum_c = a.sum_c * mc.factor1 + b.sum_c * mc.factor2;
  a.sum_k = a.sum_k * mc.factor1 + b.sum_k * mc.factor2;
  a.shift_c = mc.shift;
  a.diag += b.diag;  // only one of them met column i
}

template <typename T>
__device__ __forceinline__ T shuffle_xor(T v, int lane_mask) {
  return __shfl_xor_sync(0xffffffffu, v, lane_mask);
}

// Sums v over the kThreadsPerRow consecutive lanes of a row (all of them get the sum).
template <typename T>
__device__ __forceinline__ T row_group_sum(T v) {
  for (int mask = 1; mask < Traits::kThreadsPerRow; mask <<= 1) v += shuffle_xor(v, mask);
  return v;
}

// The rows a kernel's products read, from its parameters.
template <typename Products, typename acc_t, typename Params>
__device__ __forceinline__ typename Products::Rows tile_rows(const Params& p) {
  using operand_t = typename Products::operand_t;
  const auto* op = static_cast<const operand_t*>(p.operand_rows);
  const int64_t half = static_cast<int64_t>(p.padded_n) * p.ld;
  return {p.unit, p.unit + static_cast<int64_t>(p.n) * p.d, op, op ? op + half : nullptr,
          p.n, p.d, p.ld};
}

// Writes one operand row of ld values: unit_row(k) for k < d, zeros beyond, and all zeros for
// a padding row (has_row false); the 32 lanes of a warp share the row.
template <typename Products, typename UnitRow>
__device__ __forceinline__ void write_operand_row(typename Products::operand_t* out, int d,
                                                  int ld, int lane, bool has_row,
                                                  UnitRow unit_row) {
  for (int k = lane; k < ld; k += 32)
    out[k] = Products::to_operand(has_row && k < d ? unit_row(k) : 0.f);
}

// The per-row kernels (one warp per row) loop over rows with a grid of at most
// kMaxRowBlocks blocks (row_blocks() in the launcher): enough to fill any GPU, and at large N
// a fraction of the blocks (N = 65536 would need 32768) to start.
constexpr int kMaxRowBlocks = 2048;
__device__ __forceinline__ int first_warp_row() {
  return blockIdx.x * Traits::kNormRowsPerBlock + threadIdx.x / 32;
}
__device__ __forceinline__ int warp_row_stride() {
  return gridDim.x * Traits::kNormRowsPerBlock;
}

template <typename Products, typename acc_t>
__global__ void __launch_bounds__(Traits::kThreads)
    operand_rows_kernel(OperandRowsParams<acc_t> p) {
  using operand_t = typename Products::operand_t;
  const int lane = threadIdx.x % 32;
  for (int row = first_warp_row(); row < 2 * p.padded_n; row += warp_row_stride()) {
    const int side = row / p.padded_n, i = row % p.padded_n;  // row of [s; t], padded
    const acc_t* unit_row = p.unit + (static_cast<int64_t>(side) * p.n + i) * p.d;
    write_operand_row<Products>(static_cast<operand_t*>(p.operand_rows) +
                                    static_cast<int64_t>(row) * p.ld,
                                p.d, p.ld, lane, i < p.n, [&](int k) { return unit_row[k]; });
  }
}

// ---------------------------------------------------------------------------------------
// Launch 1 of the forward: unit rows and norms of z_s and z_t, one warp per row; and, for
// the tensor-core products, their zero-padded operand copies (one warp per padded row).
template <typename scalar_t, typename acc_t, typename Products>
__global__ void __launch_bounds__(Traits::kThreads) normalize_kernel(NormalizeParams<acc_t> p) {
  const int lane = threadIdx.x % 32;
  if (blockIdx.x == 0 && threadIdx.x == 0) *p.forward_blocks_done = 0;
  // Rows of [s; t], padded_n per side (n where no operand copies are written); the loop's
  // bounds are the same for the 32 lanes of a warp, so every shuffle meets all of them.
  for (int row = first_warp_row(); row < 2 * p.padded_n; row += warp_row_stride()) {
    const int side = row / p.padded_n, i = row % p.padded_n;
    const bool active = i < p.n;
    const scalar_t* z = static_cast<const scalar_t*>(side == 0 ? p.z_s : p.z_t);
    const int64_t stride0 = side == 0 ? p.s_stride0 : p.t_stride0;
    const int64_t stride1 = side == 0 ? p.s_stride1 : p.t_stride1;
    // Squares in double: fp32 rows may have norms beyond the fp32 range.
    double sum_sq = 0;
    if (active)
      for (int k = lane; k < p.d; k += 32) {
        const double v = static_cast<acc_t>(z[i * stride0 + k * stride1]);
        sum_sq += v * v;
      }
    for (int mask = 16; mask > 0; mask >>= 1)
      sum_sq += __shfl_xor_sync(0xffffffffu, sum_sq, mask);
    const double norm = sqrt(sum_sq);
    const double inv = 1.0 / (norm > kNormEps ? norm : kNormEps);
    const auto unit_value = [&](int k) {
      return static_cast<acc_t>(static_cast<acc_t>(z[i * stride0 + k * stride1]) * inv);
    };
    if (active) {
      acc_t* out = p.unit + (static_cast<int64_t>(side) * p.n + i) * p.d;
      for (int k = lane; k < p.d; k += 32) out[k] = unit_value(k);
      if (lane == 0) p.norms[side * p.n + i] = static_cast<acc_t>(norm);
    }
    if constexpr (Products::kOperandRows) {
      using operand_t = typename Products::operand_t;
      write_operand_row<Products>(
          static_cast<operand_t*>(p.operand_rows) + static_cast<int64_t>(row) * p.ld, p.d,
          p.ld, lane, active, unit_value);
    }
  }
}

// A function-scope __shared__ variable. The emulation defines it as a reference to the
// block's own shared memory, which starts filled with NaN bytes: a read before a write shows.
#ifndef ICD_SHARED
#define ICD_SHARED(type, name) __shared__ type name
#endif
using ReduceScratch = double[Traits::kThreads];

// Block-wide sum of one double per thread in a fixed order (the same bits every run).
__device__ __forceinline__ double block_sum(double v, double* scratch) {
  scratch[threadIdx.x] = v;
  __syncthreads();
  for (int width = Traits::kThreads / 2; width > 0; width >>= 1) {
    if (static_cast<int>(threadIdx.x) < width) scratch[threadIdx.x] += scratch[threadIdx.x + width];
    __syncthreads();
  }
  const double total = scratch[0];
  __syncthreads();
  return total;
}

// The completion counter: the last block to finish reduces the other blocks' results (the
// CUDA programming guide's pattern in "Memory Fence Functions"). Why every read the last block
// makes of another block's results sees that block's final values:
//  - release: each thread writes its results, then fences (__threadfence, fence.sc.gpu), and
//    only after the block barrier that follows does thread 0 increment the counter; so every
//    result of a block is ordered before its increment (fence, then barrier, then atomic).
//  - the counter: atomicAdd returns (number of blocks) - 1 to exactly one block, the one whose
//    increment comes after every other block's increment in the counter's order.
//  - acquire: thread 0 of that block learns it from its atomic, hands it to the block's
//    threads through the barrier, and each thread fences again before its first read (atomic,
//    barrier, fence), so no read of the reduction can be ordered before the counter.
//  - the reads are volatile (read_published): never served from a line that the SM's
//    incoherent L1 cached earlier, and never hoisted above the fence by the compiler.
// The emulation checks both fences: an increment without a preceding fence, or a
// read_published() without a fence after the block's increment, is reported as a misuse.
__device__ __forceinline__ bool last_block_to_finish(unsigned int* blocks_done, bool* flag) {
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) *flag = atomicAdd(blocks_done, 1u) == gridDim.x * gridDim.y - 1;
  __syncthreads();
  if (*flag) __threadfence();
  return *flag;
}

#ifndef ICD_FAST_CHECK_PUBLISHED_READ
#define ICD_FAST_CHECK_PUBLISHED_READ()
#endif

// A value another block wrote before its completion-counter increment (see above).
template <typename T>
__device__ __forceinline__ T read_published(const T* p) {
  ICD_FAST_CHECK_PUBLISHED_READ();
  return *static_cast<const volatile T*>(p);
}

// The statistics of the range's row `local` from its sums over all n columns.
template <typename acc_t>
__device__ __forceinline__ void write_row_statistics(const ForwardParams<acc_t>& p, int local,
                                                     const RowPartial<acc_t>& sums) {
  const RowStats<acc_t> st =
      finalize_row<acc_t>(sums.sum_r, sums.shift_r, sums.sum_c, sums.shift_c, sums.sum_k);
  p.stats.row_lse[local] = st.row_lse;
  p.stats.col_lse[local] = st.col_lse;
  p.stats.row_kl[local] = st.row_kl;
  p.row_ce[local] = st.row_lse - sums.diag;
}

// The last block's reduction of the whole problem's rows to the three scalars, in a fixed
// order.
template <typename acc_t>
__device__ __forceinline__ void reduce_forward_scalars(const ForwardParams<acc_t>& p,
                                                       double* scratch) {
  double ce = 0, kl = 0;
  for (int r = threadIdx.x; r < p.row_count; r += Traits::kThreads) {
    ce += read_published(p.row_ce + r);
    kl += read_published(p.stats.row_kl + r);
  }
  ce = block_sum(ce, scratch) / p.n;
  kl = block_sum(kl, scratch) / p.n;
  if (threadIdx.x == 0) {
    *p.scalars.ce = static_cast<acc_t>(ce);
    *p.scalars.kl = static_cast<acc_t>(kl);
    *p.scalars.loss = static_cast<acc_t>(ce + p.alpha * kl);
  }
}

// ---------------------------------------------------------------------------------------
// Launch 2 of the forward: per-row statistics of the range's rows, then (last block, for the
// whole problem) the three scalars.
template <typename Products, typename acc_t>
__global__ void __launch_bounds__(Traits::kThreads, kTileKernelMinBlocksPerSm)
    forward_kernel(ForwardParams<acc_t> p) {
  ICD_SHARED(typename Products::Storage, tiles);
  ICD_SHARED(ReduceScratch, reduce_scratch);
  ICD_SHARED(bool, is_last);

  const int n = p.n;
  const typename Products::Rows rows = tile_rows<Products, acc_t>(p);
  const auto [row, q] = thread_place();
  const int i0 = p.row_begin + blockIdx.x * Traits::kTileRows, i = i0 + row;
  const bool row_ok = i < p.row_begin + p.row_count;
  const acc_t kappa = static_cast<acc_t>(clamped_scale(*p.log_scale, p.max_scale));
  // Start the shifts at kappa (no rescaling ever needed below kFixedShiftMaxScale).
  const acc_t start = kappa <= kFixedShiftMaxScale ? kappa : static_cast<acc_t>(-INFINITY);
  acc_t shift_r = start, sum_r = 0, shift_c = start, sum_c = 0, sum_k = 0, diag = 0;

  acc_t x[Traits::kColsPerThread], y[Traits::kColsPerThread];
  const int j_end = split_columns_end(p.split, n);
  for (int j0 = split_columns_begin(p.split); j0 < j_end; j0 += Traits::kTileRows) {
    Products::cosine(tiles, rows, i0, j0, x, y);
    for (int m = 0; m < Traits::kColsPerThread; ++m) {
      const int j = j0 + q + Traits::kThreadsPerRow * m;
      if (!row_ok || j >= n) continue;
      const acc_t l_ij = kappa * x[m], l_ji = kappa * y[m];
      add_shifted(l_ij, shift_r, sum_r);
      const acc_t rescale = raise_shift(l_ji, shift_c);  // C and K share the shift
      sum_c *= rescale;
      sum_k *= rescale;
      const acc_t e = exp_acc<acc_t>(l_ji - shift_c);
      sum_c += e;
      sum_k += e * (l_ji - l_ij);
      if (j == i) diag = l_ij;
    }
  }
  // Merge the four threads of the row (only the thread that met j == i holds the diagonal).
  RowPartial<acc_t> sums{shift_r, sum_r, shift_c, sum_c, sum_k, diag};
  for (int mask = 1; mask < Traits::kThreadsPerRow; mask <<= 1) {
    const RowPartial<acc_t> other{shuffle_xor(sums.shift_r, mask), shuffle_xor(sums.sum_r, mask),
                                  shuffle_xor(sums.shift_c, mask), shuffle_xor(sums.sum_c, mask),
                                  shuffle_xor(sums.sum_k, mask), shuffle_xor(sums.diag, mask)};
    merge_partial(sums, other);
  }
  const bool writes = q == 0 && row_ok;
  if (p.split.splits > 1) {
    // Split columns: forward_merge_kernel adds up the splits' sums and reduces the scalars.
    const int64_t slot = static_cast<int64_t>(blockIdx.y) * p.row_count + (i - p.row_begin);
    if (writes) p.partials[slot] = sums;
  } else {
    if (writes) write_row_statistics(p, i - p.row_begin, sums);
    // A row range has no scalars and no counter (the same branch in every block).
    if (p.scalars.loss != nullptr && last_block_to_finish(p.blocks_done, &is_last))
      reduce_forward_scalars(p, reduce_scratch);
  }
}

// Launch 3 of the forward where the columns are split: one thread per row adds up its
// splits' partial sums in split order, then (last block) the three scalars.
template <typename acc_t>
__global__ void __launch_bounds__(Traits::kThreads) forward_merge_kernel(ForwardParams<acc_t> p) {
  ICD_SHARED(ReduceScratch, reduce_scratch);
  ICD_SHARED(bool, is_last);
  const int local = blockIdx.x * Traits::kThreads + threadIdx.x;
  if (local < p.row_count) {
    RowPartial<acc_t> sums = p.partials[local];
    for (int y = 1; y < p.split.splits; ++y)
      merge_partial(sums, p.partials[static_cast<int64_t>(y) * p.row_count + local]);
    write_row_statistics(p, local, sums);
  }
  if (p.scalars.loss != nullptr && last_block_to_finish(p.blocks_done, &is_last))
    reduce_forward_scalars(p, reduce_scratch);
}

// out[k] = (first ? 0 : out[k]) + a * sum.v[k] for the k < min(kSize, left) features of a
// pack; one 16-byte read and write where the rows are packable (then left >= kSize).
template <typename acc_t>
__device__ __forceinline__ void accumulate_pack(acc_t* out, const Pack16<acc_t>& sum, acc_t a,
                                                bool first, int left, bool packed) {
  if (packed) {
    Pack16<acc_t> v = first ? Pack16<acc_t>{} : load_pack(out);
    for (int k = 0; k < Pack16<acc_t>::kSize; ++k) v.v[k] += a * sum.v[k];
    store_pack(out, v);
    return;
  }
  for (int k = 0; k < Pack16<acc_t>::kSize && k < left; ++k)
    out[k] = (first ? acc_t(0) : out[k]) + a * sum.v[k];
}

template <typename T, typename acc_t>
__device__ __forceinline__ void store_as(void* base, int64_t index, acc_t v) {
  static_cast<T*>(base)[index] = static_cast<T>(v);
}

// The logit gradients in the G tiles are G / 2^e, and the sums of their products are
// multiplied by 2^e afterwards (powers of two: exact, no bits change in fp32/fp64 unless a
// scaled G would be subnormal). On the tensor cores the tiles are rounded to fp16, whose
// largest value is 65504 and smallest normal 2^-14 ~ 6.1e-5; 2^e is chosen so that the
// largest |G| possible lands just below 2^15 (headroom above, as much precision as possible
// below). The bound, for any rows i, j, with W_ce = max_i |w_ce_i| and W_kl = max_i |w_kl_i|:
//   |G_ij| <= W_ce + W_kl (1 + 8 kappa),
// since |P_ij - d_ij| <= 1 and |P_ij - Q_ij| <= 1, and in the last term Q_ji <= 1 multiplies
// h_ji - k_j, where h_ji = log(Q_ji / P_ji) = (L_ij - L_ji) + (r_j - c_j) lies in
// [-4 kappa, 4 kappa] (|L| <= kappa, and r_j, c_j both in [log N - kappa, log N + kappa]), and
// k_j, a mean of such log ratios weighted by Q_j (a KL divergence), in [0, 4 kappa].
// Off-diagonal entries are ~ w / N: with the largest weight merely brought into [1, 2) they
// became fp16 subnormals from N ~ 2^14 on (about 6 significant bits at N = 2^18, zero below
// 3e-8); with the bound at 2^14..2^15 they keep 2^14 / (2 + 8 kappa) times more (about 200x
// at kappa = 10, the default max_scale). With torch.amp.GradScaler's upstream gradient of
// 2^16 and unscaled tiles the diagonal G_ii ~ -w_ce would round to inf and every step be
// skipped. A zero or non-finite bound keeps 2^e = 1, so that inf/NaN propagate unchanged.
constexpr int kTileBoundLog2 = 15;  // |G / 2^e| < 2^15 < 65504

template <typename acc_t>
struct RowWeights {
  acc_t ce, kl;
};
template <typename acc_t>
struct ScaledWeights {
  const acc_t* row_ce;  // per-row weights (unscaled), or null: `uniform` for every row
  const acc_t* row_kl;
  RowWeights<acc_t> uniform;  // scaled
  acc_t inv_scale;            // 2^-e
  double scale;               // 2^e
  // The scaled weights of row i.
  __device__ __forceinline__ RowWeights<acc_t> of(int i) const {
    if (row_ce == nullptr) return uniform;
    return {row_ce[i] * inv_scale, row_kl[i] * inv_scale};
  }
};

// 2^e for the largest weight magnitudes over all rows and the scale kappa.
__device__ __forceinline__ double gradient_tile_scale(double largest_ce, double largest_kl,
                                                      double kappa) {
  const double bound = std::fabs(largest_ce) + std::fabs(largest_kl) * (1 + 8 * kappa);
  int exponent = 0;
  if (bound > 0 && std::isfinite(bound)) {
    std::frexp(bound, &exponent);  // bound in [2^(exponent - 1), 2^exponent)
    exponent -= kTileBoundLog2;    // bound / 2^exponent in [2^14, 2^15)
  }
  return std::ldexp(1.0, exponent);
}

template <typename acc_t>
__device__ __forceinline__ ScaledWeights<acc_t> scaled_weights(const BackwardWeights<acc_t>& w,
                                                              int n, double kappa) {
  ScaledWeights<acc_t> out{.row_ce = w.row_ce,
                           .row_kl = w.row_kl,
                           .uniform = {.ce = acc_t(0), .kl = acc_t(0)},
                           .inv_scale = acc_t(1),
                           .scale = 1.0};
  if (w.row_ce != nullptr) {
    out.scale = gradient_tile_scale(w.largest[0], w.largest[1], kappa);
  } else {
    // loss = (1/N) sum_i (CE_i + alpha k_i): every row carries the same weights.
    const acc_t g_loss = w.grad_loss ? *w.grad_loss : acc_t(0);
    const acc_t ce = (g_loss + (w.grad_ce ? *w.grad_ce : acc_t(0))) / static_cast<acc_t>(n);
    const acc_t kl =
        (w.alpha * g_loss + (w.grad_kl ? *w.grad_kl : acc_t(0))) / static_cast<acc_t>(n);
    out.scale = gradient_tile_scale(ce, kl, kappa);
    out.uniform = {static_cast<acc_t>(ce / out.scale), static_cast<acc_t>(kl / out.scale)};
  }
  out.inv_scale = static_cast<acc_t>(1.0 / out.scale);
  return out;
}

// Back through the normalisation for row i (of the range) from its dS and dT (in the first
// split's slots): dz = (dS - s <s, dS>) / max(||z||, eps). The row's four threads (q) share it.
template <typename out_t, typename acc_t>
__device__ __forceinline__ void feature_gradients(const BackwardParams<acc_t>& p, int i, int q,
                                                  bool row_ok) {
  const int n = p.n, d = p.d;
  for (int side = 0; side < 2; ++side) {
    const acc_t* unit_row = p.unit + (static_cast<int64_t>(side) * n + i) * d;
    const acc_t* grad_rows = side == 0 ? p.ds : p.dt;
    void* out = side == 0 ? p.grad_z_s : p.grad_z_t;
    const int64_t at = static_cast<int64_t>(i - p.row_begin) * d;  // of the range's rows
    acc_t dot = 0;
    if (row_ok)
      for (int c = q; c < d; c += Traits::kThreadsPerRow) dot += unit_row[c] * grad_rows[at + c];
    dot = row_group_sum(dot);
    if (row_ok) {
      const acc_t norm = p.norms[side * n + i];
      for (int c = q; c < d; c += Traits::kThreadsPerRow)
        store_as<out_t>(out, at + c, normalize_backward(grad_rows[at + c], unit_row[c], dot, norm));
    }
  }
}

// ---------------------------------------------------------------------------------------
// The backward, one launch: dS_I = kappa sum_J G_IJ T_J and dT_I = kappa sum_J G_JI^T S_J for
// the block's rows of the range, then back through the normalisation, and (last block) the
// range's share of d theta.
template <typename Products, typename out_t, typename acc_t>
__global__ void __launch_bounds__(Traits::kThreads, kTileKernelMinBlocksPerSm)
    backward_kernel(BackwardParams<acc_t> p) {
  ICD_SHARED(typename Products::Storage, tiles);
  ICD_SHARED(ReduceScratch, reduce_scratch);
  ICD_SHARED(bool, is_last);

  const int n = p.n, d = p.d;
  const typename Products::Rows rows = tile_rows<Products, acc_t>(p);
  const int tid = threadIdx.x;
  const auto [row, q] = thread_place();
  const int i0 = p.row_begin + blockIdx.x * Traits::kTileRows, i = i0 + row;
  const int local = i - p.row_begin;  // the row's place in ds, dt and the gradients
  const double log_scale = *p.log_scale;
  const acc_t kappa = static_cast<acc_t>(clamped_scale(log_scale, p.max_scale));
  const ScaledWeights<acc_t> w = scaled_weights(p.weights, n, kappa);
  // kappa, and the weights' 2^e that the G tiles leave out.
  const acc_t a = kappa * static_cast<acc_t>(w.scale);
  const bool row_ok = i < p.row_begin + p.row_count;
  const acc_t r_i = row_ok ? p.stats.row_lse[i] : acc_t(0);
  const acc_t c_i = row_ok ? p.stats.col_lse[i] : acc_t(0);
  const acc_t k_i = row_ok ? p.stats.row_kl[i] : acc_t(0);
  const RowWeights<acc_t> w_i = row_ok ? w.of(i) : RowWeights<acc_t>{acc_t(0), acc_t(0)};
  double dkappa = 0;

  // This split's share of dS and dT (all of it without a split).
  const int64_t split_offset = static_cast<int64_t>(blockIdx.y) * p.row_count * d;
  acc_t* const ds = p.ds + split_offset;
  acc_t* const dt = p.dt + split_offset;
  const bool packed_grads = rows_packable(ds, d) && rows_packable(dt, d);

  acc_t x[Traits::kColsPerThread], y[Traits::kColsPerThread];
  const int j_begin = split_columns_begin(p.split), j_end = split_columns_end(p.split, n);
  for (int j0 = j_begin; j0 < j_end; j0 += Traits::kTileRows) {
    Products::cosine(tiles, rows, i0, j0, x, y);
    for (int m = 0; m < Traits::kColsPerThread; ++m) {
      const int jj = q + Traits::kThreadsPerRow * m, j = j0 + jj;
      acc_t g_ij = 0, g_ji = 0;
      if (row_ok && j < n) {
        const acc_t l_ij = kappa * x[m], l_ji = kappa * y[m];
        const acc_t r_j = p.stats.row_lse[j], c_j = p.stats.col_lse[j], k_j = p.stats.row_kl[j];
        const RowWeights<acc_t> w_j = w.of(j);
        const RowTerms<acc_t> row_i{.r = r_i, .c = c_i, .k = k_i, .w_ce = w_i.ce, .w_kl = w_i.kl};
        const RowTerms<acc_t> row_j{.r = r_j, .c = c_j, .k = k_j, .w_ce = w_j.ce, .w_kl = w_j.kl};
        const LogitGradPair<acc_t> g = logit_grad_pair<acc_t>(
            l_ij, l_ji, row_i, row_j, pair_probabilities<acc_t>(l_ij, l_ji, r_i, c_i, r_j, c_j),
            j == i ? acc_t(1) : acc_t(0));
        g_ij = g.ij;
        g_ji = g.ji;
        dkappa += static_cast<double>(g_ij) * x[m];  // every logit once, as G_ij / 2^e
      }
      tiles.gx[row][jj] = Products::to_operand(g_ij);
      tiles.gy[row][jj] = Products::to_operand(g_ji);
    }
    __syncthreads();
    // The split's first column block writes dS and dT, the others add: no zeroing launch.
    Products::gradient(tiles, rows, j0,
                       [&](int col, const Pack16<acc_t>& sum_s, const Pack16<acc_t>& sum_t) {
      if (!row_ok || col >= d) return;
      const int64_t at = static_cast<int64_t>(local) * d + col;
      accumulate_pack(ds + at, sum_s, a, j0 == j_begin, d - col, packed_grads);
      accumulate_pack(dt + at, sum_t, a, j0 == j_begin, d - col, packed_grads);
    });
  }
  // Split columns: backward_merge_kernel adds up the splits' dS and dT first.
  if (p.split.splits == 1) feature_gradients<out_t>(p, i, q, row_ok);

  const double block_total = block_sum(dkappa, reduce_scratch);
  if (tid == 0) p.block_dkappa[blockIdx.y * gridDim.x + blockIdx.x] = block_total;
  if (last_block_to_finish(p.blocks_done, &is_last)) {
    double total = 0;
    for (int b = tid; b < static_cast<int>(gridDim.x * gridDim.y); b += Traits::kThreads)
      total += read_published(p.block_dkappa + b);
    total = block_sum(total, reduce_scratch);
    if (tid == 0)
      *p.grad_log_scale =
          static_cast<acc_t>(total * w.scale * scale_grad_factor(log_scale, p.max_scale));
  }
}

// The backward's second launch where the columns are split: each row's dS and dT summed over
// the splits in split order, then back through the normalisation.
template <typename out_t, typename acc_t>
__global__ void __launch_bounds__(Traits::kThreads)
    backward_merge_kernel(BackwardParams<acc_t> p) {
  const auto [row, q] = thread_place();
  const int i = p.row_begin + blockIdx.x * Traits::kTileRows + row;
  const bool row_ok = i < p.row_begin + p.row_count;
  if (row_ok) {
    const int64_t at = static_cast<int64_t>(i - p.row_begin) * p.d;
    const int64_t split_size = static_cast<int64_t>(p.row_count) * p.d;
    for (int side = 0; side < 2; ++side) {
      acc_t* grad = side == 0 ? p.ds : p.dt;
      for (int c = q; c < p.d; c += Traits::kThreadsPerRow) {
        acc_t sum = grad[at + c];
        for (int y = 1; y < p.split.splits; ++y) sum += grad[y * split_size + at + c];
        grad[at + c] = sum;
      }
    }
  }
  feature_gradients<out_t>(p, i, q, row_ok);
}

}  // namespace icd_fast::cuda
