// The CUDA backend of the icd_fast ops: launches on the current stream, no host sync.
// c10 only (not ATen/cuda/CUDAContext.h, which needs the cuBLAS/cuSPARSE headers).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "icd_cuda_launch.h"

namespace icd_fast::cuda {
namespace {

struct StreamLaunch {
  cudaStream_t stream;
  // WMMA with bf16 operands needs sm_80 (the default arch list's oldest).
  bool tensor_cores() const {
    int device = 0, major = 0;
    C10_CUDA_CHECK(cudaGetDevice(&device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    return major >= 8;
  }
  // torch.backends.cuda.matmul.allow_tf32 (or a float32 matmul precision below "highest").
  bool allow_tf32() const { return at::globalContext().allowTF32CuBLAS(); }
  template <typename Kernel, typename Params>
  void operator()(Kernel kernel, int64_t blocks, const Params& params) const {
    if (blocks == 0) return;
    kernel<<<static_cast<unsigned int>(blocks), Traits::kThreads, 0, stream>>>(params);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor>
icd_forward_cuda(const at::Tensor& z_s, const at::Tensor& z_t, const at::Tensor& log_scale,
                 double alpha, double max_scale) {
  CHECK_DEVICE_TYPE(z_s, at::kCUDA);
  const c10::cuda::CUDAGuard guard(z_s.device());
  return forward_impl(StreamLaunch{c10::cuda::getCurrentCUDAStream()}, z_s, z_t, log_scale,
                      alpha, max_scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> icd_backward_cuda(
    const std::optional<at::Tensor>& grad_loss, const std::optional<at::Tensor>& grad_ce,
    const std::optional<at::Tensor>& grad_kl, const at::Tensor& unit, const at::Tensor& norms,
    const at::Tensor& log_scale, const at::Tensor& row_lse, const at::Tensor& col_lse,
    const at::Tensor& row_kl, double alpha, double max_scale, at::ScalarType grad_dtype) {
  CHECK_DEVICE_TYPE(unit, at::kCUDA);
  const c10::cuda::CUDAGuard guard(unit.device());
  return backward_impl(StreamLaunch{c10::cuda::getCurrentCUDAStream()}, grad_loss, grad_ce,
                       grad_kl, unit, norms, log_scale, row_lse, col_lse, row_kl, alpha,
                       max_scale, grad_dtype);
}

}  // namespace

TORCH_LIBRARY_IMPL(icd_fast, CUDA, m) {
  m.impl("icd_forward", &icd_forward_cuda);
  m.impl("icd_backward", &icd_backward_cuda);
}

}  // namespace icd_fast::cuda
