// patchify / unpatchify on CUDA tensors (the CPU twins are in cpu/patchify_kernel.cpp).
//
// Pure data movement, built for bandwidth: every element is read once and written once, and the
// writes are 16-byte vectors. Each thread owns one 16-byte chunk of the contiguous output
// (V = 16 / sizeof(out) elements) and gathers its V inputs through the input's strides with the
// index math of ops/patchify.h. Neighbouring threads write neighbouring chunks; their reads fall
// in the same few image rows (patchify) or token rows (unpatchify), so they coalesce in L1/L2.
// The chunk is stored as one vector when the output is 16-byte aligned and the chunk is whole;
// the tail (and outputs whose rows are not a multiple of V) is stored element by element.
// Grid-stride loop, 64-bit offsets. Casts on the way for the same dtype and fp16/bf16 <-> fp32;
// other (in, out) pairs run in the input's dtype and are converted after.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/TypeCast.h>
#include <torch/library.h>

#include "ops/patchify.h"

namespace fastmae {
namespace patchify {
namespace {

constexpr int kThreads = 256;

template <typename in_t, typename out_t>
__global__ void patchify_kernel(const in_t* __restrict__ src, out_t* __restrict__ dst, Geom g, ImageStrides s,
                                int64_t N, bool vec_ok) {
  constexpr int V = Vec16<out_t>::kSize;
  const int64_t D = g.D(), L = g.L(), total = N * L * D;
  const int64_t chunks = ceil_div(total, V);
  for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < chunks; k += int64_t(gridDim.x) * blockDim.x) {
    Vec16<out_t> v;
#pragma unroll
    for (int t = 0; t < V; ++t) {
      const int64_t e = k * V + t;  // flat output offset (n*L + l)*D + d
      if (e < total) {
        const int64_t row = e / D, d = e - row * D;
        const int64_t n = row / L, l = row - n * L;
        int64_t c, y, x;
        token_to_pixel(g, l, d, c, y, x);
        v.v[t] = c10::convert<out_t>(src[image_offset(s, n, c, y, x)]);
      }
    }
    if (vec_ok && (k + 1) * V <= total) {
      *reinterpret_cast<Vec16<out_t>*>(dst + k * V) = v;
    } else {
      for (int t = 0; t < V && k * V + t < total; ++t) dst[k * V + t] = v.v[t];
    }
  }
}

template <typename in_t, typename out_t>
__global__ void unpatchify_kernel(const in_t* __restrict__ src, out_t* __restrict__ dst, Geom g, TokenStrides s,
                                  int64_t N, bool vec_ok) {
  constexpr int V = Vec16<out_t>::kSize;
  const int64_t C = g.C, H = g.H(), W = g.W(), total = N * C * H * W;
  const int64_t chunks = ceil_div(total, V);
  for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < chunks; k += int64_t(gridDim.x) * blockDim.x) {
    Vec16<out_t> v;
#pragma unroll
    for (int t = 0; t < V; ++t) {
      const int64_t e = k * V + t;  // flat output offset ((n*C + c)*H + y)*W + x
      if (e < total) {
        const int64_t row = e / W, x = e - row * W;
        const int64_t y = row % H, c = (row / H) % C, n = row / (H * C);
        int64_t l, d;
        pixel_to_token(g, c, y, x, l, d);
        v.v[t] = c10::convert<out_t>(src[token_offset(s, n, l, d)]);
      }
    }
    if (vec_ok && (k + 1) * V <= total) {
      *reinterpret_cast<Vec16<out_t>*>(dst + k * V) = v;
    } else {
      for (int t = 0; t < V && k * V + t < total; ++t) dst[k * V + t] = v.v[t];
    }
  }
}

int64_t num_blocks(int64_t chunks) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return std::max<int64_t>(1, std::min<int64_t>(ceil_div(chunks, kThreads), sms * 32));
}

at::ScalarType out_type(const at::Tensor& t, std::optional<at::ScalarType> out_dtype) {
  return out_dtype.has_value() ? *out_dtype : t.scalar_type();
}

at::Tensor patchify_cuda(const at::Tensor& imgs, int64_t patch_size, std::optional<at::ScalarType> out_dtype) {
  FASTMAE_CHECK_DIM(imgs, 4);
  FASTMAE_CHECK(patch_size > 0 && imgs.size(2) % patch_size == 0 && imgs.size(3) % patch_size == 0,
                "image size not divisible by patch_size");
  const c10::cuda::CUDAGuard guard(imgs.device());
  const Geom g{imgs.size(1), patch_size, imgs.size(2) / patch_size, imgs.size(3) / patch_size};
  const int64_t N = imgs.size(0);
  at::Tensor out = empty_output({N, g.L(), g.D()}, imgs.options().dtype(out_type(imgs, out_dtype)));
  if (out.numel() == 0) return out;
  const ImageStrides s{imgs.stride(0), imgs.stride(1), imgs.stride(2), imgs.stride(3)};
  bool dispatched;
  FASTMAE_DISPATCH_CAST_PAIR(imgs.scalar_type(), out.scalar_type(), dispatched, "fastmae_ext::patchify", [&] {
    out_t* dst = out.mutable_data_ptr<out_t>();
    const int64_t chunks = ceil_div(out.numel(), Vec16<out_t>::kSize);
    patchify_kernel<in_t, out_t><<<num_blocks(chunks), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        imgs.const_data_ptr<in_t>(), dst, g, s, N, is_aligned16(dst));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (!dispatched) return patchify_cuda(imgs, patch_size, std::nullopt).to(out.scalar_type());
  return out;
}

at::Tensor unpatchify_cuda(const at::Tensor& x, int64_t patch_size, int64_t h, int64_t w,
                           std::optional<at::ScalarType> out_dtype) {
  FASTMAE_CHECK_DIM(x, 3);
  FASTMAE_CHECK(patch_size > 0 && x.size(2) % (patch_size * patch_size) == 0 && h * w == x.size(1),
                "x does not match patch_size and the grid (h, w)");
  const c10::cuda::CUDAGuard guard(x.device());
  const Geom g{x.size(2) / (patch_size * patch_size), patch_size, h, w};
  const int64_t N = x.size(0);
  at::Tensor out = empty_output({N, g.C, g.H(), g.W()}, x.options().dtype(out_type(x, out_dtype)));
  if (out.numel() == 0) return out;
  const TokenStrides s{x.stride(0), x.stride(1), x.stride(2)};
  bool dispatched;
  FASTMAE_DISPATCH_CAST_PAIR(x.scalar_type(), out.scalar_type(), dispatched, "fastmae_ext::unpatchify", [&] {
    out_t* dst = out.mutable_data_ptr<out_t>();
    const int64_t chunks = ceil_div(out.numel(), Vec16<out_t>::kSize);
    unpatchify_kernel<in_t, out_t><<<num_blocks(chunks), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        x.const_data_ptr<in_t>(), dst, g, s, N, is_aligned16(dst));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (!dispatched) return unpatchify_cuda(x, patch_size, h, w, std::nullopt).to(out.scalar_type());
  return out;
}

}  // namespace
}  // namespace patchify
}  // namespace fastmae

TORCH_LIBRARY_IMPL(fastmae_ext, CUDA, m) {
  m.impl("patchify", &fastmae::patchify::patchify_cuda);
  m.impl("unpatchify", &fastmae::patchify::unpatchify_cuda);
}
