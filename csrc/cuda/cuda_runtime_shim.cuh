// The CUDA runtime, device types and WMMA for the kernels: the toolkit's
// headers, or -- in the test builds that run the kernels on a CPU
// (-DFASTMINE_CUDA_EMULATION) -- the host emulation, tests/csrc/emulation/
// cuda_emulation.h, which only those builds have on their include path.
// The one place production sources name the emulation.  It provides:
//   * the runtime headers;
//   * FASTMINE_TARGET_ARCH: the GPU generation the device code is compiled
//     for (__CUDA_ARCH__; the emulated generation FASTMINE_EMU_ARCH; 0 in
//     nvcc's host pass);
//   * launch_kernel: kernel<<<grid, block, 0, stream>>>, or the emulation
//     running the grid on the host (and validating the configuration);
//   * with FASTMINE_CUDA_TORCH_LAUNCHER defined (mine_cuda.cu, after ATen):
//     the launcher's device type, stream, device guard, error check, op names
//     and dispatch key -- CUDA tensors, or CPU tensors under emulation.
#pragma once

#if defined(FASTMINE_CUDA_EMULATION)
#include "cuda_emulation.h"
#else
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <mma.h>
#endif

#if defined(FASTMINE_CUDA_EMULATION)
#define FASTMINE_TARGET_ARCH FASTMINE_EMU_ARCH
#elif defined(__CUDA_ARCH__)
#define FASTMINE_TARGET_ARCH __CUDA_ARCH__
#else
#define FASTMINE_TARGET_ARCH 0
#endif

namespace fastmine {
namespace cuda {

// Every kernel launch: kernel<<<grid, block, 0, stream>>> under the CUDA
// compiler; under FASTMINE_CUDA_EMULATION the host emulation runs the grid (and
// validates the configuration).  `name` labels emulation errors.
template <typename... Params, typename... Args>
inline void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, cudaStream_t stream,
                          const char* name, Args... args) {
#if defined(FASTMINE_CUDA_EMULATION)
  (void)stream;
  emu::launch_kernel(kernel, grid, block, name, args...);
#else
  (void)name;
  kernel<<<grid, block, 0, stream>>>(args...);
#endif
}

}  // namespace cuda
}  // namespace fastmine

#if defined(FASTMINE_CUDA_TORCH_LAUNCHER)
#if defined(FASTMINE_CUDA_EMULATION)
#define FASTMINE_CUDA_CHECK(...)                                                   \
  do {                                                                             \
    const cudaError_t err_ = (__VA_ARGS__);                                        \
    TORCH_CHECK(err_ == cudaSuccess, "fastmine (emulated CUDA): ",                 \
                cudaGetErrorString(err_));                                         \
  } while (0)
#define FASTMINE_CUDA_IMPL "cuda_emulated"
#define FASTMINE_CUDA_KEY CPU
#define FASTMINE_CUDA_SELECT_NAMESPACE fastmine_cuda_emulated
namespace fastmine {
namespace cuda {
namespace {
constexpr auto kDeviceType = c10::DeviceType::CPU;
constexpr bool kEagerChecks = true;
cudaStream_t current_stream() { return nullptr; }
struct DeviceGuard {
  explicit DeviceGuard(const at::Device&) {}
};
// As the emulated cudaMalloc: reads of never-written workspace stand out.
void poison(at::Tensor& workspace) { workspace.fill_(0x7f); }
}  // namespace
}  // namespace cuda
}  // namespace fastmine
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#define FASTMINE_CUDA_CHECK(...) C10_CUDA_CHECK((__VA_ARGS__))
#define FASTMINE_CUDA_IMPL "cuda"
#define FASTMINE_CUDA_KEY CUDA
#define FASTMINE_CUDA_SELECT_NAMESPACE fastmine
namespace fastmine {
namespace cuda {
namespace {
constexpr auto kDeviceType = c10::DeviceType::CUDA;
constexpr bool kEagerChecks = false;
cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }
using DeviceGuard = c10::cuda::CUDAGuard;
void poison(at::Tensor&) {}
}  // namespace
}  // namespace cuda
}  // namespace fastmine
#endif
#endif  // FASTMINE_CUDA_TORCH_LAUNCHER
