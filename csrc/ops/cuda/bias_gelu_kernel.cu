// CUDA kernels of bias + exact GELU (math in ../bias_gelu.h; erf and exp from libdevice).
//
// Forward: a grid-stride loop over chunks of 8 elements (16-byte accesses; chunks of 1 when
// H % 8 != 0 or a pointer is misaligned), the bias chunk of the same columns, fp32 math.
// Backward: a (row blocks, column tiles) grid of 256-thread blocks. A block owns
// kRowsPerPartial consecutive rows and 32 * CH columns: lane l of warp w walks rows w, w + 8,
// ... of the block, writing dx and adding dy * gelu'(v) in fp32 registers for its CH columns;
// the 8 warps' sums are then added in warp order and written as one partial row of dbias;
// a second kernel adds the partial rows per column in a fixed order. No atomics.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../bias_gelu.h"
#include "layer_norm_kernel_vec.cuh"  // chunk loads/stores, column_sum_kernel

namespace fastmae {
namespace {

using namespace fastmae::cuda;
using namespace fastmae::bias_gelu;
constexpr int kRowsPerPartial = 64;
constexpr int kBwdWarps = 8;

template <int CH>
__global__ void __launch_bounds__(256) bias_gelu_fwd_kernel(const void* x, const void* bias, void* y, int64_t n,
                                                            int H, DType xt, DType bt) {
  const int64_t chunks = n / CH;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < chunks;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t e = i * CH;
    const int col = static_cast<int>(e % H);
    float v[CH], b[CH];
    load_chunk<CH>(x, e, xt, v);
    load_chunk<CH>(bias, col, bt, b);
#pragma unroll
    for (int k = 0; k < CH; ++k) {
      const float u = v[k] + b[k];
      v[k] = gelu(u, erff(u * kInvSqrt2));
    }
    store_chunk<CH>(y, e, xt, v);
  }
}

template <int CH>
__global__ void __launch_bounds__(kBwdWarps * 32) bias_gelu_bwd_kernel(const void* dy, const void* x, const void* bias,
                                                                       void* dx, float* part, int64_t rows, int H,
                                                                       DType dyt, DType xt, DType bt) {
  __shared__ float acc_s[kBwdWarps][32 * CH];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int col = (blockIdx.y * 32 + lane) * CH;
  float acc[CH];
#pragma unroll
  for (int k = 0; k < CH; ++k) acc[k] = 0.0f;
  if (col < H) {
    float b[CH];
    load_chunk<CH>(bias, col, bt, b);
    const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kRowsPerPartial;
    const int64_t r1 = min(rows, r0 + kRowsPerPartial);
    for (int64_t r = r0 + warp; r < r1; r += kBwdWarps) {
      const int64_t e = r * H + col;
      float v[CH], g[CH];
      load_chunk<CH>(x, e, xt, v);
      load_chunk<CH>(dy, e, dyt, g);
#pragma unroll
      for (int k = 0; k < CH; ++k) {
        const float u = v[k] + b[k];
        const float z = u * kInvSqrt2;
        g[k] *= gelu_grad(u, erff(z), __expf(-z * z));
        acc[k] += g[k];
      }
      store_chunk<CH>(dx, e, xt, g);
    }
  }
#pragma unroll
  for (int k = 0; k < CH; ++k) acc_s[warp][lane * CH + k] = acc[k];
  __syncthreads();
  for (int c = threadIdx.x; c < 32 * CH; c += kBwdWarps * 32) {
    const int gc = blockIdx.y * 32 * CH + c;
    if (gc < H) {
      float t = 0.0f;
#pragma unroll
      for (int w = 0; w < kBwdWarps; ++w) t += acc_s[w][c];
      part[static_cast<int64_t>(blockIdx.x) * H + gc] = t;
    }
  }
}

at::Tensor bias_gelu_fwd_cuda(const at::Tensor& x_, const at::Tensor& bias_) {
  TORCH_CHECK(x_.dim() == 2 && bias_.dim() == 1 && bias_.size(0) == x_.size(1), "bias_gelu_fwd: x (rows, H), bias (H)");
  FASTMAE_CHECK_SAME_DEVICE(x_, bias_);
  const c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor x = x_.contiguous(), bias = bias_.contiguous();
  const int64_t rows = x.size(0), H = x.size(1);
  at::Tensor y = empty_output({rows, H}, x.options());
  const int64_t n = rows * H;
  if (n == 0) return y;
  auto stream = at::cuda::getCurrentCUDAStream();
  const DType xt = dtype_code(x.scalar_type()), bt = dtype_code(bias.scalar_type());
  const bool vec = can_vectorise(H, {&x, &bias, &y});
  const int CH = vec ? 8 : 1;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((n / CH + 255) / 256, 65535LL * 8));
  if (vec) bias_gelu_fwd_kernel<8><<<blocks, 256, 0, stream>>>(x.const_data_ptr(), bias.const_data_ptr(), y.mutable_data_ptr(), n, static_cast<int>(H), xt, bt);
  else bias_gelu_fwd_kernel<1><<<blocks, 256, 0, stream>>>(x.const_data_ptr(), bias.const_data_ptr(), y.mutable_data_ptr(), n, static_cast<int>(H), xt, bt);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

std::tuple<at::Tensor, at::Tensor> bias_gelu_bwd_cuda(const at::Tensor& dy_, const at::Tensor& x_,
                                                      const at::Tensor& bias_) {
  TORCH_CHECK(x_.dim() == 2 && dy_.sizes() == x_.sizes() && bias_.dim() == 1 && bias_.size(0) == x_.size(1),
              "bias_gelu_bwd: dy, x (rows, H), bias (H)");
  FASTMAE_CHECK_SAME_DEVICE(x_, dy_);
  FASTMAE_CHECK_SAME_DEVICE(x_, bias_);
  const c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor dy = dy_.contiguous(), x = x_.contiguous(), bias = bias_.contiguous();
  const int64_t rows = x.size(0), H = x.size(1);
  at::Tensor dx = empty_output({rows, H}, x.options());
  const int P = bias_gelu::num_partials(rows, kRowsPerPartial);
  at::Tensor part = at::zeros({std::max(P, 1), H}, x.options().dtype(at::kFloat));
  at::Tensor db = empty_output({H}, x.options().dtype(at::kFloat));
  auto stream = at::cuda::getCurrentCUDAStream();
  if (rows > 0 && H > 0) {
    const DType dyt = dtype_code(dy.scalar_type()), xt = dtype_code(x.scalar_type()), bt = dtype_code(bias.scalar_type());
    const bool vec = can_vectorise(H, {&dy, &x, &bias, &dx});
    const int CH = vec ? 8 : 1;
    const int64_t tiles = (H + 32 * CH - 1) / (32 * CH);  // column tiles: gridDim.y, at most 65535
    TORCH_CHECK(tiles <= 65535, "bias_gelu_bwd (CUDA): H = ", H, " is above the kernel's limit of ", 65535 * 32 * CH,
                " columns", vec ? "" : " (for rows that are not whole 16-byte vectors)");
    const dim3 grid(P, static_cast<unsigned>(tiles));
    if (vec) bias_gelu_bwd_kernel<8><<<grid, kBwdWarps * 32, 0, stream>>>(dy.const_data_ptr(), x.const_data_ptr(), bias.const_data_ptr(), dx.mutable_data_ptr(), part.mutable_data_ptr<float>(), rows, static_cast<int>(H), dyt, xt, bt);
    else bias_gelu_bwd_kernel<1><<<grid, kBwdWarps * 32, 0, stream>>>(dy.const_data_ptr(), x.const_data_ptr(), bias.const_data_ptr(), dx.mutable_data_ptr(), part.mutable_data_ptr<float>(), rows, static_cast<int>(H), dyt, xt, bt);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (H > 0) {
    column_sum_kernel<<<static_cast<unsigned>((H + 31) / 32), 256, 0, stream>>>(part.const_data_ptr<float>(), db.mutable_data_ptr<float>(), std::max(P, 1), static_cast<int>(H));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {dx, db.to(bias.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmae_ext, CUDA, m) {
  m.impl("bias_gelu_fwd", &bias_gelu_fwd_cuda);
  m.impl("bias_gelu_bwd", &bias_gelu_bwd_cuda);
}

}  // namespace fastmae
