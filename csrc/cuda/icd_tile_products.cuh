// The products of the ICD kernels, for one block's 32 rows I against 32 columns J:
//
//   cosine:   x[m] = <s_i, t_j>,  y[m] = <t_i, s_j>   (this thread's row i, columns j)
//   gradient: (G_IJ T_J)[i, c], (G'_IJ S_J)[i, c]  (G, G' staged in shared memory), handed
//             to the kernel in packs of consecutive features c of this thread's row i
//
// Two implementations with one interface, chosen by the kernels' Products parameter:
//   SimtProducts<acc_t>          CUDA-core FMAs in acc_t (float64; float32 by default;
//                                fp16/bf16 where no sm_80+ code runs)
//   TensorCoreProducts<Operand>  WMMA tiles on sm_80+: fp16 and bf16 inputs (16x16x16), and
//                                float32 inputs as TF32 (16x16x8) when torch allows TF32
//                                matmuls. The unit rows and G are rounded to the operand
//                                type; products accumulate in float32.
// Each keeps its shared tiles in a Storage struct that the kernel declares shared. The
// CUDA-core products stage feature chunks of the rows in shared memory; the tensor-core
// products read operand copies of the rows (TileRows::op_s / op_t) from global memory.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#endif

// WMMA on bf16 and tf32 needs sm_80. Device code compiled for an older virtual arch keeps the
// tensor-core functions as traps; the launcher picks them only where the code that runs on
// the device was compiled for this arch or newer (tensor_cores_compiled in
// icd_cuda_launch.h), which a GPU's compute capability alone does not tell.
#define ICD_FAST_TENSOR_CORE_MIN_ARCH 800
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < ICD_FAST_TENSOR_CORE_MIN_ARCH
#define ICD_FAST_NO_TENSOR_CORES 1
#endif

namespace icd_fast::cuda {

struct KernelTraits {
  static constexpr int kTileRows = 32;                  // rows of I (and of J) per tile
  static constexpr int kThreads = 128;                  // 4 warps
  static constexpr int kThreadsPerRow = 4;              // lanes 4r..4r+3 of one warp
  static constexpr int kColsPerThread = kTileRows / kThreadsPerRow;  // 8
  static constexpr int kNormRowsPerBlock = kThreads / 32;  // one warp per row
};
using Traits = KernelTraits;

// This thread's row of the tile and its first column (its columns are q + 4 m).
struct ThreadPlace {
  int row, q;
  // The first feature of this thread's g-th pack of `vec` features in a chunk (packs of the
  // row's four threads interleave, so that a warp's pack reads are contiguous).
  __device__ int pack_feature(int vec, int g) const {
    return vec * (q + KernelTraits::kThreadsPerRow * g);
  }
};
__device__ __forceinline__ ThreadPlace thread_place() {
  return {static_cast<int>(threadIdx.x) / Traits::kThreadsPerRow,
          static_cast<int>(threadIdx.x) % Traits::kThreadsPerRow};
}

// The rows the products read: the unit rows s, t as (n, d) in the accumulate type, and for
// the tensor cores the same rows converted to the operand type, zero-padded to
// (padded_n, ld) with both a multiple of kOperandPad, so that WMMA reads them from global
// memory directly (aligned tiles, no ragged edges, no staging).
template <typename acc_t, typename operand_t>
struct TileRows {
  const acc_t* s;
  const acc_t* t;
  const operand_t* op_s;  // null where the products take no operand rows
  const operand_t* op_t;
  int n, d, ld;
};
constexpr int kOperandPad = 32;
__host__ __device__ constexpr int round_up(int v, int multiple) {
  return (v + multiple - 1) / multiple * multiple;
}

// Up to 16 bytes of consecutive elements, read or written as one LDS.128 / LDG.128 (a
// quarter of the load instructions of scalar code, which is what bounds the CUDA-core
// products). The address must be 16-byte aligned: tiles keep row pitches of a multiple of
// 16 bytes, and global rows are read this way only when rows_packable() says so.
template <typename T>
struct alignas(16) Pack16 {
  static constexpr int kSize = 16 / sizeof(T);
  T v[kSize];
};

// The emulation in tests/ defines this to report a misaligned vector access, which on a GPU
// is a "misaligned address" fault.
#ifndef ICD_FAST_CHECK_PACK_ALIGNMENT
#define ICD_FAST_CHECK_PACK_ALIGNMENT(pointer)
#endif

template <typename T>
__device__ __forceinline__ Pack16<T> load_pack(const T* p) {
  ICD_FAST_CHECK_PACK_ALIGNMENT(p);
  return *reinterpret_cast<const Pack16<T>*>(p);
}
template <typename T>
__device__ __forceinline__ void store_pack(T* p, const Pack16<T>& v) {
  ICD_FAST_CHECK_PACK_ALIGNMENT(p);
  *reinterpret_cast<Pack16<T>*>(p) = v;
}

// Whether every row of a (rows, d) matrix at `base` starts on a 16-byte boundary, so that
// packs of 16 / sizeof(T) features can be read from it.
template <typename T>
__device__ __forceinline__ bool rows_packable(const T* base, int d) {
  return d % Pack16<T>::kSize == 0 && reinterpret_cast<uintptr_t>(base) % 16 == 0;
}

// Copies rows [r0, r0 + 32) x features [c0, c0 + kChunk) of a (n, d) matrix into a shared
// tile, zero outside the matrix. Reads packs where the rows allow.
template <int kChunk, typename src_t>
__device__ __forceinline__ void stage_rows(src_t* tile, int pitch, const src_t* rows, int n,
                                           int d, int r0, int c0) {
  using Pack = Pack16<src_t>;
  static_assert(kChunk % Pack::kSize == 0, "a staged chunk is a whole number of packs");
  if (rows_packable(rows, d)) {
    // Packs never straddle d here: d and c0 are multiples of the pack size.
    constexpr int kPacksPerRow = kChunk / Pack::kSize;
    for (int e = threadIdx.x; e < Traits::kTileRows * kPacksPerRow; e += Traits::kThreads) {
      const int r = e / kPacksPerRow, c = (e % kPacksPerRow) * Pack::kSize;
      const int gr = r0 + r, col = c0 + c;
      Pack pack{};
      if (gr < n && col < d) pack = load_pack(rows + static_cast<int64_t>(gr) * d + col);
      for (int k = 0; k < Pack::kSize; ++k) tile[r * pitch + c + k] = pack.v[k];
    }
    return;
  }
  for (int e = threadIdx.x; e < Traits::kTileRows * kChunk; e += Traits::kThreads) {
    const int r = e / kChunk, c = e % kChunk, gr = r0 + r, col = c0 + c;
    tile[r * pitch + c] = (gr < n && col < d) ? rows[static_cast<int64_t>(gr) * d + col] : src_t(0);
  }
}

// ---------------------------------------------------------------------------------------
template <typename acc_t>
struct SimtProducts {
  using operand_t = acc_t;  // the dtype of the staged G tiles
  using Pack = Pack16<acc_t>;
  static constexpr int kVec = Pack::kSize;
  // 16 features per step in double keeps the backward's shared memory under 48 KB.
  static constexpr int kChunk = sizeof(acc_t) == 8 ? 16 : 32;
  // Pitches of kVec past a whole row keep every pack 16-byte aligned, and the rows that one
  // warp reads at once (8 rows i; 4 rows j) on distinct banks.
  static constexpr int kPitch = kChunk + kVec;
  static constexpr int kGPitch = Traits::kTileRows + kVec;
  // gradient(): each thread's features of a chunk, as packs at pack_feature(kVec, g).
  static constexpr int kGroups = kChunk / (Traits::kThreadsPerRow * kVec);
  static_assert(kGroups >= 1 && kChunk % (Traits::kThreadsPerRow * kVec) == 0);
  struct Storage {
    alignas(16) acc_t si[Traits::kTileRows][kPitch];
    alignas(16) acc_t ti[Traits::kTileRows][kPitch];
    alignas(16) acc_t sj[Traits::kTileRows][kPitch];
    alignas(16) acc_t tj[Traits::kTileRows][kPitch];
    alignas(16) acc_t gx[Traits::kTileRows][kGPitch];  // G_ij
    alignas(16) acc_t gy[Traits::kTileRows][kGPitch];  // G'_ij = G_ji
  };
  __device__ static acc_t to_operand(acc_t v) { return v; }

  static constexpr bool kOperandRows = false;  // reads rows.s and rows.t only
  using Rows = TileRows<acc_t, operand_t>;

  __device__ static void cosine(Storage& sm, const Rows& rows, int i0, int j0,
                                acc_t x[Traits::kColsPerThread],
                                acc_t y[Traits::kColsPerThread]) {
    const ThreadPlace at = thread_place();
    const acc_t *s = rows.s, *t = rows.t;
    const int n = rows.n, d = rows.d;
    for (int m = 0; m < Traits::kColsPerThread; ++m) x[m] = y[m] = acc_t(0);
    for (int c0 = 0; c0 < d; c0 += kChunk) {
      stage_rows<kChunk>(&sm.si[0][0], kPitch, s, n, d, i0, c0);
      stage_rows<kChunk>(&sm.ti[0][0], kPitch, t, n, d, i0, c0);
      stage_rows<kChunk>(&sm.sj[0][0], kPitch, s, n, d, j0, c0);
      stage_rows<kChunk>(&sm.tj[0][0], kPitch, t, n, d, j0, c0);
      __syncthreads();
      for (int c = 0; c < kChunk; c += kVec) {
        const Pack a = load_pack(&sm.si[at.row][c]), b = load_pack(&sm.ti[at.row][c]);
        for (int m = 0; m < Traits::kColsPerThread; ++m) {
          const int jj = at.q + Traits::kThreadsPerRow * m;
          const Pack tj = load_pack(&sm.tj[jj][c]), sj = load_pack(&sm.sj[jj][c]);
          for (int k = 0; k < kVec; ++k) {
            x[m] += a.v[k] * tj.v[k];
            y[m] += b.v[k] * sj.v[k];
          }
        }
      }
      __syncthreads();
    }
  }

  // Calls emit(feature, gs, gt) for each pack of this thread's features of each chunk, with
  // gs = (G_IJ T_J)[row, feature + k] and gt = (G'_IJ S_J)[row, feature + k], k < kVec.
  template <typename Emit>
  __device__ static void gradient(Storage& sm, const Rows& rows, int j0, Emit emit) {
    const ThreadPlace at = thread_place();
    const acc_t *s = rows.s, *t = rows.t;
    const int n = rows.n, d = rows.d;
    for (int c0 = 0; c0 < d; c0 += kChunk) {
      stage_rows<kChunk>(&sm.sj[0][0], kPitch, s, n, d, j0, c0);
      stage_rows<kChunk>(&sm.tj[0][0], kPitch, t, n, d, j0, c0);
      __syncthreads();
      Pack sum_s[kGroups] = {}, sum_t[kGroups] = {};
      for (int j = 0; j < Traits::kTileRows; j += kVec) {
        const Pack gs = load_pack(&sm.gx[at.row][j]), gt = load_pack(&sm.gy[at.row][j]);
        for (int k = 0; k < kVec; ++k)
          for (int g = 0; g < kGroups; ++g) {
            const int c = at.pack_feature(kVec, g);
            const Pack tj = load_pack(&sm.tj[j + k][c]), sj = load_pack(&sm.sj[j + k][c]);
            for (int e = 0; e < kVec; ++e) {
              sum_s[g].v[e] += gs.v[k] * tj.v[e];
              sum_t[g].v[e] += gt.v[k] * sj.v[e];
            }
          }
      }
      for (int g = 0; g < kGroups; ++g)
        emit(c0 + at.pack_feature(kVec, g), sum_s[g], sum_t[g]);
      __syncthreads();
    }
  }
};

// ---------------------------------------------------------------------------------------
// Tensor-core operands: the element type of the operand rows and G tiles, the WMMA fragment
// type, the k of one mma and the G tiles' row pitch (a multiple of 16 bytes that keeps every
// 16-row and k-step offset 32-byte aligned).
struct Fp16Operand {
  using stored_t = __half;
  using fragment_t = __half;
  static constexpr int kK = 16, kPitch = 40;
  __device__ static stored_t from_float(float v) { return __float2half_rn(v); }
};
struct Bf16Operand {
  using stored_t = __nv_bfloat16;
  using fragment_t = __nv_bfloat16;
  static constexpr int kK = 16, kPitch = 40;
  __device__ static stored_t from_float(float v) { return __float2bfloat16_rn(v); }
};
struct Tf32Operand {
  using stored_t = float;
#ifndef ICD_FAST_NO_TENSOR_CORES
  using fragment_t = nvcuda::wmma::precision::tf32;
#else
  using fragment_t = float;
#endif
  static constexpr int kK = 8, kPitch = 36;
  __device__ static stored_t from_float(float v) {
#ifndef ICD_FAST_NO_TENSOR_CORES
    return nvcuda::wmma::__float_to_tf32(v);
#else
    return v;
#endif
  }
};

// The tensor-core operand of an input dtype.
template <typename scalar_t>
struct TensorCoreOperandOf;
template <>
struct TensorCoreOperandOf<c10::Half> {
  using type = Fp16Operand;
};
template <>
struct TensorCoreOperandOf<c10::BFloat16> {
  using type = Bf16Operand;
};
template <>
struct TensorCoreOperandOf<float> {
  using type = Tf32Operand;
};

template <typename Operand>
struct TensorCoreProducts {
  using operand_t = typename Operand::stored_t;
  using fragment_t = typename Operand::fragment_t;
  static constexpr int kK = Operand::kK, kPitch = Operand::kPitch;
  static constexpr int kChunk = 32;     // features per gradient step (two warps' 16 columns)
  static constexpr int kOutPitch = 36;  // float32 tile pitch: a multiple of 4 elements
  static_assert(kOperandPad % kChunk == 0 && kOperandPad % kK == 0);
  // WMMA needs 32-byte aligned tile pointers: every 16-row and 16-column offset used below
  // keeps that for these pitches, and for the padded operand rows (ld a multiple of 32).
  struct Storage {
    alignas(32) operand_t gx[Traits::kTileRows][kPitch];  // G_ij
    alignas(32) operand_t gy[Traits::kTileRows][kPitch];  // G'_ij = G_ji
    alignas(32) float out_x[Traits::kTileRows][kOutPitch];
    alignas(32) float out_y[Traits::kTileRows][kOutPitch];
  };
  __device__ static operand_t to_operand(float v) { return Operand::from_float(v); }
  static constexpr bool kOperandRows = true;  // reads rows.op_s, rows.op_t (padded)
  using Rows = TileRows<float, operand_t>;

  __device__ static void cosine(Storage& sm, const Rows& rows, int i0, int j0,
                                float x[Traits::kColsPerThread],
                                float y[Traits::kColsPerThread]) {
#ifdef ICD_FAST_NO_TENSOR_CORES
    __trap();
#else
    namespace wmma = nvcuda::wmma;
    const int warp = threadIdx.x / 32, wi = 16 * (warp / 2), wj = 16 * (warp % 2);
    const int64_t ld = rows.ld;
    const operand_t* s_i = rows.op_s + (i0 + wi) * ld;
    const operand_t* t_i = rows.op_t + (i0 + wi) * ld;
    const operand_t* s_j = rows.op_s + (j0 + wj) * ld;
    const operand_t* t_j = rows.op_t + (j0 + wj) * ld;
    wmma::fragment<wmma::accumulator, 16, 16, kK, float> fx, fy;
    wmma::fill_fragment(fx, 0.f);
    wmma::fill_fragment(fy, 0.f);
    for (int k = 0; k < rows.ld; k += kK) {
      // X = S_I T_J^T and Y = T_I S_J^T: B[k][j] = T_J[j][k] is T_J read column-major.
      wmma::fragment<wmma::matrix_a, 16, 16, kK, fragment_t, wmma::row_major> a;
      wmma::fragment<wmma::matrix_b, 16, 16, kK, fragment_t, wmma::col_major> b;
      wmma::load_matrix_sync(a, s_i + k, rows.ld);
      wmma::load_matrix_sync(b, t_j + k, rows.ld);
      wmma::mma_sync(fx, a, b, fx);
      wmma::load_matrix_sync(a, t_i + k, rows.ld);
      wmma::load_matrix_sync(b, s_j + k, rows.ld);
      wmma::mma_sync(fy, a, b, fy);
    }
    wmma::store_matrix_sync(&sm.out_x[wi][wj], fx, kOutPitch, wmma::mem_row_major);
    wmma::store_matrix_sync(&sm.out_y[wi][wj], fy, kOutPitch, wmma::mem_row_major);
    __syncthreads();
    const ThreadPlace at = thread_place();
    for (int m = 0; m < Traits::kColsPerThread; ++m) {
      x[m] = sm.out_x[at.row][at.q + Traits::kThreadsPerRow * m];
      y[m] = sm.out_y[at.row][at.q + Traits::kThreadsPerRow * m];
    }
    __syncthreads();  // out_x / out_y are free again
#endif
  }

  template <typename Emit>
  __device__ static void gradient(Storage& sm, const Rows& rows, int j0, Emit emit) {
#ifdef ICD_FAST_NO_TENSOR_CORES
    __trap();
#else
    namespace wmma = nvcuda::wmma;
    using Pack = Pack16<float>;
    const int warp = threadIdx.x / 32, wi = 16 * (warp / 2), wc = 16 * (warp % 2);
    const int64_t ld = rows.ld;
    const ThreadPlace at = thread_place();
    for (int c0 = 0; c0 < rows.d; c0 += kChunk) {
      wmma::fragment<wmma::accumulator, 16, 16, kK, float> fs, ft;
      wmma::fill_fragment(fs, 0.f);
      wmma::fill_fragment(ft, 0.f);
      for (int k = 0; k < Traits::kTileRows; k += kK) {
        // (G_IJ T_J)[i][c] = sum_j G[i][j] T_J[j][c]: B is T_J read row-major.
        wmma::fragment<wmma::matrix_a, 16, 16, kK, fragment_t, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, kK, fragment_t, wmma::row_major> b;
        const int64_t b_offset = (j0 + k) * ld + c0 + wc;
        wmma::load_matrix_sync(a, &sm.gx[wi][k], kPitch);
        wmma::load_matrix_sync(b, rows.op_t + b_offset, rows.ld);
        wmma::mma_sync(fs, a, b, fs);
        wmma::load_matrix_sync(a, &sm.gy[wi][k], kPitch);
        wmma::load_matrix_sync(b, rows.op_s + b_offset, rows.ld);
        wmma::mma_sync(ft, a, b, ft);
      }
      wmma::store_matrix_sync(&sm.out_x[wi][wc], fs, kOutPitch, wmma::mem_row_major);
      wmma::store_matrix_sync(&sm.out_y[wi][wc], ft, kOutPitch, wmma::mem_row_major);
      __syncthreads();
      for (int g = 0; g < kChunk / (Traits::kThreadsPerRow * Pack::kSize); ++g) {
        const int c = at.pack_feature(Pack::kSize, g);
        emit(c0 + c, load_pack(&sm.out_x[at.row][c]), load_pack(&sm.out_y[at.row][c]));
      }
      __syncthreads();
    }
#endif
  }
};

}  // namespace icd_fast::cuda
