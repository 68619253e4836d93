// patchify / unpatchify on CPU tensors: the C++ twins of cuda/patchify_kernel.cu.
//
// Both: one task per (image n, patch row i). The task's image strip (C channels x p rows x W)
// and its w tokens (w*D contiguous elements) are both a few tens of KB, so each side is read
// or written from cache however the inner loop walks it.
//
// patchify: for each token j and patch row r, the C image rows imgs[n, c, i*p + r, j*p : j*p + p]
// (contiguous when the image's x stride is 1) are interleaved into the token's contiguous run
// of p*C elements, channel innermost. unpatchify: the inverse, each token run de-interleaved
// into C contiguous runs of p pixels of the output rows. fp32 with C = 3 (the fast path)
// interleaves 8 pixels (24 elements) at a time with AVX2 blends and permutes where the CPU has
// AVX2 (a second build of the task loop, chosen at run time), then 4 pixels with SSE shuffles
// (baseline x86-64), then scalar; other dtypes/C, or a strided image / token row, take scalar
// loops (compile-time C where it is 3), cast to out_dtype on the way (as Tensor.to does).
// Outputs contiguous.
//
// Unpatchify's loop order: patch row r outer, token j inner, so each task writes its C output
// planes' rows left to right (C sequential write streams) and reads its w tokens as w streams
// advancing p*C elements a step. Measured at ViT-B, batch 8 (fp32, 2 threads): within ~10-30%
// of a plain copy of the same bytes into a fresh tensor (Tensor.copy_ / memcpy; no page faults
// on the reused output block); token-outer order (one read stream, C*p write streams of one
// cache line each) was ~1.5x slower, the baseline SSE build 10-30% slower than the AVX2 one.
#include <ATen/Parallel.h>
#include <c10/util/TypeCast.h>
#include <torch/library.h>

#include <type_traits>

#include "ops/cpu/interleave3.h"
#include "ops/patchify.h"

namespace fastmae {
namespace patchify {
namespace {

// The fast path: fp32 in and out, C = 3, unit pixel stride (the SSE / AVX2 (de)interleaves).
template <typename in_t, typename out_t, int C_STATIC, bool UNIT>
constexpr bool kFastPath = UNIT && C_STATIC == 3 && std::is_same_v<in_t, float> && std::is_same_v<out_t, float>;

// o[q*C + c] = in[c*sc + q*sx] for q < p, c < C: one (token, patch row) run. X1: sx == 1.
template <typename in_t, typename out_t, int C_STATIC, bool X1, bool AVX2>
FASTMAE_ALWAYS_INLINE void gather_run(const in_t* in, int64_t sc, int64_t sx, out_t* o, int64_t C_rt, int64_t p) {
  const int64_t C = C_STATIC > 0 ? C_STATIC : C_rt;
  const int64_t step = X1 ? 1 : sx;
  int64_t q = 0;
  if constexpr (kFastPath<in_t, out_t, C_STATIC, X1>) {
#if FASTMAE_CPU_AVX2
    if constexpr (AVX2) {
      for (; q + 8 <= p; q += 8) cpu::interleave3_avx2(in + q, in + sc + q, in + 2 * sc + q, o + q * 3);
    }
#endif
#if FASTMAE_CPU_SSE
    for (; q + 4 <= p; q += 4) cpu::interleave3(in + q, in + sc + q, in + 2 * sc + q, o + q * 3);
#endif
  }
  for (; q < p; ++q) {
    for (int64_t c = 0; c < C; ++c) o[q * C + c] = c10::convert<out_t>(in[c * sc + q * step]);
  }
}

// out[c*so + q] = in[(q*C + c)*sd] for q < p, c < C: the inverse run. D1: sd == 1.
template <typename in_t, typename out_t, int C_STATIC, bool D1, bool AVX2>
FASTMAE_ALWAYS_INLINE void scatter_run(const in_t* in, int64_t sd, out_t* out, int64_t so, int64_t C_rt, int64_t p) {
  const int64_t C = C_STATIC > 0 ? C_STATIC : C_rt;
  const int64_t step = D1 ? 1 : sd;
  int64_t q = 0;
  if constexpr (kFastPath<in_t, out_t, C_STATIC, D1>) {
#if FASTMAE_CPU_AVX2
    if constexpr (AVX2) {
      for (; q + 8 <= p; q += 8) cpu::deinterleave3_avx2(in + q * 3, out + q, out + so + q, out + 2 * so + q);
    }
#endif
#if FASTMAE_CPU_SSE
    for (; q + 4 <= p; q += 4) cpu::deinterleave3(in + q * 3, out + q, out + so + q, out + 2 * so + q);
#endif
  }
  for (; q < p; ++q) {
    for (int64_t c = 0; c < C; ++c) out[c * so + q] = c10::convert<out_t>(in[(q * C + c) * step]);
  }
}

// Tasks [begin, end) of patchify: task nh = (n, i) is image n's patch row i. Its runs: token j,
// patch row r starts at image pixel (c = 0, y = i*p + r, x = j*p) (ops/patchify.h),
// r*sy + j*p*sx past the strip's first pixel; no index division per run.
template <typename in_t, typename out_t, int C_STATIC, bool X1, int P_STATIC, bool AVX2>
FASTMAE_ALWAYS_INLINE void patchify_tasks(const in_t* src, out_t* dst, const Geom& g, const ImageStrides& s,
                                          int64_t begin, int64_t end) {
  const int64_t C = C_STATIC > 0 ? C_STATIC : g.C, p = P_STATIC > 0 ? P_STATIC : g.p, D = p * p * C;
  const int64_t sx = X1 ? 1 : s.x;
  for (int64_t nh = begin; nh < end; ++nh) {
    const int64_t n = nh / g.h, i = nh % g.h;
    int64_t c0, y0, x0;
    token_to_pixel(g, i * g.w, 0, c0, y0, x0);  // the strip's first pixel: (0, i*p, 0)
    const in_t* strip = src + image_offset(s, n, c0, y0, x0);
    out_t* o = dst + nh * g.w * D;  // tokens (n, i*w .. i*w + w - 1): contiguous
    for (int64_t j = 0; j < g.w; ++j) {
      for (int64_t r = 0; r < p; ++r) {
        const in_t* in = strip + r * s.y + j * p * sx;
        if (j + 1 < g.w) {  // the next token's runs continue these rows: prefetched
          for (int64_t c = 0; c < C; ++c) FASTMAE_PREFETCH(in + c * s.c + p * sx);
        }
        gather_run<in_t, out_t, C_STATIC, X1, AVX2>(in, s.c, sx, o + j * D + r * p * C, C, p);
      }
    }
  }
}

// Tasks [begin, end) of unpatchify: the inverse runs, token j, patch row r filling
// out[n, c, i*p + r, j*p : j*p + p] for every c.
template <typename in_t, typename out_t, int C_STATIC, bool D1, int P_STATIC, bool AVX2>
FASTMAE_ALWAYS_INLINE void unpatchify_tasks(const in_t* src, out_t* dst, const Geom& g, const TokenStrides& s,
                                            int64_t begin, int64_t end) {
  const int64_t C = C_STATIC > 0 ? C_STATIC : g.C, H = g.H(), W = g.W(), p = P_STATIC > 0 ? P_STATIC : g.p;
  const int64_t sd = D1 ? 1 : s.d;
  for (int64_t nh = begin; nh < end; ++nh) {
    const int64_t n = nh / g.h, i = nh % g.h;
    int64_t l0, d0;
    pixel_to_token(g, 0, i * p, 0, l0, d0);  // the strip's first pixel: token i*w, element 0
    const in_t* tok = src + token_offset(s, n, l0, d0);
    out_t* strip = dst + ((n * C) * H + i * p) * W;  // out[n, 0, i*p, 0]
    for (int64_t r = 0; r < p; ++r) {  // r outer: each output row (c, i*p + r) is written left to right
      for (int64_t j = 0; j < g.w; ++j) {
        scatter_run<in_t, out_t, C_STATIC, D1, AVX2>(tok + j * s.l + r * p * C * sd, sd, strip + r * W + j * p,
                                                     H * W, C, p);
      }
    }
  }
}

// The AVX2 builds of the fp32, C = 3, unit-stride tasks (8-pixel (de)interleave), picked at run
// time after cpu_has_avx2_fma(); everything else runs the baseline build of the same body.
#if FASTMAE_CPU_AVX2
template <int P_STATIC>
FASTMAE_TARGET_AVX2 void patchify_tasks_avx2(const float* src, float* dst, const Geom& g, const ImageStrides& s,
                                             int64_t begin, int64_t end) {
  patchify_tasks<float, float, 3, true, P_STATIC, true>(src, dst, g, s, begin, end);
}
template <int P_STATIC>
FASTMAE_TARGET_AVX2 void unpatchify_tasks_avx2(const float* src, float* dst, const Geom& g, const TokenStrides& s,
                                               int64_t begin, int64_t end) {
  unpatchify_tasks<float, float, 3, true, P_STATIC, true>(src, dst, g, s, begin, end);
}
#endif

// One task per (image n, patch row i); the AVX2 entry point is called from inside the lambda
// (the target attribute does not reach into lambdas, see common.h).
template <typename in_t, typename out_t, int C_STATIC, bool X1, int P_STATIC>
void patchify_rows(const in_t* src, out_t* dst, const Geom& g, const ImageStrides& s, int64_t N) {
  // the AVX2 build on the fast path where the CPU has it (the tests cap it, fastmae_ext::_cpu_isa_cap)
  [[maybe_unused]] const bool avx2 = kFastPath<in_t, out_t, C_STATIC, X1> && cpu_has_avx2_fma();
  at::parallel_for(0, N * g.h, 1, [&](int64_t begin, int64_t end) {
#if FASTMAE_CPU_AVX2
    if constexpr (kFastPath<in_t, out_t, C_STATIC, X1>) {
      if (avx2) return patchify_tasks_avx2<P_STATIC>(src, dst, g, s, begin, end);
    }
#endif
    patchify_tasks<in_t, out_t, C_STATIC, X1, P_STATIC, false>(src, dst, g, s, begin, end);
  });
}

template <typename in_t, typename out_t, int C_STATIC, bool D1, int P_STATIC>
void unpatchify_rows(const in_t* src, out_t* dst, const Geom& g, const TokenStrides& s, int64_t N) {
  [[maybe_unused]] const bool avx2 = kFastPath<in_t, out_t, C_STATIC, D1> && cpu_has_avx2_fma();
  at::parallel_for(0, N * g.h, 1, [&](int64_t begin, int64_t end) {
#if FASTMAE_CPU_AVX2
    if constexpr (kFastPath<in_t, out_t, C_STATIC, D1>) {
      if (avx2) return unpatchify_tasks_avx2<P_STATIC>(src, dst, g, s, begin, end);
    }
#endif
    unpatchify_tasks<in_t, out_t, C_STATIC, D1, P_STATIC, false>(src, dst, g, s, begin, end);
  });
}

// f.template operator()<C_STATIC, UNIT, P_STATIC>(): the channel count 3 as a constant, a unit
// stride, and ViT's patch size 16 as a constant where the rest is the fast path
template <typename F>
void dispatch_c_unit(int64_t C, bool unit, int64_t p, F&& f) {
  if (C == 3) {
    if (unit && p == 16) {
      f.template operator()<3, true, 16>();
    } else if (unit) {
      f.template operator()<3, true, 0>();
    } else {
      f.template operator()<3, false, 0>();
    }
  } else if (unit) {
    f.template operator()<0, true, 0>();
  } else {
    f.template operator()<0, false, 0>();
  }
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
      using o_t = scalar_t;
      dispatch_c_unit(g.C, s.x == 1, g.p, [&]<int C_STATIC, bool X1, int P_STATIC>() {
        patchify_rows<in_t, o_t, C_STATIC, X1, P_STATIC>(imgs.const_data_ptr<in_t>(), out.mutable_data_ptr<o_t>(), g,
                                                         s, N);
      });
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
      using o_t = scalar_t;
      dispatch_c_unit(g.C, s.d == 1, g.p, [&]<int C_STATIC, bool D1, int P_STATIC>() {
        unpatchify_rows<in_t, o_t, C_STATIC, D1, P_STATIC>(x.const_data_ptr<in_t>(), out.mutable_data_ptr<o_t>(), g,
                                                           s, N);
      });
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
