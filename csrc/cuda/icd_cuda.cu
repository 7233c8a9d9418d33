// The CUDA backend of the icd_fast ops: launches on the current stream, no host sync.
// c10 only (not ATen/cuda/CUDAContext.h, which needs the cuBLAS/cuSPARSE headers).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <atomic>
#include <vector>

#include "icd_cuda_launch.h"

namespace icd_fast::cuda {
namespace {

// Compiled with the kernels, for the same arch list: its attributes tell which code the
// device in use runs (a cubin for its arch, or PTX of an older virtual arch JIT-compiled).
__global__ void arch_probe_kernel() {}

// The virtual arch of the device code that runs on `device` (cudaFuncAttributes::ptxVersion:
// 80 for sm_80, 75 for a compute_75 PTX JIT-compiled on a newer GPU), asked once per device.
// The first ask loads the extension's module on that device (and JIT-compiles PTX where no
// cubin fits), which a stream capture does not allow: run one op call on each device before
// capturing the loss into a raw CUDA graph (torch.cuda.graphs' warm-up iterations do it;
// torch.compile's cudagraph trees run eagerly first as well).
int compiled_arch_of(int device) {
  static std::vector<std::atomic<int>> known(static_cast<size_t>(c10::cuda::device_count()));
  TORCH_INTERNAL_ASSERT(device >= 0 && static_cast<size_t>(device) < known.size());
  int arch = known[device].load(std::memory_order_relaxed);
  if (arch != 0) return arch;
  cudaFuncAttributes attributes{};
  const cudaError_t status = cudaFuncGetAttributes(&attributes, arch_probe_kernel);
  if (status == cudaErrorInvalidDeviceFunction || status == cudaErrorNoKernelImageForDevice) {
    (void)cudaGetLastError();  // not a sticky error: clear it, so later calls do not see it
    cudaDeviceProp prop{};
    C10_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
    TORCH_CHECK(false, "icd_fast's CUDA kernels were not compiled for this GPU (", prop.name,
                ", compute capability ", prop.major, ".", prop.minor,
                "); rebuild with TORCH_CUDA_ARCH_LIST including ", prop.major, ".", prop.minor);
  }
  C10_CUDA_CHECK(status);
  arch = attributes.ptxVersion;
  known[device].store(arch, std::memory_order_relaxed);
  return arch;
}

// The SM count of `device`, asked once per device.
int multiprocessors_of(int device) {
  static std::vector<std::atomic<int>> known(static_cast<size_t>(c10::cuda::device_count()));
  TORCH_INTERNAL_ASSERT(device >= 0 && static_cast<size_t>(device) < known.size());
  int count = known[device].load(std::memory_order_relaxed);
  if (count == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
    known[device].store(count, std::memory_order_relaxed);
  }
  return count;
}

struct StreamLaunch {
  cudaStream_t stream;
  int compiled_arch() const {
    int device = 0;
    C10_CUDA_CHECK(cudaGetDevice(&device));
    return compiled_arch_of(device);
  }
  // fp16/bf16 input on CUDA cores because the build holds no sm_80+ code for this GPU: worth
  // a warning only where the GPU itself has the tensor cores.
  void tensor_cores_missing(int arch) const {
    int device = 0, major = 0;
    C10_CUDA_CHECK(cudaGetDevice(&device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    if (major * 100 >= ICD_FAST_TENSOR_CORE_MIN_ARCH)
      TORCH_WARN_ONCE("icd_fast: the CUDA kernels running on this GPU were compiled for "
                      "compute_", arch, ", which has no tensor-core code; fp16/bf16 inputs use "
                      "CUDA cores. Build with TORCH_CUDA_ARCH_LIST naming this GPU's arch "
                      "(8.0 or newer) for the tensor cores.");
  }
  // torch.backends.cuda.matmul.allow_tf32 (or a float32 matmul precision below "highest"):
  // read by the forward only; the backward is handed the forward's setting.
  bool allow_tf32() const { return at::globalContext().allowTF32CuBLAS(); }
  // Two blocks per SM: the tile kernels fit two to three per SM (registers), so a grid of
  // this size runs in one wave with every SM busy (column_split()).
  int64_t target_blocks() const {
    int device = 0;
    C10_CUDA_CHECK(cudaGetDevice(&device));
    return 2 * static_cast<int64_t>(multiprocessors_of(device));
  }
  template <typename Kernel, typename Params>
  void operator()(Kernel kernel, Grid grid, const Params& params) const {
    if (grid.x == 0 || grid.y == 0) return;
    const dim3 blocks(static_cast<unsigned int>(grid.x), static_cast<unsigned int>(grid.y));
    kernel<<<blocks, Traits::kThreads, 0, stream>>>(params);
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
    const at::Tensor& row_kl, double alpha, double max_scale, at::ScalarType grad_dtype,
    bool allow_tf32) {
  CHECK_DEVICE_TYPE(unit, at::kCUDA);
  const c10::cuda::CUDAGuard guard(unit.device());
  return backward_impl(StreamLaunch{c10::cuda::getCurrentCUDAStream()}, grad_loss, grad_ce,
                       grad_kl, unit, norms, log_scale, row_lse, col_lse, row_kl, alpha,
                       max_scale, grad_dtype, allow_tf32);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
icd_forward_rows_cuda(const at::Tensor& z_s, const at::Tensor& z_t, const at::Tensor& log_scale,
                      int64_t row_begin, int64_t row_count, double max_scale) {
  CHECK_DEVICE_TYPE(z_s, at::kCUDA);
  const c10::cuda::CUDAGuard guard(z_s.device());
  return forward_rows_impl(StreamLaunch{c10::cuda::getCurrentCUDAStream()}, z_s, z_t,
                           log_scale, row_begin, row_count, max_scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> icd_backward_rows_cuda(
    const at::Tensor& unit, const at::Tensor& norms, const at::Tensor& log_scale,
    const at::Tensor& row_lse, const at::Tensor& col_lse, const at::Tensor& row_kl,
    const at::Tensor& weight_ce, const at::Tensor& weight_kl, int64_t row_begin,
    int64_t row_count, double max_scale, at::ScalarType grad_dtype, bool allow_tf32) {
  CHECK_DEVICE_TYPE(unit, at::kCUDA);
  const c10::cuda::CUDAGuard guard(unit.device());
  return backward_rows_impl(StreamLaunch{c10::cuda::getCurrentCUDAStream()}, unit, norms,
                            log_scale, row_lse, col_lse, row_kl, weight_ce, weight_kl,
                            row_begin, row_count, max_scale, grad_dtype, allow_tf32);
}

}  // namespace

TORCH_LIBRARY_IMPL(icd_fast, CUDA, m) {
  m.impl("icd_forward", &icd_forward_cuda);
  m.impl("icd_backward", &icd_backward_cuda);
  m.impl("icd_forward_rows", &icd_forward_rows_cuda);
  m.impl("icd_backward_rows", &icd_backward_rows_cuda);
}

}  // namespace icd_fast::cuda
