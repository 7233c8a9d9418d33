// Host side of the CUDA backend: checks, output allocation, parameter structs and the
// launches, written once for any `launch(kernel, Grid{x, y}, params)` callable that also
// tells target_blocks(), the blocks that keep its device busy. The CUDA
// launcher (icd_cuda.cu) launches on the current stream; the tests' emulation runs the same
// kernels on the CPU, so this code is exercised in CI too.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <climits>
#include <optional>
#include <tuple>
#include <type_traits>

#include "../icd_checks.h"
#include "icd_kernels.cuh"

namespace icd_fast::cuda {

// The input dtypes the kernels are instantiated for.
#define ICD_DISPATCH_KERNEL_TYPES(TYPE, NAME, ...)             \
  AT_DISPATCH_SWITCH(TYPE, NAME,                               \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::kDouble, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)   \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

// The statistics and arithmetic dtype for an input dtype (as at::ScalarType and C++ type).
template <typename scalar_t>
using acc_type_for = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// Which products run, by input dtype and by what the device's code was compiled for.
enum class ProductsKind { kCudaCores, kTensorCores };

// Whether the device code that runs on the GPU in use has the tensor-core products.
// `compiled_arch` is the virtual architecture that code was compiled for, as
// cudaFuncAttributes::ptxVersion reports it (75 for compute_75, 90 for sm_90 built from
// compute_90). It is not the GPU's compute capability: an A100 running a
// TORCH_CUDA_ARCH_LIST="7.5+PTX" build JIT-compiles the compute_75 PTX, whose tensor-core
// functions are __trap() (ICD_FAST_NO_TENSOR_CORES).
inline bool tensor_cores_compiled(int compiled_arch) {
  return compiled_arch * 10 >= ICD_FAST_TENSOR_CORE_MIN_ARCH;
}

// fp16/bf16 on the tensor cores where they were compiled in, float32 as TF32 only when
// torch's TF32 setting for matmuls also allows it; CUDA-core FMAs otherwise (float64 always).
inline ProductsKind choose_products(at::ScalarType dtype, int compiled_arch, bool allow_tf32) {
  if (!tensor_cores_compiled(compiled_arch)) return ProductsKind::kCudaCores;
  switch (dtype) {
    case at::kHalf:
    case at::kBFloat16:
      return ProductsKind::kTensorCores;
    case at::kFloat:
      return allow_tf32 ? ProductsKind::kTensorCores : ProductsKind::kCudaCores;
    default:
      return ProductsKind::kCudaCores;
  }
}

// Calls body(Products{}) with the tile products choose_products() picks for this input dtype
// on the launcher's device. A 16-bit dtype that could have used tensor cores but finds none
// compiled is reported to the launcher (StreamLaunch warns once). allow_tf32 is read from
// torch once, by the forward, and handed to the backward by the autograd rule (the op's
// allow_tf32 argument): the backward then takes the forward's decision and recomputes the
// forward's logits even where the setting changed in between (a context manager around the
// forward alone), instead of gradients ~1e-3 off the saved statistics.
template <typename scalar_t, typename Launch, typename Body>
void with_tile_products(const Launch& launch, bool allow_tf32, const Body& body) {
  using acc_t = acc_type_for<scalar_t>;
  constexpr at::ScalarType dtype = c10::CppTypeToScalarType<scalar_t>::value;
  const int arch = launch.compiled_arch();
  if (choose_products(dtype, arch, allow_tf32) == ProductsKind::kTensorCores) {
    if constexpr (std::is_same_v<scalar_t, c10::Half> ||
                  std::is_same_v<scalar_t, c10::BFloat16> || std::is_same_v<scalar_t, float>)
      return body(TensorCoreProducts<typename TensorCoreOperandOf<scalar_t>::type>{});
  }
  if (dtype == at::kHalf || dtype == at::kBFloat16) launch.tensor_cores_missing(arch);
  body(SimtProducts<acc_t>{});
}

inline int64_t blocks_for(int64_t rows, int64_t rows_per_block) {
  return (rows + rows_per_block - 1) / rows_per_block;
}

// A launch's grid: x blocks (of row tiles), each repeated over y column splits.
struct Grid {
  int64_t x, y = 1;
};

// The grid of the one-warp-per-row kernels, which loop over the rows beyond it.
inline Grid row_blocks(int64_t rows) {
  return {std::min<int64_t>(blocks_for(rows, Traits::kNormRowsPerBlock), kMaxRowBlocks)};
}

// How the tile kernels split the column sweep: into the number of splits that brings
// row_tiles x splits nearest to target_blocks (about two blocks per SM), every split an equal
// run of column tiles but the last. Only small problems split (row tiles up to 2/3 of
// target_blocks: N up to about 4600 on an A100, 5600 on an H100); above, one split and no
// merge launch.
inline ColumnSplit column_split(int64_t row_tiles, int64_t n, int64_t target_blocks) {
  const int64_t tiles = blocks_for(n, Traits::kTileRows);
  const int64_t nearest = (target_blocks + row_tiles / 2) / row_tiles;
  const int64_t wanted = std::clamp<int64_t>(nearest, 1, tiles);
  const int64_t per_split = blocks_for(tiles, wanted);
  return {.splits = static_cast<int>(blocks_for(tiles, per_split)),
          .tiles = static_cast<int>(per_split)};
}

// The operand copies of the unit rows that the tensor-core products read: (2, padded_n, ld)
// in the operand type, zero-padded. The CUDA-core products take none (padded_n = n, ld = d).
struct OperandRows {
  at::Tensor storage;  // undefined where the products take no operand rows
  int padded_n, ld;
  void* data() const { return storage.defined() ? storage.data_ptr() : nullptr; }
  int64_t rows() const { return 2 * static_cast<int64_t>(padded_n); }
};

// Rows [begin, begin + count) of an n-row problem; the whole problem is {n, 0, n}.
struct RowRange {
  int64_t n, begin, count;
};

// The operand rows of a range: zero padding past n up to where the range's last 32-row tile
// ends (a range that starts off a multiple of 32 reads up to 31 rows past round_up(n, 32)).
// WMMA loads and stores need 32-byte aligned tile pointers. Every tile offset into the operand
// rows is a whole number of rows of ld (a multiple of kOperandPad) elements, so the operand
// rows' base must be aligned: torch's allocators give 256 (CUDA) or 64 (CPU) bytes, and this
// check turns an allocator that did not into an error instead of a misaligned-address fault.
constexpr int64_t kWmmaAlignment = 32;
static_assert(kOperandPad * 2 % kWmmaAlignment == 0,
              "a row of kOperandPad 16-bit operands must keep the tiles 32-byte aligned");

template <typename Products>
OperandRows allocate_operand_rows(const RowRange& range, int64_t d, const at::TensorOptions& like) {
  if constexpr (!Products::kOperandRows) {
    return {at::Tensor(), static_cast<int>(range.n), static_cast<int>(d)};
  } else {
    const int64_t tiles_end = range.begin + round_up(static_cast<int>(range.count), kOperandPad);
    const int padded_n = round_up(static_cast<int>(std::max(range.n, tiles_end)), kOperandPad);
    const int ld = round_up(static_cast<int>(d), kOperandPad);
    const int64_t bytes = 2 * static_cast<int64_t>(padded_n) * ld *
                          static_cast<int64_t>(sizeof(typename Products::operand_t));
    OperandRows rows{at::empty({bytes}, like.dtype(at::kByte)), padded_n, ld};
    TORCH_CHECK(reinterpret_cast<uintptr_t>(rows.data()) % kWmmaAlignment == 0,
                "icd_fast: the tensor-core operand rows must be ", kWmmaAlignment,
                "-byte aligned for WMMA, the allocator returned ", rows.data());
    return rows;
  }
}

inline void check_cuda_kernel_limits(int64_t n, int64_t d, at::ScalarType dtype) {
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                       dtype == at::kBFloat16,
                   "the CUDA kernel takes float32, float64, float16 or bfloat16 features, got ",
                   dtype);
  // Rows and features are int in the kernels, padded to multiples of kOperandPad (a row
  // range up to one more tile).
  TORCH_CHECK_VALUE(n <= (1 << 30) - 2 * kOperandPad && d <= INT_MAX - kOperandPad,
                    "the CUDA kernel supports N up to 2^30 - 64 and D up to 2^31 - 33, got N = ",
                    n, ", D = ", d);
}

// An optional upstream gradient as a device scalar of the accumulate type (or nullptr).
template <typename acc_t>
const acc_t* upstream_pointer(const std::optional<at::Tensor>& grad, at::Tensor& keep,
                              const char* name) {
  if (!grad.has_value() || !grad->defined()) return nullptr;
  TORCH_CHECK_VALUE(grad->numel() == 1 && grad->dim() <= 1, name,
                    " must hold exactly one value, got shape ", grad->sizes());
  keep = grad->to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
  return keep.data_ptr<acc_t>();
}

// What the forward launches compute: the statistics of the range's rows and, for the whole
// problem only, the three scalars (undefined tensors otherwise).
struct ForwardOutputs {
  at::Tensor loss, ce, kl, row_lse, col_lse, row_kl, row_ce, unit, norms;
};

// The forward of rows `range` (features of all n rows in z_s, z_t): normalises all n rows,
// then the statistics of the range's rows against all n columns.
template <typename Launch>
ForwardOutputs run_forward(const Launch& launch, const at::Tensor& z_s, const at::Tensor& z_t,
                           const at::Tensor& log_scale, double alpha, double max_scale,
                           const RowRange& range) {
  const int64_t n = range.n, d = z_s.size(1);
  const bool whole = range.begin == 0 && range.count == n;
  const auto acc = z_s.options().dtype(accumulate_type(z_s.scalar_type()));
  ForwardOutputs out;
  out.unit = at::empty({2, n, d}, acc);
  out.norms = at::empty({2, n}, acc);
  out.row_lse = at::empty({range.count}, acc);
  out.col_lse = at::empty({range.count}, acc);
  out.row_kl = at::empty({range.count}, acc);
  out.row_ce = at::empty({range.count}, acc);
  if (whole) {
    out.loss = at::empty({}, acc);
    out.ce = at::empty({}, acc);
    out.kl = at::empty({}, acc);
  }
  at::Tensor blocks_done = at::empty({1}, z_s.options().dtype(at::kInt));
  const at::Tensor scale = log_scale.to(acc.dtype()).contiguous();
  const int64_t row_tiles = blocks_for(range.count, Traits::kTileRows);
  const ColumnSplit split = column_split(row_tiles, n, launch.target_blocks());

  ICD_DISPATCH_KERNEL_TYPES(z_s.scalar_type(), "icd_forward_cuda", [&] {
    using acc_t = acc_type_for<scalar_t>;
    const auto scalar = [&](const at::Tensor& t) { return whole ? t.data_ptr<acc_t>() : nullptr; };
    with_tile_products<scalar_t>(launch, launch.allow_tf32(), [&](auto products) {
      using Products = decltype(products);
      const OperandRows op = allocate_operand_rows<Products>(range, d, z_s.options());
      unsigned int* blocks_done_ptr = reinterpret_cast<unsigned int*>(blocks_done.data_ptr<int>());
      const NormalizeParams<acc_t> np{.z_s = z_s.data_ptr(),
                                      .z_t = z_t.data_ptr(),
                                      .s_stride0 = z_s.stride(0),
                                      .s_stride1 = z_s.stride(1),
                                      .t_stride0 = z_t.stride(0),
                                      .t_stride1 = z_t.stride(1),
                                      .n = static_cast<int>(n),
                                      .d = static_cast<int>(d),
                                      .unit = out.unit.data_ptr<acc_t>(),
                                      .norms = out.norms.data_ptr<acc_t>(),
                                      .forward_blocks_done = blocks_done_ptr,
                                      .operand_rows = op.data(),
                                      .padded_n = op.padded_n,
                                      .ld = op.ld};
      launch(normalize_kernel<scalar_t, acc_t, Products>,
             row_blocks(op.rows()), np);
      at::Tensor partials;  // (splits, row_count) RowPartial, where the columns are split
      if (split.splits > 1)
        partials = at::empty({split.splits * range.count *
                              static_cast<int64_t>(sizeof(RowPartial<acc_t>))},
                             z_s.options().dtype(at::kByte));
      const ForwardParams<acc_t> fp{
          .unit = out.unit.data_ptr<acc_t>(),
          .operand_rows = op.data(),
          .padded_n = op.padded_n,
          .ld = op.ld,
          .log_scale = scale.data_ptr<acc_t>(),
          .alpha = static_cast<acc_t>(alpha),
          .max_scale = static_cast<acc_t>(max_scale),
          .n = static_cast<int>(n),
          .d = static_cast<int>(d),
          .row_begin = static_cast<int>(range.begin),
          .row_count = static_cast<int>(range.count),
          .split = split,
          .partials = partials.defined() ? static_cast<RowPartial<acc_t>*>(partials.data_ptr())
                                         : nullptr,
          .stats = {.row_lse = out.row_lse.data_ptr<acc_t>(),
                    .col_lse = out.col_lse.data_ptr<acc_t>(),
                    .row_kl = out.row_kl.data_ptr<acc_t>()},
          .row_ce = out.row_ce.data_ptr<acc_t>(),
          .scalars = {.loss = scalar(out.loss), .ce = scalar(out.ce), .kl = scalar(out.kl)},
          .blocks_done = blocks_done_ptr};
      launch(forward_kernel<Products, acc_t>, Grid{row_tiles, split.splits}, fp);
      if (split.splits > 1)
        launch(forward_merge_kernel<acc_t>, Grid{blocks_for(range.count, Traits::kThreads)}, fp);
    });
  });
  return out;
}

template <typename Launch>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor>
forward_impl(const Launch& launch, const at::Tensor& z_s, const at::Tensor& z_t,
             const at::Tensor& log_scale, double alpha, double max_scale) {
  check_icd_inputs(z_s, z_t, log_scale, alpha, max_scale);
  const int64_t n = z_s.size(0), d = z_s.size(1);
  check_cuda_kernel_limits(n, d, z_s.scalar_type());
  ForwardOutputs o = run_forward(launch, z_s, z_t, log_scale, alpha, max_scale,
                                 RowRange{.n = n, .begin = 0, .count = n});
  return {o.loss, o.ce, o.kl, o.row_lse, o.col_lse, o.row_kl, o.unit, o.norms};
}

// icd_forward_rows: the statistics of rows [row_begin, row_begin + row_count) of the problem
// of all n rows, with CE_i = r_i - L_ii, and the unit features and norms of all n rows.
template <typename Launch>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
forward_rows_impl(const Launch& launch, const at::Tensor& z_s, const at::Tensor& z_t,
                  const at::Tensor& log_scale, int64_t row_begin, int64_t row_count,
                  double max_scale) {
  check_icd_inputs(z_s, z_t, log_scale, 0.0, max_scale);
  const int64_t n = z_s.size(0), d = z_s.size(1);
  check_row_range(row_begin, row_count, n);
  check_cuda_kernel_limits(n, d, z_s.scalar_type());
  ForwardOutputs o = run_forward(launch, z_s, z_t, log_scale, 0.0, max_scale,
                                 RowRange{.n = n, .begin = row_begin, .count = row_count});
  return {o.row_lse, o.col_lse, o.row_kl, o.row_ce, o.unit, o.norms};
}

// The upstream weights as the backward kernel reads them, with the tensors that hold them.
template <typename acc_t>
struct WeightTensors {
  BackwardWeights<acc_t> weights{};
  at::Tensor keep_loss, keep_ce, keep_kl, row_ce, row_kl, largest;
};

// The gradients of rows `range` from the saved unit features and the statistics of all n
// rows, with the upstream weights `make_weights` gives (called inside the dtype dispatch with
// a WeightTensors<acc_t>& to fill).
template <typename Launch, typename MakeWeights>
std::tuple<at::Tensor, at::Tensor, at::Tensor> run_backward(
    const Launch& launch, const at::Tensor& unit, const at::Tensor& norms,
    const at::Tensor& log_scale, const at::Tensor& row_lse, const at::Tensor& col_lse,
    const at::Tensor& row_kl, const MakeWeights& make_weights, const RowRange& range,
    double max_scale, at::ScalarType grad_dtype, bool allow_tf32) {
  const int64_t n = range.n, d = unit.size(2);
  check_cuda_kernel_limits(n, d, grad_dtype);
  TORCH_CHECK_TYPE(unit.scalar_type() == accumulate_type(grad_dtype), "unit must be ",
                   accumulate_type(grad_dtype), " for ", grad_dtype, " gradients, got ",
                   unit.scalar_type());
  const auto acc = unit.options();
  const at::Tensor units = unit.contiguous(), unit_norms = norms.contiguous();
  const at::Tensor r = row_lse.contiguous(), c = col_lse.contiguous(), k = row_kl.contiguous();
  const at::Tensor scale = log_scale.to(acc.dtype()).contiguous();
  const int64_t row_tiles = blocks_for(range.count, Traits::kTileRows);
  const ColumnSplit split = column_split(row_tiles, n, launch.target_blocks());
  // Each split's share of dS and dT, summed into the first by the merge launch.
  at::Tensor ds = at::empty({split.splits, range.count, d}, acc);
  at::Tensor dt = at::empty({split.splits, range.count, d}, acc);
  at::Tensor grad_z_s = at::empty({range.count, d}, acc.dtype(grad_dtype));
  at::Tensor grad_z_t = at::empty({range.count, d}, acc.dtype(grad_dtype));
  at::Tensor block_dkappa = at::empty({row_tiles * split.splits}, acc.dtype(at::kDouble));
  at::Tensor grad_scale = at::empty({}, acc);
  at::Tensor blocks_done = at::zeros({1}, acc.dtype(at::kInt));

  ICD_DISPATCH_KERNEL_TYPES(grad_dtype, "icd_backward_cuda", [&] {
    using acc_t = acc_type_for<scalar_t>;
    WeightTensors<acc_t> w;
    make_weights(w);
    with_tile_products<scalar_t>(launch, allow_tf32, [&](auto products) {
      using Products = decltype(products);
      const OperandRows op = allocate_operand_rows<Products>(range, d, acc);
      if constexpr (Products::kOperandRows) {
        const OperandRowsParams<acc_t> rp{.unit = units.data_ptr<acc_t>(),
                                          .n = static_cast<int>(n),
                                          .d = static_cast<int>(d),
                                          .operand_rows = op.data(),
                                          .padded_n = op.padded_n,
                                          .ld = op.ld};
        launch(operand_rows_kernel<Products, acc_t>,
               row_blocks(op.rows()), rp);
      }
      const BackwardParams<acc_t> bp{
          .unit = units.data_ptr<acc_t>(),
          .operand_rows = op.data(),
          .padded_n = op.padded_n,
          .ld = op.ld,
          .norms = unit_norms.data_ptr<acc_t>(),
          .log_scale = scale.data_ptr<acc_t>(),
          .weights = w.weights,
          .max_scale = static_cast<acc_t>(max_scale),
          .n = static_cast<int>(n),
          .d = static_cast<int>(d),
          .row_begin = static_cast<int>(range.begin),
          .row_count = static_cast<int>(range.count),
          .split = split,
          .stats = {.row_lse = r.data_ptr<acc_t>(),
                    .col_lse = c.data_ptr<acc_t>(),
                    .row_kl = k.data_ptr<acc_t>()},
          .ds = ds.data_ptr<acc_t>(),
          .dt = dt.data_ptr<acc_t>(),
          .grad_z_s = grad_z_s.data_ptr(),
          .grad_z_t = grad_z_t.data_ptr(),
          .block_dkappa = block_dkappa.data_ptr<double>(),
          .grad_log_scale = grad_scale.data_ptr<acc_t>(),
          .blocks_done = reinterpret_cast<unsigned int*>(blocks_done.data_ptr<int>())};
      launch(backward_kernel<Products, scalar_t, acc_t>, Grid{row_tiles, split.splits}, bp);
      if (split.splits > 1) launch(backward_merge_kernel<scalar_t, acc_t>, Grid{row_tiles}, bp);
    });
  });
  return {grad_z_s, grad_z_t, grad_scale.to(log_scale.scalar_type()).reshape(log_scale.sizes())};
}

template <typename Launch>
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_impl(
    const Launch& launch, const std::optional<at::Tensor>& grad_loss,
    const std::optional<at::Tensor>& grad_ce, const std::optional<at::Tensor>& grad_kl,
    const at::Tensor& unit, const at::Tensor& norms, const at::Tensor& log_scale,
    const at::Tensor& row_lse, const at::Tensor& col_lse, const at::Tensor& row_kl,
    double alpha, double max_scale, at::ScalarType grad_dtype, bool allow_tf32) {
  check_icd_saved(unit, norms, log_scale, row_lse, col_lse, row_kl, alpha, max_scale,
                  grad_dtype);
  const int64_t n = unit.size(1);
  const auto upstream = [&](auto& w) {
    using acc_t = std::remove_const_t<std::remove_pointer_t<decltype(w.weights.grad_loss)>>;
    w.weights.grad_loss = upstream_pointer<acc_t>(grad_loss, w.keep_loss, "grad_loss");
    w.weights.grad_ce = upstream_pointer<acc_t>(grad_ce, w.keep_ce, "grad_ce");
    w.weights.grad_kl = upstream_pointer<acc_t>(grad_kl, w.keep_kl, "grad_kl");
    w.weights.alpha = static_cast<acc_t>(alpha);
  };
  return run_backward(launch, unit, norms, log_scale, row_lse, col_lse, row_kl, upstream,
                      RowRange{.n = n, .begin = 0, .count = n}, max_scale, grad_dtype,
                      allow_tf32);
}

// icd_backward_rows: the gradients of sum_i (weight_ce_i CE_i + weight_kl_i k_i) over all n
// rows with respect to the z_s and z_t rows [row_begin, row_begin + row_count), and the
// range's share of the gradient of log_scale.
template <typename Launch>
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_rows_impl(
    const Launch& launch, const at::Tensor& unit, const at::Tensor& norms,
    const at::Tensor& log_scale, const at::Tensor& row_lse, const at::Tensor& col_lse,
    const at::Tensor& row_kl, const at::Tensor& weight_ce, const at::Tensor& weight_kl,
    int64_t row_begin, int64_t row_count, double max_scale, at::ScalarType grad_dtype,
    bool allow_tf32) {
  check_icd_saved(unit, norms, log_scale, row_lse, col_lse, row_kl, 0.0, max_scale, grad_dtype);
  check_row_weights(unit, weight_ce, weight_kl);
  const int64_t n = unit.size(1);
  check_row_range(row_begin, row_count, n);
  const auto per_row = [&](auto& w) {
    using acc_t = std::remove_const_t<std::remove_pointer_t<decltype(w.weights.row_ce)>>;
    w.row_ce = weight_ce.contiguous();
    w.row_kl = weight_kl.contiguous();
    // The gradient tiles' scale needs the largest weights of all rows: on the device, no sync.
    w.largest = at::stack({w.row_ce.abs().max(), w.row_kl.abs().max()});
    w.weights.row_ce = w.row_ce.template data_ptr<acc_t>();
    w.weights.row_kl = w.row_kl.template data_ptr<acc_t>();
    w.weights.largest = w.largest.template data_ptr<acc_t>();
  };
  return run_backward(launch, unit, norms, log_scale, row_lse, col_lse, row_kl, per_row,
                      RowRange{.n = n, .begin = row_begin, .count = row_count}, max_scale,
                      grad_dtype, allow_tf32);
}

}  // namespace icd_fast::cuda
