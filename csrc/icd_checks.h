// Input checks shared by every backend's launcher. Each failure raises a Python exception
// (ValueError / TypeError through TORCH_CHECK_VALUE / TORCH_CHECK_TYPE) whose message names
// the argument and what is wrong with it, so a bad call never reaches a kernel.
#pragma once

#include <ATen/ATen.h>

#include <cmath>

#define CHECK_NDIM(x, n) \
  TORCH_CHECK_VALUE((x).dim() == (n), #x " must be a ", n, "-D tensor, got shape ", (x).sizes())
#define CHECK_FLOATING(x) \
  TORCH_CHECK_TYPE(at::isFloatingType((x).scalar_type()), #x " must be a floating-point tensor, got ", (x).scalar_type())
#define CHECK_SAME_DTYPE(x, y)                                                                 \
  TORCH_CHECK_TYPE((x).scalar_type() == (y).scalar_type(), #x " and " #y                    \
                   " must have the same dtype, got ", (x).scalar_type(), " and ", (y).scalar_type())
#define CHECK_SAME_DEVICE(x, y)                                                                \
  TORCH_CHECK_VALUE((x).device() == (y).device(), #x " and " #y                             \
                    " must be on the same device, got ", (x).device(), " and ", (y).device())
#define CHECK_SCALAR_TENSOR(x)                                                                 \
  TORCH_CHECK_VALUE((x).numel() == 1 && (x).dim() <= 1,                                       \
                    #x " must hold exactly one value (shape () or (1,)), got shape ", (x).sizes())
#define CHECK_DEVICE_TYPE(x, expected)                                                         \
  TORCH_CHECK_VALUE((x).device().type() == (expected), #x " must be a ", expected,             \
                    " tensor, got one on ", (x).device())

namespace icd_fast {

// Checks the arguments that the forward and the backward ops share.
inline void check_icd_inputs(const at::Tensor& z_s, const at::Tensor& z_t,
                             const at::Tensor& log_scale, double alpha, double max_scale) {
  CHECK_NDIM(z_s, 2);
  CHECK_NDIM(z_t, 2);
  TORCH_CHECK_VALUE(z_s.size(0) == z_t.size(0),
                    "z_s and z_t must have the same number of rows (batch size N), got ",
                    z_s.size(0), " and ", z_t.size(0));
  TORCH_CHECK_VALUE(z_s.size(1) == z_t.size(1),
                    "z_s and z_t must have the same feature size D, got ", z_s.size(1), " and ",
                    z_t.size(1));
  TORCH_CHECK_VALUE(z_s.size(0) > 0, "the batch is empty: z_s has shape ", z_s.sizes());
  TORCH_CHECK_VALUE(z_s.size(1) > 0, "the feature size D is 0: z_s has shape ", z_s.sizes());
  CHECK_FLOATING(z_s);
  CHECK_SAME_DTYPE(z_s, z_t);
  CHECK_FLOATING(log_scale);
  CHECK_SCALAR_TENSOR(log_scale);
  CHECK_SAME_DEVICE(z_s, z_t);
  CHECK_SAME_DEVICE(z_s, log_scale);
  TORCH_CHECK_VALUE(std::isfinite(alpha) && alpha >= 0.0,
                    "alpha must be a finite number >= 0, got ", alpha);
  TORCH_CHECK_VALUE(max_scale > 0.0, "max_scale must be > 0, got ", max_scale);
}

// Checks what the backward op receives from the forward: the unit features (2, N, D), their
// norms (2, N) and the row statistics (N), all of the accumulate dtype.
inline void check_icd_saved(const at::Tensor& unit, const at::Tensor& norms,
                            const at::Tensor& log_scale, const at::Tensor& row_lse,
                            const at::Tensor& col_lse, const at::Tensor& row_kl, double alpha,
                            double max_scale, at::ScalarType grad_dtype) {
  TORCH_CHECK_VALUE(unit.dim() == 3 && unit.size(0) == 2 && unit.size(1) > 0 && unit.size(2) > 0,
                    "unit must be the (2, N, D) unit features saved by icd_forward, got shape ",
                    unit.sizes());
  TORCH_CHECK_TYPE(unit.scalar_type() == at::kFloat || unit.scalar_type() == at::kDouble,
                   "unit must be float32 or float64, got ", unit.scalar_type());
  const int64_t n = unit.size(1);
  TORCH_CHECK_VALUE(norms.dim() == 2 && norms.size(0) == 2 && norms.size(1) == n &&
                        norms.scalar_type() == unit.scalar_type(),
                    "norms must be a (2, N = ", n, ") ", unit.scalar_type(), " tensor, got ",
                    norms.scalar_type(), " of shape ", norms.sizes());
  for (const at::Tensor* stat : {&row_lse, &col_lse, &row_kl}) {
    TORCH_CHECK_VALUE(stat->dim() == 1 && stat->size(0) == n &&
                          stat->scalar_type() == unit.scalar_type(),
                      "the saved row statistics must be ", unit.scalar_type(),
                      " vectors of length N = ", n, ", got ", stat->scalar_type(), " of shape ",
                      stat->sizes());
    CHECK_SAME_DEVICE(unit, *stat);
  }
  CHECK_SAME_DEVICE(unit, norms);
  CHECK_FLOATING(log_scale);
  CHECK_SCALAR_TENSOR(log_scale);
  CHECK_SAME_DEVICE(unit, log_scale);
  TORCH_CHECK_TYPE(at::isFloatingType(grad_dtype), "grad_dtype must be a floating dtype, got ",
                   grad_dtype);
  TORCH_CHECK_VALUE(std::isfinite(alpha) && alpha >= 0.0,
                    "alpha must be a finite number >= 0, got ", alpha);
  TORCH_CHECK_VALUE(max_scale > 0.0, "max_scale must be > 0, got ", max_scale);
}

// Checks the row range [row_begin, row_begin + row_count) of an n-row problem.
inline void check_row_range(int64_t row_begin, int64_t row_count, int64_t n) {
  TORCH_CHECK_VALUE(row_count > 0, "row_count must be > 0, got ", row_count);
  TORCH_CHECK_VALUE(row_begin >= 0 && row_begin <= n - row_count,
                    "the rows [row_begin, row_begin + row_count) = [", row_begin, ", ",
                    row_begin + row_count, ") must lie within the N = ", n, " rows");
}

// Checks the per-row upstream weights of the row-range backward: length-N vectors of the
// statistics' dtype, on the features' device.
inline void check_row_weights(const at::Tensor& unit, const at::Tensor& weight_ce,
                              const at::Tensor& weight_kl) {
  const int64_t n = unit.size(1);
  for (const at::Tensor* w : {&weight_ce, &weight_kl}) {
    TORCH_CHECK_VALUE(w->dim() == 1 && w->size(0) == n && w->scalar_type() == unit.scalar_type(),
                      "the per-row weights must be ", unit.scalar_type(),
                      " vectors of length N = ", n, ", got ", w->scalar_type(), " of shape ",
                      w->sizes());
    CHECK_SAME_DEVICE(unit, *w);
  }
}

// The dtype of the statistics and of the loss: fp64 for fp64 inputs, fp32 for all others.
inline at::ScalarType accumulate_type(at::ScalarType input_type) {
  return input_type == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace icd_fast
