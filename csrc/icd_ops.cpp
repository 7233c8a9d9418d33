// The icd_fast operator library: op schemas, the build report and the Python module stub.
// Kernels register themselves per device in cpu/ and cuda/; autograd and fake-tensor rules
// are registered from Python (icd_fast/_ops.py).
#include <Python.h>
#include <torch/library.h>
#include <torch/version.h>

#include <string>

#ifndef ICD_FAST_CUDA_ARCHS
#define ICD_FAST_CUDA_ARCHS ""
#endif

namespace icd_fast {
namespace {

std::string build_info_json() {
  std::string cuda_built =
#ifdef ICD_FAST_WITH_CUDA
      "true";
#else
      "false";
#endif
  return std::string("{\"cpu_kernel\": true, \"cuda_kernel\": ") + cuda_built +
         ", \"cuda_archs\": \"" + ICD_FAST_CUDA_ARCHS + "\", \"torch_version\": \"" +
         TORCH_VERSION + "\"}";
}

}  // namespace

TORCH_LIBRARY(icd_fast, m) {
  // loss = ce + alpha * kl, and what the backward needs: the per-row statistics (3 N values)
  // and the unit features [s; t] (2 x N x D) with their norms (2 x N).
  m.def(
      "icd_forward(Tensor z_s, Tensor z_t, Tensor log_scale, float alpha, float max_scale) -> "
      "(Tensor loss, Tensor ce, Tensor kl, Tensor row_lse, Tensor col_lse, Tensor row_kl, "
      "Tensor unit, Tensor norms)");
  // Gradients of  grad_loss * loss + grad_ce * ce + grad_kl * kl  (a missing upstream
  // gradient counts as 0). allow_tf32: the TF32 setting the forward ran under (torch's
  // allow_tf32 for matmuls when it ran), so that the CUDA backward forms the same logits as
  // the forward whatever the setting is now; the CPU kernel ignores it.
  m.def(
      "icd_backward(Tensor? grad_loss, Tensor? grad_ce, Tensor? grad_kl, Tensor unit, "
      "Tensor norms, Tensor log_scale, Tensor row_lse, Tensor col_lse, Tensor row_kl, "
      "float alpha, float max_scale, ScalarType grad_dtype, bool allow_tf32) -> "
      "(Tensor grad_z_s, Tensor grad_z_t, Tensor grad_log_scale)");
  // The sharded loss (one rank's share, icd_fast/distributed.py): the statistics of rows
  // [row_begin, row_begin + row_count) of the problem formed by all ranks' features (N x D),
  // each row against all N columns, with CE_i = r_i - L_ii of those rows, and the unit
  // features and norms of all N rows for the backward.
  m.def(
      "icd_forward_rows(Tensor z_s, Tensor z_t, Tensor log_scale, int row_begin, "
      "int row_count, float max_scale) -> (Tensor row_lse, Tensor col_lse, Tensor row_kl, "
      "Tensor row_ce, Tensor unit, Tensor norms)");
  // Gradients of  sum_i (weight_ce_i * CE_i + weight_kl_i * k_i)  over all N rows (statistics
  // and weights of all N rows given) with respect to the z_s and z_t rows of the range, and
  // the range's share of the gradient of log_scale. allow_tf32 as for icd_backward.
  m.def(
      "icd_backward_rows(Tensor unit, Tensor norms, Tensor log_scale, Tensor row_lse, "
      "Tensor col_lse, Tensor row_kl, Tensor weight_ce, Tensor weight_kl, int row_begin, "
      "int row_count, float max_scale, ScalarType grad_dtype, bool allow_tf32) -> "
      "(Tensor grad_z_s, Tensor grad_z_t, Tensor grad_log_scale)");
  m.def("build_info() -> str", &build_info_json);
}

}  // namespace icd_fast

// The extension is imported as a Python module only so that loading it runs the static
// registrations above; it defines no Python functions of its own.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
