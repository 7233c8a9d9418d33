// The CUDA backend's kernels and host code, run on the CPU through the emulation layer.
// Built by the emul tests with torch.utils.cpp_extension.load.
#include "cuda_emulation.h"
// The emulation must come first: the kernels see its threadIdx, __syncthreads, ...
#include "../../csrc/cuda/icd_cuda_launch.h"

#include <torch/extension.h>

namespace {

struct EmulatedLaunch {
  template <typename Kernel, typename Params>
  void operator()(Kernel kernel, int64_t blocks, const Params& params) const {
    cuda_emulation::launch(static_cast<unsigned int>(blocks), icd_fast::cuda::Traits::kThreads,
                           [&] { kernel(params); });
  }
};

std::vector<at::Tensor> emulated_forward(const at::Tensor& z_s, const at::Tensor& z_t,
                                         const at::Tensor& log_scale, double alpha,
                                         double max_scale) {
  auto [loss, ce, kl, r, c, k, unit, norms] =
      icd_fast::cuda::forward_impl(EmulatedLaunch{}, z_s, z_t, log_scale, alpha, max_scale);
  return {loss, ce, kl, r, c, k, unit, norms};
}

std::vector<at::Tensor> emulated_backward(const std::optional<at::Tensor>& grad_loss,
                                          const std::optional<at::Tensor>& grad_ce,
                                          const std::optional<at::Tensor>& grad_kl,
                                          const at::Tensor& unit, const at::Tensor& norms,
                                          const at::Tensor& log_scale, const at::Tensor& r,
                                          const at::Tensor& c, const at::Tensor& k,
                                          double alpha, double max_scale,
                                          at::ScalarType grad_dtype) {
  auto [gs, gt, gl] = icd_fast::cuda::backward_impl(EmulatedLaunch{}, grad_loss, grad_ce,
                                                    grad_kl, unit, norms, log_scale, r, c, k,
                                                    alpha, max_scale, grad_dtype);
  return {gs, gt, gl};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &emulated_forward);
  m.def("backward", &emulated_backward);
}
