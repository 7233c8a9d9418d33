// The parameter structs of the CUDA kernels (icd_kernels.cuh), one per launch. The launcher
// (icd_cuda_launch.h) fills them field by field by name (designated initializers), so that a
// field added or reordered here cannot shift the others' values.
#pragma once

#include <cstdint>

namespace icd_fast::cuda {

// The forward's per-row statistics (T = acc_t, written) or the backward's (T = const acc_t).
template <typename T>
struct RowStatistics {
  T* row_lse;  // r_i
  T* col_lse;  // c_i
  T* row_kl;   // k_i
};

// The forward's three scalars.
template <typename acc_t>
struct LossScalars {
  acc_t* loss;
  acc_t* ce;
  acc_t* kl;
};

// acc_t is the dtype of the statistics and of all arithmetic: double for float64 inputs,
// float for float32, float16 and bfloat16 inputs.
template <typename acc_t>
struct NormalizeParams {
  const void* z_s;
  const void* z_t;
  int64_t s_stride0, s_stride1, t_stride0, t_stride1;
  int n, d;
  acc_t* unit;   // (2, n, d): [s; t]
  acc_t* norms;  // (2, n)
  unsigned int* forward_blocks_done;  // cleared here, so the forward needs no memset launch
  void* operand_rows;  // (2, padded_n, ld) in the products' operand type, or null
  int padded_n, ld;    // n and d where there is no operand copy
};

// The operand rows of the tensor-core products from unit rows (the backward's copy).
template <typename acc_t>
struct OperandRowsParams {
  const acc_t* unit;  // (2, n, d)
  int n, d;
  void* operand_rows;  // (2, padded_n, ld)
  int padded_n, ld;
};

// The column sweep split over the grid's second dimension (small N: more blocks than row
// blocks alone give): block (b, y) takes the column tiles [y tiles, (y + 1) tiles) of the 32
// rows of row block b; its partial sums are merged in the order y = 0, 1, ... by a second
// launch (the same bits every run, whichever block finishes first).
struct ColumnSplit {
  int splits;  // gridDim.y
  int tiles;   // 32-column tiles per split
};
// One row's shifted sums over a set of columns (README "Forward in one pass"), and the
// diagonal logit where the set holds column i.
template <typename acc_t>
struct RowPartial {
  acc_t shift_r, sum_r, shift_c, sum_c, sum_k, diag;
};

// The forward's statistics of rows [row_begin, row_begin + row_count), each row against all
// n columns (the whole problem: row_begin = 0, row_count = n). Block (b, y) owns the 32 rows
// from row_begin + 32 b and the columns of split y; the per-row outputs are indexed from
// row_begin.
template <typename acc_t>
struct ForwardParams {
  const acc_t* unit;
  const void* operand_rows;  // (2, padded_n, ld) for the tensor-core products, else null
  int padded_n, ld;
  const acc_t* log_scale;  // one value
  acc_t alpha, max_scale;
  int n, d;
  int row_begin, row_count;
  ColumnSplit split;
  RowPartial<acc_t>* partials;  // (splits, row_count) where split.splits > 1, else null
  RowStatistics<acc_t> stats;  // (row_count) each
  acc_t* row_ce;               // (row_count): r_i - L_ii, reduced by the last block
  LossScalars<acc_t> scalars;  // all null for a row range: no reduction, no counter
  unsigned int* blocks_done;  // zero before the launch (normalize_kernel clears it)
};

// The upstream weights of the backward: either one pair for every row, from the op's
// upstream gradients (loss = (1/N) sum_i (CE_i + alpha k_i)), or per-row vectors of all n
// rows (the row-range backward of the sharded loss), with their largest magnitudes.
template <typename acc_t>
struct BackwardWeights {
  const acc_t* grad_loss;  // each may be null (= 0)
  const acc_t* grad_ce;
  const acc_t* grad_kl;
  acc_t alpha;
  const acc_t* row_ce;   // (n) per-row weights, or null for the upstream gradients above
  const acc_t* row_kl;
  const acc_t* largest;  // (2): max_i |row_ce_i|, max_i |row_kl_i| (with the vectors)
};

// The backward's gradients of rows [row_begin, row_begin + row_count) (every column's terms
// read from the statistics of all n rows), and their share of d theta.
template <typename acc_t>
struct BackwardParams {
  const acc_t* unit;
  const void* operand_rows;  // (2, padded_n, ld) for the tensor-core products, else null
  int padded_n, ld;
  const acc_t* norms;
  const acc_t* log_scale;
  BackwardWeights<acc_t> weights;
  acc_t max_scale;
  int n, d;
  int row_begin, row_count;
  ColumnSplit split;
  RowStatistics<const acc_t> stats;  // (n) each: all rows' terms
  // (splits, row_count, d) scratch: each split's share of d loss / d s (the splits summed
  // into the first, by backward_merge_kernel where there are several), then d loss / d z_s.
  acc_t* ds;
  acc_t* dt;
  void* grad_z_s;  // (row_count, d) contiguous, input dtype
  void* grad_z_t;
  double* block_dkappa;   // one partial per block (of gridDim.x * gridDim.y)
  acc_t* grad_log_scale;  // one value
  unsigned int* blocks_done;
};

}  // namespace icd_fast::cuda
