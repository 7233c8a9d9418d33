// The CUDA backend's kernels and host code, run on the CPU through the emulation layer.
// Built by the emul tests with torch.utils.cpp_extension.load.
#include "cuda_emulation.h"
// The emulation must come first: the kernels see its threadIdx, __syncthreads, ...
#include "../../csrc/cuda/icd_cuda_launch.h"

#include <torch/extension.h>

namespace {

struct EmulatedLaunch {
  bool use_tensor_cores = true;  // the WMMA paths, or the CUDA-core ones
  bool use_tf32 = false;         // float32 inputs on the TF32 tensor cores
  bool tensor_cores() const { return use_tensor_cores; }
  bool allow_tf32() const { return use_tf32; }
  template <typename Kernel, typename Params>
  void operator()(Kernel kernel, int64_t blocks, const Params& params) const {
    cuda_emulation::launch(static_cast<unsigned int>(blocks), icd_fast::cuda::Traits::kThreads,
                           [&] { kernel(params); });
  }
};

std::vector<at::Tensor> emulated_forward(const at::Tensor& z_s, const at::Tensor& z_t,
                                         const at::Tensor& log_scale, double alpha,
                                         double max_scale, bool tensor_cores, bool tf32) {
  auto [loss, ce, kl, r, c, k, unit, norms] = icd_fast::cuda::forward_impl(
      EmulatedLaunch{tensor_cores, tf32}, z_s, z_t, log_scale, alpha, max_scale);
  return {loss, ce, kl, r, c, k, unit, norms};
}

std::vector<at::Tensor> emulated_backward(const std::optional<at::Tensor>& grad_loss,
                                          const std::optional<at::Tensor>& grad_ce,
                                          const std::optional<at::Tensor>& grad_kl,
                                          const at::Tensor& unit, const at::Tensor& norms,
                                          const at::Tensor& log_scale, const at::Tensor& r,
                                          const at::Tensor& c, const at::Tensor& k,
                                          double alpha, double max_scale,
                                          at::ScalarType grad_dtype, bool tensor_cores,
                                          bool tf32) {
  auto [gs, gt, gl] = icd_fast::cuda::backward_impl(EmulatedLaunch{tensor_cores, tf32}, grad_loss, grad_ce,
                                                    grad_kl, unit, norms, log_scale, r, c, k,
                                                    alpha, max_scale, grad_dtype);
  return {gs, gt, gl};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &emulated_forward, "", pybind11::arg("z_s"), pybind11::arg("z_t"),
        pybind11::arg("log_scale"), pybind11::arg("alpha"), pybind11::arg("max_scale"),
        pybind11::arg("tensor_cores") = true, pybind11::arg("tf32") = false);
  m.def("backward", &emulated_backward, "", pybind11::arg("grad_loss"), pybind11::arg("grad_ce"),
        pybind11::arg("grad_kl"), pybind11::arg("unit"), pybind11::arg("norms"),
        pybind11::arg("log_scale"), pybind11::arg("row_lse"), pybind11::arg("col_lse"),
        pybind11::arg("row_kl"), pybind11::arg("alpha"), pybind11::arg("max_scale"),
        pybind11::arg("grad_dtype"), pybind11::arg("tensor_cores") = true,
        pybind11::arg("tf32") = false);
}
