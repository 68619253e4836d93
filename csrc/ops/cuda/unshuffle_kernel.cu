// Decoder unshuffle on CUDA tensors (the CPU twins are in cpu/unshuffle_kernel.cpp).
//
// Forward (unshuffle_rows, also the encoder's masked-token backward): one thread per 16-byte
// chunk of the output (N, num_cls + L, D); the chunk's source row comes from ops/unshuffle.h
// (the cls row, a kept token, or the fill: mask token or zero), the position embedding is added
// in float for fp16/bf16 and rounded once (torch's add), loads and stores are 16-byte vectors
// when rows allow it. Every output element is written once.
// Backward: block (slab of kCols columns of D; samples blockIdx.y, + gridDim.y, ...), 256
// threads: each owns G adjacent columns of the slab (G = 16 bytes of the wider of the two
// dtypes, or 1 when rows or strides do not allow vectors) and one of 4 G row groups; each
// walks its rows of grad (16-byte loads), stores kept rows to grad_x[1 + j] (16-byte stores; a
// permutation: no atomics) and sums the removed rows in float; the row groups' sums are added
// in a fixed order in shared memory into a per-sample partial (N, D), summed over the batch by
// a second kernel in a fixed order: deterministic.
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/TypeCast.h>
#include <torch/library.h>

#include <cstring>

#include "ops/unshuffle.h"

namespace fastmae {
namespace unshuffle {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t, typename idx_t>
__global__ void rows_kernel(const scalar_t* __restrict__ src, const idx_t* __restrict__ ids,
                            const scalar_t* __restrict__ fill, const scalar_t* __restrict__ pos,
                            scalar_t* __restrict__ out, int64_t N, int64_t T, int64_t D, int64_t L, int64_t len_keep,
                            int64_t num_cls, int64_t src_off, int64_t ssn, int64_t sst, int64_t sin, int64_t sil,
                            bool vec_ok) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int V = Vec16<scalar_t>::kSize;
  const int64_t W = vec_ok ? V : 1;  // elements a thread
  const int64_t per_row = D / W, total = N * T * per_row;
  for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < total; k += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = k / per_row, c = k - row * per_row;
    const int64_t n = row / T, t = row - n * T;
    const int64_t j = t < num_cls ? 0 : static_cast<int64_t>(ids[n * sin + (t - num_cls) * sil]);
    const int64_t s = source_row(t, num_cls, src_off, j, len_keep);
    const scalar_t* in = s >= 0 ? src + n * ssn + s * sst : fill;  // nullptr: zero fill
    const scalar_t* pr = pos == nullptr ? nullptr : pos + t * D;
    scalar_t* o = out + row * D;
    if (vec_ok) {
      Vec16<scalar_t> v;
      if (in != nullptr) {
        v = reinterpret_cast<const Vec16<scalar_t>*>(in)[c];
      } else {
#pragma unroll
        for (int e = 0; e < V; ++e) v.v[e] = scalar_t(0);
      }
      if (pr != nullptr) {
        const Vec16<scalar_t> p = reinterpret_cast<const Vec16<scalar_t>*>(pr)[c];
#pragma unroll
        for (int e = 0; e < V; ++e) v.v[e] = static_cast<scalar_t>(static_cast<acc_t>(v.v[e]) + static_cast<acc_t>(p.v[e]));
      }
      reinterpret_cast<Vec16<scalar_t>*>(o)[c] = v;
    } else {
      scalar_t v = in != nullptr ? in[c] : scalar_t(0);
      if (pr != nullptr) v = static_cast<scalar_t>(static_cast<acc_t>(v) + static_cast<acc_t>(pr[c]));
      o[c] = v;
    }
  }
}

int64_t num_blocks(int64_t work) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return std::max<int64_t>(1, std::min<int64_t>(ceil_div(work, kThreads), sms * 32));
}

}  // namespace

at::Tensor unshuffle_rows_cuda(const at::Tensor& src_in, const at::Tensor& ids_restore, int64_t len_keep,
                               int64_t num_cls, int64_t src_off, const std::optional<at::Tensor>& fill_in,
                               const std::optional<at::Tensor>& pos_in, at::ScalarType dtype) {
  FASTMAE_CHECK_DIM(src_in, 3);
  FASTMAE_CHECK_DIM(ids_restore, 2);
  FASTMAE_CHECK(ids_restore.scalar_type() == at::kLong || ids_restore.scalar_type() == at::kInt,
                "ids_restore must be int64 or int32");
  FASTMAE_CHECK_SAME_DEVICE(src_in, ids_restore);
  if (fill_in.has_value()) FASTMAE_CHECK_SAME_DEVICE(src_in, *fill_in);
  if (pos_in.has_value()) FASTMAE_CHECK_SAME_DEVICE(src_in, *pos_in);
  const c10::cuda::CUDAGuard guard(src_in.device());
  const int64_t N = src_in.size(0), D = src_in.size(2), L = ids_restore.size(1), T = num_cls + L;
  at::Tensor src = src_in.to(dtype);
  if (src.stride(2) != 1) src = src.contiguous();
  const at::Tensor fill = fill_in.has_value() ? fill_in->reshape({D}).to(dtype).contiguous() : at::Tensor();
  const at::Tensor pos = pos_in.has_value() ? pos_in->reshape({T, D}).to(dtype).contiguous() : at::Tensor();
  at::Tensor out = empty_output({N, T, D}, src.options());
  if (out.numel() == 0) return out;
  FASTMAE_DISPATCH_FLOAT(dtype, "fastmae_ext::unshuffle_rows", [&] {
    const scalar_t* sp = src.const_data_ptr<scalar_t>();
    const scalar_t* f = fill.defined() ? fill.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* p = pos.defined() ? pos.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    constexpr int64_t V = Vec16<scalar_t>::kSize;
    const bool vec_ok = D % V == 0 && src.stride(0) % V == 0 && src.stride(1) % V == 0 && is_aligned16(sp) &&
                        is_aligned16(o) && (f == nullptr || is_aligned16(f)) && (p == nullptr || is_aligned16(p));
    const int64_t work = N * T * (vec_ok ? D / V : D);
    auto launch = [&](auto* ids) {
      using idx_t = std::remove_const_t<std::remove_pointer_t<decltype(ids)>>;
      rows_kernel<scalar_t, idx_t><<<num_blocks(work), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          sp, ids, f, p, o, N, T, D, L, len_keep, num_cls, src_off, src.stride(0), src.stride(1),
          ids_restore.stride(0), ids_restore.stride(1), vec_ok);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (ids_restore.scalar_type() == at::kLong) {
      launch(ids_restore.const_data_ptr<int64_t>());
    } else {
      launch(ids_restore.const_data_ptr<int32_t>());
    }
  });
  return out;
}

namespace {

constexpr int kRowGroups = 4;  // row groups of the scalar kernel (4 G for G columns a thread)
constexpr int kCols = 64;      // columns a block
constexpr int64_t kMaxGridY = 65535;  // CUDA's limit on a grid's y extent

// G elements from p into v: 16-byte vectors when G > 1 (p 16-byte aligned, G a multiple of the
// vector width), else one scalar.
template <int G, typename T>
__device__ __forceinline__ void load_cols(const T* __restrict__ p, T (&v)[G]) {
  if constexpr (G == 1) {
    v[0] = p[0];
  } else {
    constexpr int VV = Vec16<T>::kSize;
    static_assert(G % VV == 0, "G whole vectors");
#pragma unroll
    for (int h = 0; h < G / VV; ++h) {
      const Vec16<T> x = reinterpret_cast<const Vec16<T>*>(p)[h];
#pragma unroll
      for (int e = 0; e < VV; ++e) v[h * VV + e] = x.v[e];
    }
  }
}

// v (converted to T) into G elements from p, as load_cols.
template <int G, typename T, typename U>
__device__ __forceinline__ void store_cols(T* __restrict__ p, const U (&v)[G]) {
  if constexpr (G == 1) {
    p[0] = c10::convert<T>(v[0]);
  } else {
    constexpr int VV = Vec16<T>::kSize;
    static_assert(G % VV == 0, "G whole vectors");
#pragma unroll
    for (int h = 0; h < G / VV; ++h) {
      Vec16<T> x;
#pragma unroll
      for (int e = 0; e < VV; ++e) x.v[e] = c10::convert<T>(v[h * VV + e]);
      // one st.global.v4 (SASS STG.E.128): stored as a Vec16 struct (or a uint4) here, nvcc
      // split these stores into four 4-byte ones
      uint32_t w[4];
      memcpy(w, &x, sizeof(w));
#if defined(FASTMAE_CUDA_EMU)  // the CPU emulation of tests/_cuda_emu: the same 16 bytes
      memcpy(p + h * VV, w, sizeof(w));
#else
      asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(__cvta_generic_to_global(p + h * VV)), "r"(w[0]),
                   "r"(w[1]), "r"(w[2]), "r"(w[3])
                   : "memory");
#endif
    }
  }
}

// One sample n of backward_kernel: the kept rows to gx, the removed rows' sum (this thread's
// row group, then the block's groups in a fixed order) to partial[n]. A barrier between the
// groups' writes to sums and their sum; the caller's next one separates the samples.
template <typename scalar_t, typename out_t, typename acc_t, typename idx_t, int G>
__device__ __forceinline__ void backward_sample(const scalar_t* __restrict__ g, const idx_t* __restrict__ ids,
                                                out_t* __restrict__ gx, acc_t* __restrict__ partial,
                                                acc_t (*sums)[kCols], int64_t n, int64_t d, int grp, int64_t L,
                                                int64_t D, int64_t len_keep, int64_t sgn, int64_t sgt, int64_t sin,
                                                int64_t sil) {
  constexpr int kGroups = kRowGroups * G;
  acc_t acc[G];
#pragma unroll
  for (int e = 0; e < G; ++e) acc[e] = 0;
  if (d < D) {
    const scalar_t* gn = g + n * sgn;
    out_t* gxn = gx + n * (1 + len_keep) * D;
    for (int64_t t = grp; t < 1 + L; t += kGroups) {
      scalar_t v[G];
      load_cols<G>(gn + t * sgt + d, v);
      if (t == 0) {
        store_cols<G>(gxn + d, v);
        continue;
      }
      const int64_t j = ids[n * sin + (t - 1) * sil];
      if (is_kept(j, len_keep)) {
        store_cols<G>(gxn + (1 + j) * D + d, v);
      } else {
#pragma unroll
        for (int e = 0; e < G; ++e) acc[e] += static_cast<acc_t>(v[e]);
      }
    }
  }
#pragma unroll
  for (int e = 0; e < G; ++e) sums[grp][threadIdx.x * G + e] = acc[e];
  __syncthreads();
  if (grp == 0 && d < D) {
    acc_t total[G];
#pragma unroll
    for (int e = 0; e < G; ++e) {
      total[e] = 0;
      for (int r = 0; r < kGroups; ++r) total[e] += sums[r][threadIdx.x * G + e];  // fixed order
    }
    store_cols<G>(partial + n * D + d, total);
  }
}

// Block (kCols / G, 4 G) threads: threadIdx.x owns columns [d, d + G) of the slab blockIdx.x,
// threadIdx.y is the row group; the block walks samples blockIdx.y, + gridDim.y, ... (the grid's
// y extent is at most 65535: batches above it take several samples a block).
template <typename scalar_t, typename out_t, typename acc_t, typename idx_t, int G>
__global__ void backward_kernel(const scalar_t* __restrict__ g, const idx_t* __restrict__ ids, out_t* __restrict__ gx,
                                acc_t* __restrict__ partial, int64_t N, int64_t L, int64_t D, int64_t len_keep,
                                int64_t sgn, int64_t sgt, int64_t sin, int64_t sil) {
  constexpr int kGroups = kRowGroups * G;
  __shared__ acc_t sums[kGroups][kCols];
  const int64_t d = blockIdx.x * int64_t(kCols) + threadIdx.x * G;  // G columns a thread
  const int grp = threadIdx.y;
  for (int64_t n = blockIdx.y; n < N; n += gridDim.y) {  // the same count for every thread of the block
    backward_sample<scalar_t, out_t, acc_t, idx_t, G>(g, ids, gx, partial, sums, n, d, grp, L, D, len_keep, sgn, sgt,
                                                      sin, sil);
    __syncthreads();  // sums is the next sample's
  }
}

template <typename acc_t>
__global__ void batch_sum_kernel(const acc_t* __restrict__ partial, acc_t* __restrict__ out, int64_t N, int64_t D) {
  const int64_t d = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (d >= D) return;
  acc_t total = 0;
  for (int64_t n = 0; n < N; ++n) total += partial[n * D + d];  // fixed order
  out[d] = total;
}

at::Tensor decoder_unshuffle_cuda(const at::Tensor& x, const at::Tensor& ids_restore, const at::Tensor& mask_token,
                                  const std::optional<at::Tensor>& pos_embed) {
  FASTMAE_CHECK_DIM(x, 3);
  FASTMAE_CHECK(x.size(1) >= 2 && x.size(1) - 1 <= ids_restore.size(1), "x must be (N, 1 + len_keep, D)");
  at::ScalarType dtype = c10::promoteTypes(x.scalar_type(), mask_token.scalar_type());
  if (pos_embed.has_value()) dtype = c10::promoteTypes(dtype, pos_embed->scalar_type());
  return unshuffle_rows_cuda(x, ids_restore, x.size(1) - 1, 1, 1, mask_token, pos_embed, dtype);
}

std::tuple<at::Tensor, at::Tensor> decoder_unshuffle_backward_cuda(const at::Tensor& grad_in,
                                                                   const at::Tensor& ids_restore, int64_t len_keep,
                                                                   at::ScalarType x_dtype) {
  FASTMAE_CHECK_DIM(grad_in, 3);
  FASTMAE_CHECK_FLOAT_DTYPE(x_dtype);
  FASTMAE_CHECK(ids_restore.size(1) == grad_in.size(1) - 1, "grad must be (N, 1 + L, D)");
  FASTMAE_CHECK_SAME_DEVICE(grad_in, ids_restore);
  const c10::cuda::CUDAGuard guard(grad_in.device());
  const int64_t N = grad_in.size(0), L = grad_in.size(1) - 1, D = grad_in.size(2);
  const at::Tensor grad = grad_in.stride(2) == 1 ? grad_in : grad_in.contiguous();  // the kernels index d densely
  const at::ScalarType acc = grad.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor gx = empty_output({N, 1 + len_keep, D}, grad.options().dtype(x_dtype));
  at::Tensor partial = at::empty({N, D}, grad.options().dtype(acc));
  at::Tensor gm = empty_output({D}, grad.options().dtype(acc));
  if (N == 0 || D == 0) {  // an empty grid is not a launch CUDA accepts; no rows: the mask token's gradient is 0
    gm.zero_();
    return {gx, gm};
  }
  auto stream = at::cuda::getCurrentCUDAStream();
  FASTMAE_CHECK(ceil_div(D, kCols) <= INT32_MAX, "grad's last dim D = ", D, " is above the kernel's grid");
  const dim3 grid(static_cast<unsigned>(ceil_div(D, kCols)), static_cast<unsigned>(std::min(N, kMaxGridY)));
  bool dispatched;
  FASTMAE_DISPATCH_CAST_PAIR(grad.scalar_type(), x_dtype, dispatched, "fastmae_ext::decoder_unshuffle_backward", [&] {
    using acc_t = at::opmath_type<in_t>;
    constexpr int G = Vec16<in_t>::kSize > Vec16<out_t>::kSize ? Vec16<in_t>::kSize : Vec16<out_t>::kSize;
    constexpr int64_t VI = Vec16<in_t>::kSize;
    const in_t* gp = grad.const_data_ptr<in_t>();
    out_t* gxp = gx.mutable_data_ptr<out_t>();
    acc_t* pp = partial.mutable_data_ptr<acc_t>();
    const bool vec = D % G == 0 && grad.stride(0) % VI == 0 && grad.stride(1) % VI == 0 && is_aligned16(gp) &&
                     is_aligned16(gxp) && is_aligned16(pp);
    auto launch = [&](auto* ids) {
      using idx_t = std::remove_const_t<std::remove_pointer_t<decltype(ids)>>;
      if (vec) {
        backward_kernel<in_t, out_t, acc_t, idx_t, G><<<grid, dim3(kCols / G, kRowGroups * G), 0, stream>>>(
            gp, ids, gxp, pp, N, L, D, len_keep, grad.stride(0), grad.stride(1), ids_restore.stride(0),
            ids_restore.stride(1));
      } else {
        backward_kernel<in_t, out_t, acc_t, idx_t, 1><<<grid, dim3(kCols, kRowGroups), 0, stream>>>(
            gp, ids, gxp, pp, N, L, D, len_keep, grad.stride(0), grad.stride(1), ids_restore.stride(0),
            ids_restore.stride(1));
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (ids_restore.scalar_type() == at::kLong) {
      launch(ids_restore.const_data_ptr<int64_t>());
    } else {
      launch(ids_restore.const_data_ptr<int32_t>());
    }
    batch_sum_kernel<acc_t><<<ceil_div(D, kThreads), kThreads, 0, stream>>>(
        partial.const_data_ptr<acc_t>(), gm.mutable_data_ptr<acc_t>(), N, D);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (!dispatched) {  // an unusual (grad, x) dtype pair: in grad's dtype, then cast
    auto [g, m] = decoder_unshuffle_backward_cuda(grad, ids_restore, len_keep, grad.scalar_type());
    return {g.to(x_dtype), m};
  }
  return {gx, gm};
}

}  // namespace
}  // namespace unshuffle
}  // namespace fastmae

TORCH_LIBRARY_IMPL(fastmae_ext, CUDA, m) {
  m.impl("decoder_unshuffle", &fastmae::unshuffle::decoder_unshuffle_cuda);
  m.impl("decoder_unshuffle_backward", &fastmae::unshuffle::decoder_unshuffle_backward_cuda);
}
