// Stand-ins for the ATen / c10 CUDA headers the kernel files include (ATen/cuda/CUDAContext.h,
// c10/cuda/CUDAGuard.h) under the emulation of emu.h: the tensors are CPU tensors, the stream
// is nothing, the device properties are an H100's / H200's (sm_90) but for the SM count.
#pragma once

#include <c10/core/Device.h>

#include "emu.h"

namespace at {
namespace cuda {
struct EmuStream {
  operator cudaStream_t() const { return nullptr; }
  cudaStream_t stream() const { return nullptr; }
};
inline EmuStream getCurrentCUDAStream(int = -1) { return {}; }
struct EmuDeviceProp {
  // 2, not an H100's 132: grids sized from the SM count are small, so that grid-stride loops
  // take more than one pass at test sizes
  int multiProcessorCount = 2;
  int sharedMemPerBlockOptin = 227 * 1024;
  size_t sharedMemPerBlock = 48 * 1024;
  int maxThreadsPerBlock = 1024;
  int warpSize = 32;
  int major = 9, minor = 0;
};
inline EmuDeviceProp* getCurrentDeviceProperties() {
  static EmuDeviceProp p;
  p.sharedMemPerBlockOptin = ::emu::smem_optin();
  return &p;
}
}  // namespace cuda
}  // namespace at

namespace c10 {
namespace cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
  explicit CUDAGuard(c10::DeviceIndex) {}
};
struct OptionalCUDAGuard {
  explicit OptionalCUDAGuard(std::optional<c10::Device>) {}
};
}  // namespace cuda
}  // namespace c10

#define C10_CUDA_CHECK(expr) TORCH_CHECK((expr) == cudaSuccess, "emu: CUDA call failed: " #expr)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() ((void)0)
