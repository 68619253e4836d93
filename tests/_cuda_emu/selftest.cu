// Small kernels for the tests of the emulation itself (tests/test_ext_cuda_emulated.py): one
// that uses each emulated feature correctly and one that breaks each rule the emulation checks.
// Compiled through the same rewrite as csrc/ops/cuda/*.cu; never built by nvcc.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <torch/library.h>

#include <cstdint>

namespace {

// C (16 x 8, fp32) = A (16 x 16) B (16 x 8) on one warp, fragments loaded as PTX documents them
// for mma.m16n8k16 (the layout attention_kernel.cu's comment states), lane = 4 g + t.
__global__ void mma_kernel(const uint16_t* A, const uint16_t* B, float* C, bool bf16) {
  const int lane = threadIdx.x, g = lane >> 2, t = lane & 3;
  auto pair = [](uint16_t lo, uint16_t hi) { return static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16); };
  const uint32_t a[4] = {pair(A[g * 16 + 2 * t], A[g * 16 + 2 * t + 1]),
                         pair(A[(g + 8) * 16 + 2 * t], A[(g + 8) * 16 + 2 * t + 1]),
                         pair(A[g * 16 + 2 * t + 8], A[g * 16 + 2 * t + 9]),
                         pair(A[(g + 8) * 16 + 2 * t + 8], A[(g + 8) * 16 + 2 * t + 9])};
  const uint32_t b0 = pair(B[(2 * t) * 8 + g], B[(2 * t + 1) * 8 + g]);
  const uint32_t b1 = pair(B[(2 * t + 8) * 8 + g], B[(2 * t + 9) * 8 + g]);
  float c[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  ::emu::mma_m16n8k16(bf16, c, a, b0, b1);
  for (int e = 0; e < 4; ++e) C[(g + 8 * (e >> 1)) * 8 + 2 * t + (e & 1)] = c[e];
}

at::Tensor selftest_mma(const at::Tensor& A, const at::Tensor& B) {
  at::Tensor C = at::empty({16, 8}, A.options().dtype(at::kFloat));
  mma_kernel<<<1, 32, 0, at::cuda::getCurrentCUDAStream()>>>(static_cast<const uint16_t*>(A.const_data_ptr()),
                                                             static_cast<const uint16_t*>(B.const_data_ptr()),
                                                             C.mutable_data_ptr<float>(), A.scalar_type() == at::kBFloat16);
  return C;
}

// Each warp's sum by xor shuffles; `exit_lane` >= 0 returns that lane first (a collective a lane
// left: an error); `split` sends half the warp to __syncthreads instead (an error).
__global__ void warp_sum_kernel(const float* x, float* out, int exit_lane, bool split) {
  const int lane = threadIdx.x & 31;
  if (lane == exit_lane) return;
  if (split && lane < 16) {
    __syncthreads();
    return;
  }
  float v = x[blockIdx.x * blockDim.x + threadIdx.x];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (lane == 0) out[blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32] = v;
}

at::Tensor selftest_warp_sum(const at::Tensor& x, int64_t threads, int64_t exit_lane, bool split) {
  const int64_t blocks = x.numel() / threads;
  at::Tensor out = at::empty({blocks * ((threads + 31) / 32)}, x.options());
  warp_sum_kernel<<<static_cast<unsigned>(blocks), static_cast<unsigned>(threads), 0, at::cuda::getCurrentCUDAStream()>>>(
      x.const_data_ptr<float>(), out.mutable_data_ptr<float>(), static_cast<int>(exit_lane), split);
  return out;
}

// Thread 0 writes shared memory that the others read with (`sync`) or without a barrier between:
// without it the result depends on the order the threads run in (a race).
__global__ void race_kernel(float* out, bool sync) {
  extern __shared__ float smem[];
  if (threadIdx.x == 0) smem[0] = 1.0f;
  if (sync) __syncthreads();
  out[threadIdx.x] = smem[0];
}

// Writes `count` floats of dynamic shared memory from thread 0 (past its end when count is above
// smem / 4).
__global__ void smem_write_kernel(int64_t count) {
  extern __shared__ float smem[];
  if (threadIdx.x == 0)
    for (int64_t i = 0; i < count; ++i) smem[i] = 0.0f;
}

// 40 KB of static shared memory besides the launch's dynamic bytes (48 KB in all is the limit
// without the opt-in).
__global__ void static_smem_kernel(float* out) {
  __shared__ float big[10 * 1024];
  extern __shared__ float dyn[];
  big[threadIdx.x] = 1.0f;
  dyn[threadIdx.x] = 2.0f;
  __syncthreads();
  out[threadIdx.x] = big[threadIdx.x] + dyn[threadIdx.x];
  if (threadIdx.x == 0) {  // an element no thread of this block wrote: poison, whatever the last launch left
    out[32] = big[100];
    big[100] = 5.0f;
  }
}

at::Tensor selftest_static_smem(int64_t dynamic_bytes) {
  at::Tensor out = at::empty({33}, at::dtype(at::kFloat));
  static_smem_kernel<<<1, 32, static_cast<size_t>(dynamic_bytes), at::cuda::getCurrentCUDAStream()>>>(
      out.mutable_data_ptr<float>());
  return out;
}

at::Tensor selftest_race(int64_t threads, bool sync) {
  at::Tensor out = at::empty({threads}, at::dtype(at::kFloat));
  race_kernel<<<1, static_cast<unsigned>(threads), 4, at::cuda::getCurrentCUDAStream()>>>(out.mutable_data_ptr<float>(),
                                                                                          sync);
  return out;
}

// A launch of grid x block threads with `smem` bytes (after the opt-in when optin > 0), each
// thread writing `count` floats of shared memory.
int64_t selftest_launch(int64_t grid_x, int64_t grid_y, int64_t block, int64_t smem, int64_t optin, int64_t count) {
  if (optin > 0)
    C10_CUDA_CHECK(cudaFuncSetAttribute(smem_write_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(optin)));
  const dim3 grid(static_cast<unsigned>(grid_x), static_cast<unsigned>(grid_y));
  smem_write_kernel<<<grid, static_cast<unsigned>(block), static_cast<size_t>(smem), at::cuda::getCurrentCUDAStream()>>>(
      count);
  return 0;
}

// Thread i copies x[i + shift] (for the memcheck run: a read past a tensor's end with shift > 0).
__global__ void shifted_copy_kernel(const float* x, float* out, int64_t n, int64_t shift) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i < n) out[i] = x[i + shift];
}

at::Tensor selftest_shifted_copy(const at::Tensor& x, int64_t shift) {
  at::Tensor out = at::empty_like(x);
  const int64_t n = x.numel();
  shifted_copy_kernel<<<static_cast<unsigned>((n + 127) / 128), 128, 0, at::cuda::getCurrentCUDAStream()>>>(
      x.const_data_ptr<float>(), out.mutable_data_ptr<float>(), n, shift);
  return out;
}

// A 16-byte load from x + offset floats: misaligned (a fault on the GPU) unless offset % 4 == 0.
__global__ void vector_load_kernel(const float* x, float* out, int64_t offset) {
  const float4 v = *reinterpret_cast<const float4*>(x + offset);
  out[0] = v.x + v.y + v.z + v.w;
}

at::Tensor selftest_vector_load(const at::Tensor& x, int64_t offset) {
  at::Tensor out = at::empty({1}, x.options());
  vector_load_kernel<<<1, 1, 0, at::cuda::getCurrentCUDAStream()>>>(x.const_data_ptr<float>(),
                                                                    out.mutable_data_ptr<float>(), offset);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmae_ext, CUDA, m) {
  m.impl("_selftest_mma", &selftest_mma);
  m.impl("_selftest_warp_sum", &selftest_warp_sum);
  m.impl("_selftest_race", &selftest_race);
  m.impl("_selftest_launch", &selftest_launch);
  m.impl("_selftest_shifted_copy", &selftest_shifted_copy);
  m.impl("_selftest_static_smem", &selftest_static_smem);
  m.impl("_selftest_vector_load", &selftest_vector_load);
}
