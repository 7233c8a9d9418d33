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

// The dtype of the statistics and of the loss: fp64 for fp64 inputs, fp32 for all others.
inline at::ScalarType accumulate_type(at::ScalarType input_type) {
  return input_type == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace icd_fast
