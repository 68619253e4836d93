// patchify / unpatchify on CPU tensors: the C++ twins of cuda/patchify_kernel.cu.
//
// patchify: one task per (image n, patch row i), writing that patch row's w*D contiguous token
// elements in order; each (j, r) run of p*C outputs reads C image rows of p contiguous pixels.
// unpatchify: one task per output image row (n, c, y), written contiguously.
// Any input strides; outputs contiguous, cast to out_dtype on the way (as Tensor.to does).
#include <ATen/Parallel.h>
#include <c10/util/TypeCast.h>
#include <torch/library.h>

#include "ops/patchify.h"

namespace fastmae {
namespace patchify {
namespace {

// C_STATIC > 0: the channel count as a compile-time constant (the inner loop unrolls); 0: runtime.
template <typename in_t, typename out_t, int C_STATIC>
void patchify_rows(const in_t* src, out_t* dst, const Geom& g, const ImageStrides& s, int64_t N) {
  const int64_t C = C_STATIC > 0 ? C_STATIC : g.C;
  const int64_t D = g.D(), p = g.p;
  at::parallel_for(0, N * g.h, 1, [&](int64_t begin, int64_t end) {
    for (int64_t nh = begin; nh < end; ++nh) {
      const int64_t n = nh / g.h, i = nh % g.h;
      for (int64_t j = 0; j < g.w; ++j) {
        const int64_t l = i * g.w + j;
        for (int64_t r = 0; r < p; ++r) {
          int64_t c0, y, x;
          token_to_pixel(g, l, r * p * C, c0, y, x);  // the run's first element: channel 0, column j*p
          const in_t* in = src + image_offset(s, n, c0, y, x);
          out_t* o = dst + (n * g.L() + l) * D + r * p * C;
          for (int64_t q = 0; q < p; ++q) {
            for (int64_t c = 0; c < C; ++c) {
              o[q * C + c] = c10::convert<out_t>(in[c * s.c + q * s.x]);
            }
          }
        }
      }
    }
  });
}

template <typename in_t, typename out_t>
void unpatchify_rows(const in_t* src, out_t* dst, const Geom& g, const TokenStrides& s, int64_t N) {
  const int64_t C = g.C, H = g.H(), W = g.W(), p = g.p;
  at::parallel_for(0, N * C * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t y = row % H, c = (row / H) % C, n = row / (H * C);
      out_t* o = dst + row * W;
      for (int64_t j = 0; j < g.w; ++j) {
        int64_t l, d;
        pixel_to_token(g, c, y, j * p, l, d);  // the run's first pixel, q = 0
        const in_t* in = src + token_offset(s, n, l, d);
        for (int64_t q = 0; q < p; ++q) {
          o[j * p + q] = c10::convert<out_t>(in[q * C * s.d]);
        }
      }
    }
  });
}

at::ScalarType out_type(const at::Tensor& t, std::optional<at::ScalarType> out_dtype) {
  return out_dtype.has_value() ? *out_dtype : t.scalar_type();
}

at::Tensor patchify_cpu(const at::Tensor& imgs, int64_t patch_size, std::optional<at::ScalarType> out_dtype) {
  FASTMAE_CHECK_DIM(imgs, 4);
  FASTMAE_CHECK(patch_size > 0 && imgs.size(2) % patch_size == 0 && imgs.size(3) % patch_size == 0,
                "image size not divisible by patch_size");
  const Geom g{imgs.size(1), patch_size, imgs.size(2) / patch_size, imgs.size(3) / patch_size};
  const int64_t N = imgs.size(0);
  at::Tensor out = empty_output({N, g.L(), g.D()}, imgs.options().dtype(out_type(imgs, out_dtype)));
  if (out.numel() == 0) return out;
  const ImageStrides s{imgs.stride(0), imgs.stride(1), imgs.stride(2), imgs.stride(3)};
  FASTMAE_DISPATCH_FLOAT(imgs.scalar_type(), "fastmae_ext::patchify", [&] {
    using in_t = scalar_t;
    FASTMAE_DISPATCH_FLOAT(out.scalar_type(), "fastmae_ext::patchify", [&] {
      if (g.C == 3) {
        patchify_rows<in_t, scalar_t, 3>(imgs.const_data_ptr<in_t>(), out.mutable_data_ptr<scalar_t>(), g, s, N);
      } else {
        patchify_rows<in_t, scalar_t, 0>(imgs.const_data_ptr<in_t>(), out.mutable_data_ptr<scalar_t>(), g, s, N);
      }
    });
  });
  return out;
}

at::Tensor unpatchify_cpu(const at::Tensor& x, int64_t patch_size, int64_t h, int64_t w,
                          std::optional<at::ScalarType> out_dtype) {
  FASTMAE_CHECK_DIM(x, 3);
  FASTMAE_CHECK(patch_size > 0 && x.size(2) % (patch_size * patch_size) == 0 && h * w == x.size(1),
                "x does not match patch_size and the grid (h, w)");
  const Geom g{x.size(2) / (patch_size * patch_size), patch_size, h, w};
  const int64_t N = x.size(0);
  at::Tensor out = empty_output({N, g.C, g.H(), g.W()}, x.options().dtype(out_type(x, out_dtype)));
  if (out.numel() == 0) return out;
  const TokenStrides s{x.stride(0), x.stride(1), x.stride(2)};
  FASTMAE_DISPATCH_FLOAT(x.scalar_type(), "fastmae_ext::unpatchify", [&] {
    using in_t = scalar_t;
    FASTMAE_DISPATCH_FLOAT(out.scalar_type(), "fastmae_ext::unpatchify", [&] {
      unpatchify_rows<in_t, scalar_t>(x.const_data_ptr<in_t>(), out.mutable_data_ptr<scalar_t>(), g, s, N);
    });
  });
  return out;
}

}  // namespace
}  // namespace patchify
}  // namespace fastmae

TORCH_LIBRARY_IMPL(fastmae_ext, CPU, m) {
  m.impl("patchify", &fastmae::patchify::patchify_cpu);
  m.impl("unpatchify", &fastmae::patchify::unpatchify_cpu);
}
