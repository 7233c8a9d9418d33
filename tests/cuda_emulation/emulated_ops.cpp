// The CUDA backend's kernels and host code, run on the CPU through the emulation layer.
// Built by the emul tests with torch.utils.cpp_extension.load.
#include "cuda_emulation.h"
// The emulation must come first: the kernels see its threadIdx, __syncthreads, ...
#include "../../csrc/cuda/icd_cuda_launch.h"

#include <torch/extension.h>

namespace {

struct EmulatedLaunch {
  int device_code_arch = 90;  // what the emulated build "compiled" for the device
  bool use_tf32 = false;      // torch's TF32 setting for matmuls
  int64_t busy_blocks = 1;     // the emulated GPU's target_blocks(): 1 never splits columns
  int compiled_arch() const { return device_code_arch; }
  bool allow_tf32() const { return use_tf32; }
  int64_t target_blocks() const { return busy_blocks; }
  void tensor_cores_missing(int) const {}
  template <typename Kernel, typename Params>
  void operator()(Kernel kernel, icd_fast::cuda::Grid grid, const Params& params) const {
    cuda_emulation::device_code_arch = device_code_arch;
    cuda_emulation::launch(static_cast<unsigned int>(grid.x), static_cast<unsigned int>(grid.y),
                           icd_fast::cuda::Traits::kThreads, [&] { kernel(params); });
  }
};

// The host decision alone: "tensor_cores" or "cuda_cores".
std::string products_for(at::ScalarType dtype, int compiled_arch, bool tf32) {
  return icd_fast::cuda::choose_products(dtype, compiled_arch, tf32) ==
                 icd_fast::cuda::ProductsKind::kTensorCores
             ? "tensor_cores"
             : "cuda_cores";
}

std::vector<at::Tensor> emulated_forward(const at::Tensor& z_s, const at::Tensor& z_t,
                                         const at::Tensor& log_scale, double alpha,
                                         double max_scale, int compiled_arch, bool tf32,
                                         int64_t target_blocks) {
  const EmulatedLaunch launch{
      .device_code_arch = compiled_arch, .use_tf32 = tf32, .busy_blocks = target_blocks};
  auto [loss, ce, kl, r, c, k, unit, norms] =
      icd_fast::cuda::forward_impl(launch, z_s, z_t, log_scale, alpha, max_scale);
  return {loss, ce, kl, r, c, k, unit, norms};
}

std::vector<at::Tensor> emulated_backward(const std::optional<at::Tensor>& grad_loss,
                                          const std::optional<at::Tensor>& grad_ce,
                                          const std::optional<at::Tensor>& grad_kl,
                                          const at::Tensor& unit, const at::Tensor& norms,
                                          const at::Tensor& log_scale, const at::Tensor& r,
                                          const at::Tensor& c, const at::Tensor& k,
                                          double alpha, double max_scale,
                                          at::ScalarType grad_dtype, int compiled_arch,
                                          bool tf32, std::optional<bool> torch_tf32_now,
                                          int64_t target_blocks) {
  // tf32: the forward's setting, the op's argument; torch_tf32_now: torch's setting while
  // the backward runs (by default the same), which the backward must not read.
  const EmulatedLaunch launch{.device_code_arch = compiled_arch,
                              .use_tf32 = torch_tf32_now.value_or(tf32),
                              .busy_blocks = target_blocks};
  auto [gs, gt, gl] = icd_fast::cuda::backward_impl(launch, grad_loss, grad_ce, grad_kl, unit,
                                                    norms, log_scale, r, c, k, alpha,
                                                    max_scale, grad_dtype, tf32);
  return {gs, gt, gl};
}

std::vector<at::Tensor> emulated_forward_rows(const at::Tensor& z_s, const at::Tensor& z_t,
                                              const at::Tensor& log_scale, int64_t row_begin,
                                              int64_t row_count, double max_scale,
                                              int compiled_arch, bool tf32,
                                              int64_t target_blocks) {
  auto [r, c, k, ce, unit, norms] = icd_fast::cuda::forward_rows_impl(
      EmulatedLaunch{
          .device_code_arch = compiled_arch, .use_tf32 = tf32, .busy_blocks = target_blocks},
      z_s, z_t, log_scale, row_begin, row_count, max_scale);
  return {r, c, k, ce, unit, norms};
}

std::vector<at::Tensor> emulated_backward_rows(
    const at::Tensor& unit, const at::Tensor& norms, const at::Tensor& log_scale,
    const at::Tensor& r, const at::Tensor& c, const at::Tensor& k, const at::Tensor& weight_ce,
    const at::Tensor& weight_kl, int64_t row_begin, int64_t row_count, double max_scale,
    at::ScalarType grad_dtype, int compiled_arch, bool tf32, int64_t target_blocks) {
  auto [gs, gt, gl] = icd_fast::cuda::backward_rows_impl(
      EmulatedLaunch{
          .device_code_arch = compiled_arch, .use_tf32 = tf32, .busy_blocks = target_blocks},
      unit, norms,
      log_scale, r, c, k, weight_ce, weight_kl, row_begin, row_count, max_scale, grad_dtype,
      tf32);
  return {gs, gt, gl};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &emulated_forward, "", pybind11::arg("z_s"), pybind11::arg("z_t"),
        pybind11::arg("log_scale"), pybind11::arg("alpha"), pybind11::arg("max_scale"),
        pybind11::arg("compiled_arch") = 90, pybind11::arg("tf32") = false,
        pybind11::arg("target_blocks") = 1);
  m.def("backward", &emulated_backward, "", pybind11::arg("grad_loss"), pybind11::arg("grad_ce"),
        pybind11::arg("grad_kl"), pybind11::arg("unit"), pybind11::arg("norms"),
        pybind11::arg("log_scale"), pybind11::arg("row_lse"), pybind11::arg("col_lse"),
        pybind11::arg("row_kl"), pybind11::arg("alpha"), pybind11::arg("max_scale"),
        pybind11::arg("grad_dtype"), pybind11::arg("compiled_arch") = 90,
        pybind11::arg("tf32") = false, pybind11::arg("torch_tf32_now") = pybind11::none(),
        pybind11::arg("target_blocks") = 1);
  m.def("forward_rows", &emulated_forward_rows, "", pybind11::arg("z_s"), pybind11::arg("z_t"),
        pybind11::arg("log_scale"), pybind11::arg("row_begin"), pybind11::arg("row_count"),
        pybind11::arg("max_scale"), pybind11::arg("compiled_arch") = 90,
        pybind11::arg("tf32") = false, pybind11::arg("target_blocks") = 1);
  m.def("backward_rows", &emulated_backward_rows, "", pybind11::arg("unit"),
        pybind11::arg("norms"), pybind11::arg("log_scale"), pybind11::arg("row_lse"),
        pybind11::arg("col_lse"), pybind11::arg("row_kl"), pybind11::arg("weight_ce"),
        pybind11::arg("weight_kl"), pybind11::arg("row_begin"), pybind11::arg("row_count"),
        pybind11::arg("max_scale"), pybind11::arg("grad_dtype"),
        pybind11::arg("compiled_arch") = 90, pybind11::arg("tf32") = false,
        pybind11::arg("target_blocks") = 1);
  m.def("set_schedule", &cuda_emulation::set_schedule,
        "Blocks of the following launches: shuffled by seed (+1 per launch), so many at once",
        pybind11::arg("seed"), pybind11::arg("concurrent_blocks"));
  m.def("products_for", &products_for, "", pybind11::arg("dtype"), pybind11::arg("compiled_arch"),
        pybind11::arg("tf32"));
}
