// Fused ICD loss on the CPU: forward and backward without any N x N buffer.
//
// The logit matrix L = kappa S T^T is cut into square tiles. Each unordered tile pair {I, J}
// (I <= J) is handled once per pass: both tiles L_IJ and L_JI are formed with one BLAS call
// each, so every logit is computed (and exponentiated) exactly once per pass. A tile pair
// feeds the statistics (forward) or gradients (backward) of rows I and of rows J. The pairs
// are run in rounds in which no two pairs share a tile (TileSchedule), so the pairs of a
// round write disjoint rows: they update the shared row statistics and the gradient in place,
// with no private copies per worker and no merge. Extra memory is therefore the outputs plus
// a few tiles per busy worker, whatever the thread count, and every row sees its tile pairs
// in the same order on every call and at every thread count: the result is the same bits.
//
// Tiles are stored as cos_x[i][j] = <s_i, t_j> and cos_y[i][j] = <s_j, t_i> (i in I, j in J),
// so L_ij and L_ji of the same pair sit at the same index and the inner loops run contiguously
// over j in both.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ops/addmm_cpu_dispatch.h>
#include <ATen/ops/mm_cpu_dispatch.h>
#include <c10/util/ParallelGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <exception>
#include <limits>
#include <type_traits>
#include <memory>
#include <optional>
#include <utility>
#include <vector>

#include "../icd_checks.h"
#include "../icd_math.h"
#include "cpu_isa.h"

#include <omp.h>

namespace icd_fast::cpu {
namespace {

// Tile edge: a 128 x 128 fp32 tile is 64 KiB, and four of them (two logit tiles, two gradient
// tiles) stay in a core's L2.
constexpr int64_t kTile = 128;

// One tile pair {I, J}: rows [i0, i0 + bi) and [j0, j0 + bj). slot is the pair's place in its
// round, which no other pair of that round shares (per-slot sums are free of races).
struct TilePair {
  int64_t i0, bi, j0, bj;
  bool diagonal;
  int64_t slot;
};

// The unordered tile pairs, grouped into rounds whose pairs touch pairwise disjoint tiles.
// Round 0 holds the diagonal pairs {I, I}; the off-diagonal pairs follow the circle method of
// round-robin tournaments: with an even count M of tiles (one empty tile added when the count
// is odd), tile M - 1 stays put while the others rotate, and each of the M - 1 rounds pairs
// every tile with another one it has not met yet.
struct TileSchedule {
  int64_t n;
  int64_t num_tiles;
  std::vector<std::pair<int32_t, int32_t>> pairs;  // round after round
  std::vector<int64_t> round_begin;                // round r: pairs[round_begin[r], [r + 1])

  explicit TileSchedule(int64_t n_rows) : n(n_rows), num_tiles((n_rows + kTile - 1) / kTile) {
    pairs.reserve(num_tiles * (num_tiles + 1) / 2);
    round_begin.push_back(0);
    for (int64_t a = 0; a < num_tiles; ++a) pairs.emplace_back(a, a);
    round_begin.push_back(static_cast<int64_t>(pairs.size()));
    const int64_t even = num_tiles + (num_tiles % 2);
    for (int64_t round = 0; round + 1 < even; ++round) {
      for (int64_t k = 0; k < even / 2; ++k) {
        const int64_t a = k == 0 ? even - 1 : (round + k) % (even - 1);
        const int64_t b = k == 0 ? round : (round - k + even - 1) % (even - 1);
        if (a < num_tiles && b < num_tiles) pairs.emplace_back(std::min(a, b), std::max(a, b));
      }
      round_begin.push_back(static_cast<int64_t>(pairs.size()));
    }
  }
  int64_t num_rounds() const { return static_cast<int64_t>(round_begin.size()) - 1; }
  // The most pairs one round holds (the diagonal round): the number of slots.
  int64_t max_round_size() const { return num_tiles; }
  int64_t tile_begin(int64_t tile) const { return tile * kTile; }
  // Edge of the largest tile (smaller than kTile for small batches).
  int64_t max_tile() const { return std::min(kTile, n); }
  int64_t tile_size(int64_t tile) const { return std::min(kTile, n - tile * kTile); }
  TilePair pair(int64_t round, int64_t q) const {
    const auto [ti, tj] = pairs[q];
    return {tile_begin(ti), tile_size(ti), tile_begin(tj), tile_size(tj), ti == tj,
            q - round_begin[round]};
  }
};

// Scratch memory a worker fully overwrites before reading: left uninitialised, since zeroing
// it costs more than the whole loss at small N.
template <typename T>
std::unique_ptr<T[]> scratch_buffer(int64_t size) {
  return std::unique_ptr<T[]>(new T[size]);
}

// A row-major (rows x cols) matrix in a worker's scratch buffer, as a tensor for BLAS.
// torch's BLAS is linked statically and reachable only through ATen's ops; the at::cpu::
// entry points call the CPU kernels directly, without a trip through the dispatcher.
template <typename acc_t>
at::Tensor matrix_view(acc_t* data, int64_t rows, int64_t cols) {
  return at::from_blob(data, {rows, cols}, at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value));
}

// cos_x = S_I T_J^T and cos_y = T_I S_J^T, row-major bi x bj. s and t are the normalised
// features (n x d tensors).
template <typename acc_t>
void form_tiles(const at::Tensor& s, const at::Tensor& t, int64_t i0, int64_t bi, int64_t j0,
                int64_t bj, bool diagonal, acc_t* cos_x, acc_t* cos_y) {
  at::Tensor x = matrix_view(cos_x, bi, bj);
  at::cpu::mm_out(x, s.narrow(0, i0, bi), t.narrow(0, j0, bj).t());
  if (diagonal) {
    // Mirror instead of a second product, so that L_ij and L_ji read the very same values.
    for (int64_t i = 0; i < bi; ++i)
      for (int64_t j = 0; j < bj; ++j) cos_y[i * bj + j] = cos_x[j * bj + i];
  } else {
    at::Tensor y = matrix_view(cos_y, bi, bj);
    at::cpu::mm_out(y, t.narrow(0, i0, bi), s.narrow(0, j0, bj).t());
  }
}

// Calls work(begin, end) on ranges that cover [begin, end) on the configured threads, like
// at::parallel_for with a grain of 1, but always from inside an OpenMP parallel region when
// more than one thread is configured, even for a single item. The BLAS calls of the tile
// products then always see a parallel region and run single-threaded: a multi-threaded BLAS
// splits a product differently for different thread counts (MKL does on Intel CPUs), which
// would make the results depend on the thread count.
template <typename Fn>
void parallel_tiles(int64_t begin, int64_t end, const Fn& work) {
  if (end <= begin) return;
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), end - begin);
  if (threads <= 1 || at::in_parallel_region()) {
    work(begin, end);
    return;
  }
  const int64_t team = at::get_num_threads();
  std::exception_ptr failure;
#pragma omp parallel num_threads(team)
  {
    const int64_t worker = omp_get_thread_num(), workers = omp_get_num_threads();
    const int64_t chunk = (end - begin + workers - 1) / workers;
    const int64_t lo = begin + worker * chunk, hi = std::min(end, lo + chunk);
    const c10::ParallelGuard in_region(true);  // nested at::parallel_for run inline
    if (lo < hi) {
      try {
        work(lo, hi);
      } catch (...) {
#pragma omp critical(icd_fast_parallel_tiles_failure)
        if (!failure) failure = std::current_exception();
      }
    }
  }
  if (failure) std::rethrow_exception(failure);
}

// Calls fn(pair, cos_x, cos_y, scratch) for every tile pair, round after round, with both
// cosine tiles of the pair already formed. The pairs of a round run in parallel; each busy
// worker holds two cosine tiles and scratch_size elements of its own scratch, allocated for
// the round, so that only the workers a round can keep busy hold any.
template <typename acc_t, typename Fn>
void for_each_formed_pair(const TileSchedule& plan, const at::Tensor& s, const at::Tensor& t,
                          int64_t scratch_size, const Fn& fn) {
  const int64_t tile = plan.max_tile();
  for (int64_t round = 0; round < plan.num_rounds(); ++round) {
    parallel_tiles(plan.round_begin[round], plan.round_begin[round + 1],
                   [&](int64_t begin, int64_t end) {
      auto cos_x = scratch_buffer<acc_t>(tile * tile), cos_y = scratch_buffer<acc_t>(tile * tile);
      auto scratch = scratch_buffer<acc_t>(scratch_size);
      for (int64_t q = begin; q < end; ++q) {
        const TilePair pair = plan.pair(round, q);
        form_tiles(s, t, pair.i0, pair.bi, pair.j0, pair.bj, pair.diagonal, cos_x.get(),
                   cos_y.get());
        fn(pair, cos_x.get(), cos_y.get(), scratch.get());
      }
    });
  }
}

// The row tiles of rows [row_begin, row_begin + row_count) of an n-row problem, each against
// every column tile of the n columns: the work of one rank of the sharded loss. Each row
// tile belongs to one worker, which runs over the column tiles in order, so every row's sums
// are formed in the same order whatever the thread count.
struct RowRange {
  int64_t n, begin, count;
  int64_t num_row_tiles() const { return (count + kTile - 1) / kTile; }
  int64_t num_col_tiles() const { return (n + kTile - 1) / kTile; }
  int64_t row_tile_begin(int64_t tile) const { return begin + tile * kTile; }
  int64_t row_tile_size(int64_t tile) const { return std::min(kTile, count - tile * kTile); }
  int64_t col_tile_size(int64_t tile) const { return std::min(kTile, n - tile * kTile); }
};

// Calls fn(i0, bi, cos_x, cos_y, scratch) once per row tile [i0, i0 + bi), on the worker that
// owns it, with two tile-sized buffers for the cosine tiles and scratch_size elements of
// scratch; fn sweeps the column tiles itself.
template <typename acc_t, typename Fn>
void for_each_row_tile(const RowRange& range, int64_t scratch_size, const Fn& fn) {
  const int64_t tile = kTile;
  parallel_tiles(0, range.num_row_tiles(), [&](int64_t begin, int64_t end) {
    auto cos_x = scratch_buffer<acc_t>(tile * tile), cos_y = scratch_buffer<acc_t>(tile * tile);
    auto scratch = scratch_buffer<acc_t>(scratch_size);
    for (int64_t q = begin; q < end; ++q)
      fn(range.row_tile_begin(q), range.row_tile_size(q), cos_x.get(), cos_y.get(),
         scratch.get());
  });
}

// ---------------------------------------------------------------------------------------
// Forward

// Running sums over the logits seen so far, per row. With the online maximum each sum
// carries its own shift; with the fixed shift all shifts are kappa and never change.
struct PartialSums {
  std::vector<double> row_sum, col_sum, kl_sum, row_shift, col_shift;
  PartialSums(int64_t n, double initial_shift)
      : row_sum(n, 0.0), col_sum(n, 0.0), kl_sum(n, 0.0), row_shift(n, initial_shift),
        col_shift(n, initial_shift) {}
};

// Adds one tile pair to the partial sums. kBothHalves is false on a diagonal tile, where
// cos_y is the mirror of cos_x and the X half alone already covers every logit once.
//
// kColumns is false for a row owner (the sharded loss): it adds only the sums of its own rows
// i (R_i from the X half, C_i and K_i from the Y half) and leaves the column side j to the
// owner of row j.
template <typename acc_t, bool kBothHalves, bool kOnlineMax, bool kColumns = true>
ICD_ALWAYS_INLINE void accumulate_tile(const acc_t* cos_x, const acc_t* cos_y, int64_t bi, int64_t bj,
                     acc_t kappa, int64_t i0, int64_t j0, PartialSums& p, acc_t* scratch) {
  static_assert(kColumns || kBothHalves, "a row owner needs both halves of every tile");
  // Column partials of the tile (indexed by j): C_j and K_j from the X half, R_j from Y.
  acc_t* col_c = scratch;
  acc_t* col_k = scratch + bj;
  acc_t* col_r = scratch + 2 * bj;
  // Shifts per column j (online only): for C_j/K_j and for R_j.
  acc_t* shift_cj = scratch + 3 * bj;
  acc_t* shift_rj = scratch + 4 * bj;
  std::fill(scratch, scratch + 3 * bj, acc_t(0));

  if constexpr (kOnlineMax) {
    // Pass 1: raise every shift this tile touches to the tile's maximum.
    const acc_t lowest = -std::numeric_limits<acc_t>::infinity();
    std::fill(shift_cj, shift_cj + bj, lowest);
    std::fill(shift_rj, shift_rj + bj, lowest);
    for (int64_t i = 0; i < bi; ++i) {
      acc_t max_x = lowest, max_y = lowest;
      for (int64_t j = 0; j < bj; ++j) {
        const acc_t x = kappa * cos_x[i * bj + j];
        const acc_t y = kappa * cos_y[i * bj + j];
        max_x = x > max_x ? x : max_x;
        if (kColumns) shift_cj[j] = x > shift_cj[j] ? x : shift_cj[j];
        if (kBothHalves) {
          max_y = y > max_y ? y : max_y;
          if (kColumns) shift_rj[j] = y > shift_rj[j] ? y : shift_rj[j];
        }
      }
      p.row_sum[i0 + i] *= raise_shift<double>(max_x, p.row_shift[i0 + i]);
      if (kBothHalves) {
        const double rescale = raise_shift<double>(max_y, p.col_shift[i0 + i]);
        p.col_sum[i0 + i] *= rescale;
        p.kl_sum[i0 + i] *= rescale;
      }
    }
    for (int64_t j = 0; kColumns && j < bj; ++j) {
      const double rescale = raise_shift<double>(shift_cj[j], p.col_shift[j0 + j]);
      p.col_sum[j0 + j] *= rescale;
      p.kl_sum[j0 + j] *= rescale;
      if (kBothHalves) p.row_sum[j0 + j] *= raise_shift<double>(shift_rj[j], p.row_shift[j0 + j]);
      shift_cj[j] = static_cast<acc_t>(p.col_shift[j0 + j]);
      shift_rj[j] = static_cast<acc_t>(p.row_shift[j0 + j]);
    }
  }

  // Pass 2: the exponentials. With the fixed shift one exp per logit serves both the row
  // sum and the column sum it belongs to.
  const acc_t fixed_shift = kappa;
  for (int64_t i = 0; i < bi; ++i) {
    const acc_t* xr = cos_x + i * bj;
    const acc_t* yr = cos_y + i * bj;
    const acc_t shift_ri = static_cast<acc_t>(p.row_shift[i0 + i]);
    const acc_t shift_ci = static_cast<acc_t>(p.col_shift[i0 + i]);
    acc_t row_r = 0, row_c = 0, row_k = 0;
#pragma omp simd reduction(+ : row_r, row_c, row_k)
    for (int64_t j = 0; j < bj; ++j) {
      const acc_t x = kappa * xr[j];
      const acc_t y = kappa * yr[j];
      acc_t ex_row, ex_col = acc_t(0);
      if constexpr (kOnlineMax) {
        ex_row = exp_acc<acc_t>(x - shift_ri);
        if constexpr (kColumns) ex_col = exp_acc<acc_t>(x - shift_cj[j]);
      } else {
        ex_row = ex_col = exp_acc<acc_t>(x - fixed_shift);
      }
      row_r += ex_row;
      if constexpr (kColumns) {
        col_c[j] += ex_col;
        col_k[j] += ex_col * (x - y);
      }
      if constexpr (kBothHalves) {
        acc_t ey_row = acc_t(0), ey_col;
        if constexpr (kOnlineMax) {
          if constexpr (kColumns) ey_row = exp_acc<acc_t>(y - shift_rj[j]);
          ey_col = exp_acc<acc_t>(y - shift_ci);
        } else {
          ey_row = ey_col = exp_acc<acc_t>(y - fixed_shift);
        }
        if constexpr (kColumns) col_r[j] += ey_row;
        row_c += ey_col;
        row_k += ey_col * (y - x);
      }
    }
    p.row_sum[i0 + i] += row_r;
    p.col_sum[i0 + i] += row_c;
    p.kl_sum[i0 + i] += row_k;
  }
  for (int64_t j = 0; kColumns && j < bj; ++j) {
    p.col_sum[j0 + j] += col_c[j];
    p.kl_sum[j0 + j] += col_k[j];
    p.row_sum[j0 + j] += col_r[j];
  }
}

// Fills the per-row statistics and diag_cos[i] = <s_i, t_i> (read off the diagonal tiles).
template <typename acc_t, bool kOnlineMax>
void forward_statistics(const at::Tensor& s, const at::Tensor& t, acc_t kappa, acc_t* row_lse,
                        acc_t* col_lse, acc_t* row_kl, acc_t* diag_cos) {
  const int64_t n = s.size(0);
  const TileSchedule plan(n);
  const double initial_shift =
      kOnlineMax ? -std::numeric_limits<double>::infinity() : static_cast<double>(kappa);
  PartialSums sums(n, initial_shift);

  for_each_formed_pair<acc_t>(
      plan, s, t, 5 * plan.max_tile(),
      [&](const TilePair& p, acc_t* cos_x, acc_t* cos_y, acc_t* scratch) {
        if (p.diagonal)
          for (int64_t i = 0; i < p.bi; ++i) diag_cos[p.i0 + i] = cos_x[i * p.bj + i];
        run_with_best_isa([&]() ICD_INLINE_LAMBDA {
          if (p.diagonal)
            accumulate_tile<acc_t, false, kOnlineMax>(cos_x, cos_y, p.bi, p.bj, kappa, p.i0,
                                                      p.j0, sums, scratch);
          else
            accumulate_tile<acc_t, true, kOnlineMax>(cos_x, cos_y, p.bi, p.bj, kappa, p.i0,
                                                     p.j0, sums, scratch);
        });
      });

  at::parallel_for(0, n, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const RowStats<acc_t> st = finalize_row<acc_t>(sums.row_sum[i], sums.row_shift[i],
                                                      sums.col_sum[i], sums.col_shift[i],
                                                      sums.kl_sum[i]);
      row_lse[i] = st.row_lse;
      col_lse[i] = st.col_lse;
      row_kl[i] = st.row_kl;
    }
  });
}

// The statistics of rows [range.begin, range.begin + range.count) of the n-row problem, and
// their CE_i = r_i - L_ii: each row tile against all n columns (row ownership, 2 B N D
// multiply-adds for B rows).
template <typename acc_t, bool kOnlineMax>
void forward_row_statistics(const at::Tensor& s, const at::Tensor& t, acc_t kappa,
                            const RowRange& range, acc_t* row_lse, acc_t* col_lse,
                            acc_t* row_kl, acc_t* row_ce) {
  const double initial_shift =
      kOnlineMax ? -std::numeric_limits<double>::infinity() : static_cast<double>(kappa);
  for_each_row_tile<acc_t>(range, 5 * kTile, [&](int64_t i0, int64_t bi, acc_t* cos_x,
                                                 acc_t* cos_y, acc_t* scratch) {
    PartialSums sums(bi, initial_shift);
    std::vector<acc_t> diag_cos(bi, acc_t(0));
    for (int64_t col_tile = 0; col_tile < range.num_col_tiles(); ++col_tile) {
      const int64_t j0 = col_tile * kTile, bj = range.col_tile_size(col_tile);
      form_tiles(s, t, i0, bi, j0, bj, false, cos_x, cos_y);
      for (int64_t i = 0; i < bi; ++i) {
        const int64_t j = i0 + i - j0;
        if (j >= 0 && j < bj) diag_cos[i] = cos_x[i * bj + j];
      }
      run_with_best_isa([&]() ICD_INLINE_LAMBDA {
        accumulate_tile<acc_t, true, kOnlineMax, false>(cos_x, cos_y, bi, bj, kappa, 0, j0,
                                                        sums, scratch);
      });
    }
    for (int64_t i = 0; i < bi; ++i) {
      const RowStats<acc_t> st = finalize_row<acc_t>(sums.row_sum[i], sums.row_shift[i],
                                                      sums.col_sum[i], sums.col_shift[i],
                                                      sums.kl_sum[i]);
      const int64_t out = i0 - range.begin + i;
      row_lse[out] = st.row_lse;
      col_lse[out] = st.col_lse;
      row_kl[out] = st.row_kl;
      // L_ii rounded exactly as in the tiles.
      row_ce[out] = static_cast<acc_t>(double(st.row_lse) - double(kappa * diag_cos[i]));
    }
  });
}

// ---------------------------------------------------------------------------------------
// Backward

// Per-row terms the gradient tiles read: r, c, k, the upstream weights of each row's CE and
// KL terms and, for the fixed shift, the factors e^(kappa - r) and e^(kappa - c) (see
// pair_probabilities_fixed_shift).
template <typename acc_t>
struct BackwardRows {
  const acc_t* r;
  const acc_t* c;
  const acc_t* k;
  const acc_t* w_ce;
  const acc_t* w_kl;
  const acc_t* row_factor;
  const acc_t* col_factor;
  BackwardRows offset(int64_t i0) const {
    return {.r = r + i0, .c = c + i0, .k = k + i0, .w_ce = w_ce + i0, .w_kl = w_kl + i0,
            .row_factor = row_factor ? row_factor + i0 : nullptr,
            .col_factor = col_factor ? col_factor + i0 : nullptr};
  }
  RowTerms<acc_t> terms(int64_t i) const {
    return {.r = r[i], .c = c[i], .k = k[i], .w_ce = w_ce[i], .w_kl = w_kl[i]};
  }
};

// The factors of the fixed shift for rows [0, n), or nothing for the online path.
template <typename acc_t, bool kFixedShift>
struct ShiftFactors {
  std::unique_ptr<acc_t[]> row, col;
  ShiftFactors(acc_t kappa, const acc_t* row_lse, const acc_t* col_lse, int64_t n) {
    if constexpr (kFixedShift) {
      row = scratch_buffer<acc_t>(n);
      col = scratch_buffer<acc_t>(n);
      for (int64_t i = 0; i < n; ++i) {
        row[i] = std::exp(kappa - row_lse[i]);
        col[i] = std::exp(kappa - col_lse[i]);
      }
    }
  }
};

// Which gradients a tile pair yields, and which of them count towards d kappa.
enum class GradientTileKind {
  kPairDiagonal,     // tile {I, I} of the pair schedule: cos_y mirrors cos_x; G_II only
  kPairOffDiagonal,  // tile {I, J}, I != J: G_IJ and G_JI, both counted
  kRowOwner,         // the sharded loss: G_IJ and G_JI for the owned rows I, only G_IJ counted
                     // (the owner of the rows J counts G_JI)
};

// Builds the gradient tiles of one tile pair: gx[i][j] = G_ij and gy[i][j] = G_ji (rows
// i0 + i and j0 + j), and returns the sum of G <s, t> over the logits it counts (for
// d kappa). diagonal_shift = i0 - j0 places the diagonal i0 + i == j0 + j.
template <typename acc_t, GradientTileKind kKind, bool kFixedShift>
ICD_ALWAYS_INLINE double gradient_tile(const acc_t* cos_x, const acc_t* cos_y, int64_t bi,
                                       int64_t bj, int64_t diagonal_shift, acc_t kappa,
                                       BackwardRows<acc_t> rows_i, BackwardRows<acc_t> rows_j,
                                       acc_t* gx, acc_t* gy) {
  constexpr bool kBothHalves = kKind != GradientTileKind::kPairDiagonal;
  constexpr bool kCountGy = kKind == GradientTileKind::kPairOffDiagonal;
  double dkappa = 0;
  for (int64_t i = 0; i < bi; ++i) {
    const acc_t* xr = cos_x + i * bj;
    const acc_t* yr = cos_y + i * bj;
    acc_t* gxr = gx + i * bj;
    acc_t* gyr = gy + i * bj;
    const RowTerms<acc_t> row_i = rows_i.terms(i);
    const acc_t fri = kFixedShift ? rows_i.row_factor[i] : acc_t(0);
    const acc_t fci = kFixedShift ? rows_i.col_factor[i] : acc_t(0);
    const int64_t diagonal_j = i + diagonal_shift;
    acc_t dk = 0;
#pragma omp simd reduction(+ : dk)
    for (int64_t j = 0; j < bj; ++j) {
      const acc_t on_diagonal = j == diagonal_j ? acc_t(1) : acc_t(0);
      const acc_t l_ij = kappa * xr[j], l_ji = kappa * yr[j];
      const RowTerms<acc_t> row_j = rows_j.terms(j);
      const LogitGradPair<acc_t> g = logit_grad_pair<acc_t>(
          l_ij, l_ji, row_i, row_j,
          kFixedShift ? pair_probabilities_fixed_shift(l_ij, l_ji, kappa, fri, fci,
                                                       rows_j.row_factor[j],
                                                       rows_j.col_factor[j])
                      : pair_probabilities(l_ij, l_ji, row_i.r, row_i.c, row_j.r, row_j.c),
          on_diagonal);
      gxr[j] = g.ij;
      dk += g.ij * xr[j];
      if constexpr (kBothHalves) gyr[j] = g.ji;
      if constexpr (kCountGy) dk += g.ji * yr[j];
    }
    dkappa += dk;
  }
  return dkappa;
}

// rows_dst += a G cols_src and cols_dst += a G^T rows_src for a row-major gradient tile G
// (bi x bj): with G = G_IJ this is dS_I += a G_IJ T_J and dT_J += a G_IJ^T S_I.
template <typename acc_t>
void scatter_gradient_tile(acc_t* g, int64_t bi, int64_t bj, const at::Tensor& rows_src,
                           const at::Tensor& cols_src, acc_t a, at::Tensor rows_dst,
                           at::Tensor cols_dst) {
  const at::Tensor gt = matrix_view(g, bi, bj);
  at::cpu::addmm_(rows_dst, gt, cols_src, 1, a);
  at::cpu::addmm_(cols_dst, gt.t(), rows_src, 1, a);
}

at::Tensor rows_of(const at::Tensor& m, int64_t begin, int64_t size) {
  return m.narrow(0, begin, size);
}

// dS = kappa sum_j G_ij t_j and dT = kappa sum_i G_ij s_i into ds, dt (n x d, zeroed), for
// the loss sum_i (w_ce_i CE_i + w_kl_i k_i); returns its derivative by kappa.
template <typename acc_t, bool kFixedShift>
double backward_features(const at::Tensor& s, const at::Tensor& t, acc_t kappa,
                         BackwardRows<acc_t> all_rows, acc_t* ds, acc_t* dt) {
  const int64_t n = s.size(0), d = s.size(1);
  const ShiftFactors<acc_t, kFixedShift> factors(kappa, all_rows.r, all_rows.c, n);
  all_rows.row_factor = factors.row.get();
  all_rows.col_factor = factors.col.get();
  const TileSchedule plan(n);
  // One d kappa sum per slot of a round: a slot's pairs run one round after another, so each
  // sum is formed in a fixed order, and the slots are added in order at the end.
  std::vector<double> dkappa(plan.max_round_size(), 0.0);
  const at::Tensor ds_all = matrix_view(ds, n, d), dt_all = matrix_view(dt, n, d);
  const int64_t tile = plan.max_tile();

  // The pairs of a round touch disjoint rows of ds and dt, so each adds its products in place.
  for_each_formed_pair<acc_t>(
      plan, s, t, 2 * tile * tile,
      [&](const TilePair& p, acc_t* cos_x, acc_t* cos_y, acc_t* scratch) {
        acc_t* gx = scratch;
        acc_t* gy = scratch + tile * tile;
        const BackwardRows<acc_t> rows_i = all_rows.offset(p.i0), rows_j = all_rows.offset(p.j0);
        run_with_best_isa([&]() ICD_INLINE_LAMBDA {
          if (p.diagonal)
            dkappa[p.slot] +=
                gradient_tile<acc_t, GradientTileKind::kPairDiagonal, kFixedShift>(
                    cos_x, cos_y, p.bi, p.bj, p.i0 - p.j0, kappa, rows_i, rows_j, gx, gy);
          else
            dkappa[p.slot] +=
                gradient_tile<acc_t, GradientTileKind::kPairOffDiagonal, kFixedShift>(
                    cos_x, cos_y, p.bi, p.bj, p.i0 - p.j0, kappa, rows_i, rows_j, gx, gy);
        });
        // G_IJ: rows of S_I, columns of T_J.
        scatter_gradient_tile(gx, p.bi, p.bj, rows_of(s, p.i0, p.bi), rows_of(t, p.j0, p.bj),
                              kappa, rows_of(ds_all, p.i0, p.bi), rows_of(dt_all, p.j0, p.bj));
        // G_JI = gy^T (off the diagonal): dT_I += a gy S_J, dS_J += a gy^T T_I (the same
        // shape with t and s exchanged).
        if (!p.diagonal)
          scatter_gradient_tile(gy, p.bi, p.bj, rows_of(t, p.i0, p.bi), rows_of(s, p.j0, p.bj),
                                kappa, rows_of(dt_all, p.i0, p.bi), rows_of(ds_all, p.j0, p.bj));
      });

  double total = 0;
  for (double v : dkappa) total += v;
  return total;
}

// The same for the owned rows [range.begin, range.begin + range.count) only: their complete
// gradients dS_I = kappa sum_j G_Ij t_j and dT_I = kappa sum_j G_jI s_j into ds, dt (count x d,
// zeroed), from the terms of all n rows; returns the rows' share of the derivative by kappa,
// sum_{i in I} sum_j G_ij <s_i, t_j>. 4 B N D multiply-adds for B rows, no atomics: each
// worker owns a row tile and sweeps every column tile.
template <typename acc_t, bool kFixedShift>
double backward_row_features(const at::Tensor& s, const at::Tensor& t, acc_t kappa,
                             const RowRange& range, BackwardRows<acc_t> all_rows, acc_t* ds,
                             acc_t* dt) {
  const int64_t d = s.size(1);
  const ShiftFactors<acc_t, kFixedShift> factors(kappa, all_rows.r, all_rows.c, range.n);
  all_rows.row_factor = factors.row.get();
  all_rows.col_factor = factors.col.get();
  std::vector<double> dkappa(range.num_row_tiles(), 0.0);
  const at::Tensor ds_rows = matrix_view(ds, range.count, d),
                   dt_rows = matrix_view(dt, range.count, d);
  for_each_row_tile<acc_t>(range, 2 * kTile * kTile, [&](int64_t i0, int64_t bi, acc_t* cos_x,
                                                         acc_t* cos_y, acc_t* scratch) {
    acc_t* gx = scratch;
    acc_t* gy = scratch + kTile * kTile;
    const BackwardRows<acc_t> rows_i = all_rows.offset(i0);
    at::Tensor ds_i = rows_of(ds_rows, i0 - range.begin, bi),
               dt_i = rows_of(dt_rows, i0 - range.begin, bi);
    double dk = 0;
    for (int64_t col_tile = 0; col_tile < range.num_col_tiles(); ++col_tile) {
      const int64_t j0 = col_tile * kTile, bj = range.col_tile_size(col_tile);
      form_tiles(s, t, i0, bi, j0, bj, false, cos_x, cos_y);
      const BackwardRows<acc_t> rows_j = all_rows.offset(j0);
      run_with_best_isa([&]() ICD_INLINE_LAMBDA {
        dk += gradient_tile<acc_t, GradientTileKind::kRowOwner, kFixedShift>(
            cos_x, cos_y, bi, bj, i0 - j0, kappa, rows_i, rows_j, gx, gy);
      });
      // dS_I += kappa G_IJ T_J and dT_I += kappa G_JI^T S_J, where gy = G_JI^T.
      const at::Tensor g_ij = matrix_view(gx, bi, bj), g_ji_t = matrix_view(gy, bi, bj);
      at::cpu::addmm_(ds_i, g_ij, rows_of(t, j0, bj), 1, kappa);
      at::cpu::addmm_(dt_i, g_ji_t, rows_of(s, j0, bj), 1, kappa);
    }
    dkappa[(i0 - range.begin) / kTile] = dk;
  });
  double total = 0;
  for (double v : dkappa) total += v;
  return total;
}

// ---------------------------------------------------------------------------------------
// Normalisation

// ||z_i|| in double. Squares of fp32 values cannot overflow a double; fp64 rows whose sum of
// squares does overflow (or underflow) are summed again scaled by their largest entry.
template <typename acc_t>
ICD_ALWAYS_INLINE double row_norm(const acc_t* z, int64_t d) {
  double sum_sq = 0;
#pragma omp simd reduction(+ : sum_sq)
  for (int64_t k = 0; k < d; ++k) sum_sq += double(z[k]) * double(z[k]);
  if (std::is_same_v<acc_t, double> && (sum_sq == std::numeric_limits<double>::infinity() ||
                                        sum_sq < std::numeric_limits<double>::min())) {
    double scale = 0;
    for (int64_t k = 0; k < d; ++k) {
      const double a = std::fabs(double(z[k]));
      scale = a > scale ? a : scale;
    }
    if (scale == 0 || scale == std::numeric_limits<double>::infinity()) return std::sqrt(sum_sq);
    double scaled = 0;
    for (int64_t k = 0; k < d; ++k) {
      const double v = double(z[k]) / scale;
      scaled += v * v;
    }
    return scale * std::sqrt(scaled);
  }
  return std::sqrt(sum_sq);  // NaN or Inf entries give a NaN or Inf norm, hence a NaN loss
}

// unit = z / max(||z||, eps) row by row, in acc_t.
template <typename acc_t>
void normalize_rows(const acc_t* z, int64_t n, int64_t d, acc_t* unit, acc_t* norm) {
  at::parallel_for(0, n, 256, [&](int64_t begin, int64_t end) {
    run_with_best_isa([&]() ICD_INLINE_LAMBDA {
      for (int64_t i = begin; i < end; ++i) {
        const acc_t* zi = z + i * d;
        const double nrm = row_norm(zi, d);
        // In double: the norm of fp32 rows may exceed the fp32 range.
        const double inv_denom = 1.0 / (nrm > kNormEps ? nrm : kNormEps);
#pragma omp simd
        for (int64_t k = 0; k < d; ++k) unit[i * d + k] = static_cast<acc_t>(zi[k] * inv_denom);
        norm[i] = static_cast<acc_t>(nrm);
      }
    });
  });
}

// grad <- d loss / d z for one row, from grad = d loss / d unit (in place).
template <typename acc_t>
ICD_ALWAYS_INLINE void normalize_backward_row(const acc_t* unit, acc_t norm, int64_t d,
                                              acc_t* grad) {
  double dot = 0;
#pragma omp simd reduction(+ : dot)
  for (int64_t e = 0; e < d; ++e) dot += double(unit[e]) * double(grad[e]);
  const acc_t unit_dot_grad = static_cast<acc_t>(dot);
#pragma omp simd
  for (int64_t e = 0; e < d; ++e)
    grad[e] = normalize_backward(grad[e], unit[e], unit_dot_grad, norm);
}

// Both inputs normalised into one buffer, which the forward returns for the backward:
// unit = [s; t] (2 x N x D) and norms = [||z_s||; ||z_t||] (2 x N), in the accumulate dtype.
struct Normalized {
  at::Tensor unit;
  at::Tensor norms;
};

Normalized normalize_pair(const at::Tensor& z_s, const at::Tensor& z_t) {
  const at::ScalarType acc = accumulate_type(z_s.scalar_type());
  const int64_t n = z_s.size(0), d = z_s.size(1);
  const auto options = z_s.options().dtype(acc);
  Normalized out{at::empty({2, n, d}, options), at::empty({2, n}, options)};
  AT_DISPATCH_FLOATING_TYPES(acc, "icd_normalize", [&] {
    for (int64_t side = 0; side < 2; ++side) {
      const at::Tensor z_acc = (side == 0 ? z_s : z_t).to(acc).contiguous();
      normalize_rows<scalar_t>(z_acc.data_ptr<scalar_t>(), n, d,
                               out.unit.data_ptr<scalar_t>() + side * n * d,
                               out.norms.data_ptr<scalar_t>() + side * n);
    }
  });
  return out;
}

// ---------------------------------------------------------------------------------------
// Operator entry points

// The value of a one-element CPU tensor, read directly (Tensor::item goes through the
// dispatcher, which is a noticeable share of a whole N = 64 loss).
double scalar_value(const at::Tensor& x) {
  double v = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "icd_scalar", [&] {
    v = static_cast<double>(*x.const_data_ptr<scalar_t>());
  });
  return v;
}

// A 0-dim tensor holding v, written in place (cheaper than at::scalar_tensor's dispatch).
at::Tensor scalar_output(double v, const at::TensorOptions& options) {
  at::Tensor out = at::empty({}, options);
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "icd_scalar_output", [&] {
    *out.mutable_data_ptr<scalar_t>() = static_cast<scalar_t>(v);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor>
icd_forward_cpu(const at::Tensor& z_s, const at::Tensor& z_t, const at::Tensor& log_scale,
                double alpha, double max_scale) {
  check_icd_inputs(z_s, z_t, log_scale, alpha, max_scale);
  CHECK_DEVICE_TYPE(z_s, at::kCPU);
  const int64_t n = z_s.size(0);
  const Normalized features = normalize_pair(z_s, z_t);
  const at::Tensor s = features.unit.select(0, 0), t = features.unit.select(0, 1);
  const double kappa = clamped_scale(scalar_value(log_scale), max_scale);
  const auto options = features.norms.options();
  at::Tensor row_lse = at::empty({n}, options), col_lse = at::empty({n}, options),
             row_kl = at::empty({n}, options);
  double ce = 0, kl = 0;
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "icd_forward_cpu", [&] {
    scalar_t* r = row_lse.data_ptr<scalar_t>();
    scalar_t* c = col_lse.data_ptr<scalar_t>();
    scalar_t* k = row_kl.data_ptr<scalar_t>();
    auto diag_cos = scratch_buffer<scalar_t>(n);
    if (kappa <= kFixedShiftMaxScale)
      forward_statistics<scalar_t, false>(s, t, scalar_t(kappa), r, c, k, diag_cos.get());
    else
      forward_statistics<scalar_t, true>(s, t, scalar_t(kappa), r, c, k, diag_cos.get());
    for (int64_t i = 0; i < n; ++i) {
      // CE_i = r_i - L_ii, with L_ii rounded exactly as in the tiles.
      ce += double(r[i]) - double(scalar_t(kappa) * diag_cos[i]);
      kl += double(k[i]);
    }
  });
  ce /= double(n);
  kl /= double(n);
  const auto scalar = [&](double v) { return scalar_output(v, options); };
  return {scalar(ce + alpha * kl), scalar(ce), scalar(kl), row_lse, col_lse, row_kl,
          features.unit, features.norms};
}

// An upstream gradient as a number; a missing one is 0.
double upstream_value(const std::optional<at::Tensor>& grad, const char* name) {
  if (!grad.has_value() || !grad->defined()) return 0.0;
  TORCH_CHECK_VALUE(grad->numel() == 1 && grad->dim() <= 1, name,
                    " must hold exactly one value, got shape ", grad->sizes());
  return scalar_value(*grad);
}

// dS -> dz in place for the rows of `unit` (rows x d) with their norms: back through the
// normalisation.
template <typename acc_t>
void normalize_backward_rows(const acc_t* unit, const acc_t* norm, int64_t rows, int64_t d,
                             acc_t* grad) {
  at::parallel_for(0, rows, 256, [&](int64_t begin, int64_t end) {
    run_with_best_isa([&]() ICD_INLINE_LAMBDA {
      for (int64_t i = begin; i < end; ++i)
        normalize_backward_row(unit + i * d, norm[i], d, grad + i * d);
    });
  });
}

// The kernel of either backward op: the gradients of sum_i (w_ce_i CE_i + w_kl_i k_i) with
// respect to z_s and z_t of rows [range.begin, range.begin + range.count), and to theta.
// weight_ce and weight_kl are length-n vectors of the accumulate type; a range of all n rows
// runs the pair schedule (every logit formed once per pass), any other range the row owner's
// sweep.
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_impl(
    const at::Tensor& unit, const at::Tensor& norms, const at::Tensor& log_scale,
    const at::Tensor& row_lse, const at::Tensor& col_lse, const at::Tensor& row_kl,
    const at::Tensor& weight_ce, const at::Tensor& weight_kl, const RowRange& range,
    double max_scale, at::ScalarType grad_dtype) {
  const int64_t n = unit.size(1), d = unit.size(2);
  const double log_scale_value = scalar_value(log_scale);
  const double kappa = clamped_scale(log_scale_value, max_scale);
  const at::Tensor units = unit.contiguous(), unit_norms = norms.contiguous();
  const at::Tensor s = units.select(0, 0), t = units.select(0, 1);
  at::Tensor ds = at::zeros({range.count, d}, units.options()),
             dt = at::zeros({range.count, d}, units.options());
  const at::Tensor r = row_lse.contiguous(), c = col_lse.contiguous(), k = row_kl.contiguous();
  const at::Tensor w_ce = weight_ce.contiguous(), w_kl = weight_kl.contiguous();
  const bool whole = range.begin == 0 && range.count == n;
  double dkappa = 0;
  AT_DISPATCH_FLOATING_TYPES(units.scalar_type(), "icd_backward_cpu", [&] {
    const BackwardRows<scalar_t> all_rows{
        .r = r.data_ptr<scalar_t>(), .c = c.data_ptr<scalar_t>(), .k = k.data_ptr<scalar_t>(),
        .w_ce = w_ce.data_ptr<scalar_t>(), .w_kl = w_kl.data_ptr<scalar_t>(),
        .row_factor = nullptr, .col_factor = nullptr};
    scalar_t* dsp = ds.data_ptr<scalar_t>();
    scalar_t* dtp = dt.data_ptr<scalar_t>();
    const bool fixed = kappa <= kFixedShiftMaxScale;
    if (whole)
      dkappa = fixed ? backward_features<scalar_t, true>(s, t, scalar_t(kappa), all_rows, dsp, dtp)
                     : backward_features<scalar_t, false>(s, t, scalar_t(kappa), all_rows, dsp, dtp);
    else
      dkappa = fixed ? backward_row_features<scalar_t, true>(s, t, scalar_t(kappa), range,
                                                             all_rows, dsp, dtp)
                     : backward_row_features<scalar_t, false>(s, t, scalar_t(kappa), range,
                                                              all_rows, dsp, dtp);
    const scalar_t* s_norm = unit_norms.data_ptr<scalar_t>() + range.begin;
    const scalar_t* t_norm = unit_norms.data_ptr<scalar_t>() + n + range.begin;
    normalize_backward_rows(s.data_ptr<scalar_t>() + range.begin * d, s_norm, range.count, d, dsp);
    normalize_backward_rows(t.data_ptr<scalar_t>() + range.begin * d, t_norm, range.count, d, dtp);
  });
  const double dlog_scale = dkappa * scale_grad_factor(log_scale_value, max_scale);
  return {ds.to(grad_dtype), dt.to(grad_dtype),
          at::full_like(log_scale, dlog_scale, at::MemoryFormat::Contiguous)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> icd_backward_cpu(
    const std::optional<at::Tensor>& grad_loss, const std::optional<at::Tensor>& grad_ce,
    const std::optional<at::Tensor>& grad_kl, const at::Tensor& unit, const at::Tensor& norms,
    const at::Tensor& log_scale, const at::Tensor& row_lse, const at::Tensor& col_lse,
    const at::Tensor& row_kl, double alpha, double max_scale, at::ScalarType grad_dtype,
    bool /*allow_tf32: CUDA only*/) {
  check_icd_saved(unit, norms, log_scale, row_lse, col_lse, row_kl, alpha, max_scale,
                  grad_dtype);
  CHECK_DEVICE_TYPE(unit, at::kCPU);
  const int64_t n = unit.size(1);
  const double g_loss = upstream_value(grad_loss, "grad_loss");
  // loss = (1/N) sum_i (CE_i + alpha k_i): every row carries the same weights.
  const double w_ce = (g_loss + upstream_value(grad_ce, "grad_ce")) / double(n);
  const double w_kl = (alpha * g_loss + upstream_value(grad_kl, "grad_kl")) / double(n);
  const auto options = row_lse.options();
  return backward_impl(unit, norms, log_scale, row_lse, col_lse, row_kl,
                       at::full({n}, w_ce, options), at::full({n}, w_kl, options),
                       RowRange{.n = n, .begin = 0, .count = n}, max_scale, grad_dtype);
}

// The forward of the sharded loss for one rank: the statistics of rows [row_begin,
// row_begin + row_count) of the problem formed by all ranks' features z_s, z_t (N x D), each
// row against all N columns, and CE_i = r_i - L_ii of those rows; plus the unit features and
// norms of all N rows for the backward.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
icd_forward_rows_cpu(const at::Tensor& z_s, const at::Tensor& z_t, const at::Tensor& log_scale,
                     int64_t row_begin, int64_t row_count, double max_scale) {
  check_icd_inputs(z_s, z_t, log_scale, 0.0, max_scale);
  CHECK_DEVICE_TYPE(z_s, at::kCPU);
  const int64_t n = z_s.size(0);
  check_row_range(row_begin, row_count, n);
  const Normalized features = normalize_pair(z_s, z_t);
  const at::Tensor s = features.unit.select(0, 0), t = features.unit.select(0, 1);
  const double kappa = clamped_scale(scalar_value(log_scale), max_scale);
  const auto options = features.norms.options();
  at::Tensor row_lse = at::empty({row_count}, options), col_lse = at::empty({row_count}, options),
             row_kl = at::empty({row_count}, options), row_ce = at::empty({row_count}, options);
  const RowRange range{.n = n, .begin = row_begin, .count = row_count};
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "icd_forward_rows_cpu", [&] {
    const auto statistics = kappa <= kFixedShiftMaxScale
                                ? forward_row_statistics<scalar_t, false>
                                : forward_row_statistics<scalar_t, true>;
    statistics(s, t, scalar_t(kappa), range, row_lse.data_ptr<scalar_t>(),
               col_lse.data_ptr<scalar_t>(), row_kl.data_ptr<scalar_t>(),
               row_ce.data_ptr<scalar_t>());
  });
  return {row_lse, col_lse, row_kl, row_ce, features.unit, features.norms};
}

// The backward of the sharded loss for one rank: the gradients of
// sum_i (weight_ce_i CE_i + weight_kl_i k_i) over all N rows with respect to the z_s and z_t
// rows [row_begin, row_begin + row_count), and this range's share of the gradient of theta
// (the shares of all ranks add up to the whole).
std::tuple<at::Tensor, at::Tensor, at::Tensor> icd_backward_rows_cpu(
    const at::Tensor& unit, const at::Tensor& norms, const at::Tensor& log_scale,
    const at::Tensor& row_lse, const at::Tensor& col_lse, const at::Tensor& row_kl,
    const at::Tensor& weight_ce, const at::Tensor& weight_kl, int64_t row_begin,
    int64_t row_count, double max_scale, at::ScalarType grad_dtype,
    bool /*allow_tf32: CUDA only*/) {
  check_icd_saved(unit, norms, log_scale, row_lse, col_lse, row_kl, 0.0, max_scale, grad_dtype);
  check_row_weights(unit, weight_ce, weight_kl);
  CHECK_DEVICE_TYPE(unit, at::kCPU);
  const int64_t n = unit.size(1);
  check_row_range(row_begin, row_count, n);
  return backward_impl(unit, norms, log_scale, row_lse, col_lse, row_kl, weight_ce, weight_kl,
                       RowRange{.n = n, .begin = row_begin, .count = row_count}, max_scale,
                       grad_dtype);
}

}  // namespace

TORCH_LIBRARY_IMPL(icd_fast, CPU, m) {
  m.impl("icd_forward", &icd_forward_cpu);
  m.impl("icd_backward", &icd_backward_cpu);
  m.impl("icd_forward_rows", &icd_forward_rows_cpu);
  m.impl("icd_backward_rows", &icd_backward_rows_cpu);
}

}  // namespace icd_fast::cpu
