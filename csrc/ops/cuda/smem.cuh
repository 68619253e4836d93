// Dynamic shared memory above 48 KB a block: the kernel must opt in (cudaFuncSetAttribute), up
// to the card's own limit (sharedMemPerBlockOptin: 227 KB on sm_90, 163 KB on sm_80, 99 KB on
// sm_86 / sm_89 / sm_120). One check, and one message, for every kernel that sizes its shared
// memory from its input.
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstddef>
#include <string>

namespace fastmae {
namespace cuda {

constexpr size_t kSmemWithoutOptin = 48 * 1024;

// Opts `kernel` in to `bytes` of dynamic shared memory a block, or raises: "<what> needs <bytes>
// bytes of shared memory a block; this card allows <limit> (use backend <fallback>)".
template <typename Kernel>
void opt_in_dynamic_smem(Kernel* kernel, size_t bytes, const std::string& what, const char* fallback) {
  const int optin = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
  TORCH_CHECK(bytes <= std::max(static_cast<size_t>(optin), kSmemWithoutOptin), what, " needs ", bytes,
              " bytes of shared memory a block; this card allows ", optin, " (use backend ", fallback, ")");
  if (bytes > kSmemWithoutOptin)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

}  // namespace cuda
}  // namespace fastmae
