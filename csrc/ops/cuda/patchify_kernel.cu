// patchify / unpatchify on CUDA tensors (the CPU twins are in cpu/patchify_kernel.cpp).
//
// Pure data movement, built for bandwidth: every element is read once and written once.
// Vector path (reads and writes 16-byte vectors; C = 1 or 3 channels, a template parameter):
// each thread moves one run of G pixels along x for all C channels (G = the wider of the two
// dtypes' 16-byte widths, p % G == 0; ops/patchify.h: patchify_run / unpatchify_run). On the
// image side the run is C vectors of G pixels, one per channel plane; on the token side it is
// G*C contiguous elements, channel innermost: the C vectors are interleaved in registers
// (patchify) or split (unpatchify). Taken when the image's x stride is 1 (the tokens' d stride
// for unpatchify), the other strides and both pointers are 16-byte aligned.
// Scalar path (everything else: other C, p not a multiple of G, odd strides): each thread owns
// one 16-byte chunk of the contiguous output (V = 16 / sizeof(out) elements) and gathers its V
// inputs element by element through the input's strides. Neighbouring threads write
// neighbouring chunks; their reads fall in the same few image rows (patchify) or token rows
// (unpatchify), so they coalesce in L1/L2. The chunk is stored as one vector when the output is
// 16-byte aligned and the chunk is whole; the tail is stored element by element.
// Grid-stride loop, 64-bit offsets. Casts on the way for the same dtype and fp16/bf16 <-> fp32;
// other (in, out) pairs run in the input's dtype and are converted after.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/TypeCast.h>
#include <torch/library.h>

#include <initializer_list>

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

// The vector path's run width: G pixels make whole 16-byte vectors of in_t and of out_t.
template <typename in_t, typename out_t>
constexpr int run_width() {
  return Vec16<in_t>::kSize > Vec16<out_t>::kSize ? Vec16<in_t>::kSize : Vec16<out_t>::kSize;
}

template <typename in_t, typename out_t, int C>
__global__ void patchify_vec_kernel(const in_t* __restrict__ src, out_t* __restrict__ dst, Geom g, ImageStrides s,
                                    int64_t N) {
  constexpr int VI = Vec16<in_t>::kSize, VO = Vec16<out_t>::kSize, G = run_width<in_t, out_t>();
  const int64_t units = N * g.L() * g.p * (g.p / G);
  for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < units; k += int64_t(gridDim.x) * blockDim.x) {
    int64_t n, y, x;
    patchify_run(g, G, k, n, y, x);
    out_t v[G * C];  // token order: pixel e of channel c at e*C + c
#pragma unroll
    for (int c = 0; c < C; ++c) {
      const in_t* px = src + image_offset(s, n, c, y, x);
#pragma unroll
      for (int h = 0; h < G / VI; ++h) {
        const Vec16<in_t> iv = reinterpret_cast<const Vec16<in_t>*>(px)[h];
#pragma unroll
        for (int e = 0; e < VI; ++e) v[(h * VI + e) * C + c] = c10::convert<out_t>(iv.v[e]);
      }
    }
    Vec16<out_t>* o = reinterpret_cast<Vec16<out_t>*>(dst + k * (G * C));
#pragma unroll
    for (int m = 0; m < G * C / VO; ++m) {
      Vec16<out_t> ov;
#pragma unroll
      for (int e = 0; e < VO; ++e) ov.v[e] = v[m * VO + e];
      o[m] = ov;
    }
  }
}

template <typename in_t, typename out_t, int C>
__global__ void unpatchify_vec_kernel(const in_t* __restrict__ src, out_t* __restrict__ dst, Geom g,
                                      TokenStrides s, int64_t N) {
  constexpr int VI = Vec16<in_t>::kSize, VO = Vec16<out_t>::kSize, G = run_width<in_t, out_t>();
  const int64_t H = g.H(), W = g.W(), units = N * H * (W / G);
  for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < units; k += int64_t(gridDim.x) * blockDim.x) {
    int64_t n, y, x0, l, d0;
    unpatchify_run(g, G, k, n, y, x0, l, d0);
    in_t v[G * C];  // token order: pixel e of channel c at e*C + c
    const Vec16<in_t>* tk = reinterpret_cast<const Vec16<in_t>*>(src + token_offset(s, n, l, d0));
#pragma unroll
    for (int m = 0; m < G * C / VI; ++m) {
      const Vec16<in_t> iv = tk[m];
#pragma unroll
      for (int e = 0; e < VI; ++e) v[m * VI + e] = iv.v[e];
    }
#pragma unroll
    for (int c = 0; c < C; ++c) {
      Vec16<out_t>* o = reinterpret_cast<Vec16<out_t>*>(dst + ((n * C + c) * H + y) * W + x0);
#pragma unroll
      for (int h = 0; h < G / VO; ++h) {
        Vec16<out_t> ov;
#pragma unroll
        for (int e = 0; e < VO; ++e) ov.v[e] = c10::convert<out_t>(v[(h * VO + e) * C + c]);
        o[h] = ov;
      }
    }
  }
}

// Whether the vector path takes these channels / patch size / strides (in elements of T; the
// unit stride is checked by the caller).
template <typename T, typename U>
bool vec_path_ok(int64_t C, int64_t p, const T* src, const U* dst, std::initializer_list<int64_t> strides) {
  constexpr int64_t V = Vec16<T>::kSize;
  if ((C != 1 && C != 3) || p % run_width<T, U>() != 0 || !is_aligned16(src) || !is_aligned16(dst)) return false;
  for (const int64_t st : strides)
    if (st % V != 0) return false;
  return true;
}

int64_t num_blocks(int64_t chunks) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return std::max<int64_t>(1, std::min<int64_t>(ceil_div(chunks, kThreads), sms * 32));
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
    const in_t* sp = imgs.const_data_ptr<in_t>();
    auto stream = at::cuda::getCurrentCUDAStream();
    if (s.x == 1 && vec_path_ok(g.C, g.p, sp, dst, {s.n, s.c, s.y})) {
      const int64_t units = out.numel() / (run_width<in_t, out_t>() * g.C);
      if (g.C == 3) {
        patchify_vec_kernel<in_t, out_t, 3><<<num_blocks(units), kThreads, 0, stream>>>(sp, dst, g, s, N);
      } else {
        patchify_vec_kernel<in_t, out_t, 1><<<num_blocks(units), kThreads, 0, stream>>>(sp, dst, g, s, N);
      }
    } else {
      const int64_t chunks = ceil_div(out.numel(), Vec16<out_t>::kSize);
      patchify_kernel<in_t, out_t><<<num_blocks(chunks), kThreads, 0, stream>>>(sp, dst, g, s, N, is_aligned16(dst));
    }
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
    const in_t* sp = x.const_data_ptr<in_t>();
    auto stream = at::cuda::getCurrentCUDAStream();
    if (s.d == 1 && vec_path_ok(g.C, g.p, sp, dst, {s.n, s.l})) {
      const int64_t units = out.numel() / (run_width<in_t, out_t>() * g.C);
      if (g.C == 3) {
        unpatchify_vec_kernel<in_t, out_t, 3><<<num_blocks(units), kThreads, 0, stream>>>(sp, dst, g, s, N);
      } else {
        unpatchify_vec_kernel<in_t, out_t, 1><<<num_blocks(units), kThreads, 0, stream>>>(sp, dst, g, s, N);
      }
    } else {
      const int64_t chunks = ceil_div(out.numel(), Vec16<out_t>::kSize);
      unpatchify_kernel<in_t, out_t><<<num_blocks(chunks), kThreads, 0, stream>>>(sp, dst, g, s, N, is_aligned16(dst));
    }
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
