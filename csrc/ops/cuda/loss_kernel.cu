// The MAE loss on CUDA tensors (the CPU twin is in cpu/loss_kernel.cpp).
//
// One warp a patch (row m = n*L + l), several warps a block. A warp reads the row's mask first
// and touches nothing else when it is 0 (forward: the row adds 0; backward: zeros are stored).
// Otherwise it gathers the row's P target values from imgs (ops/patchify.h index math) into
// shared memory (in 16-byte vectors when the image rows allow it: each lane reads one run of V
// pixels along x from every channel, ops/patchify.h patch_run, and scatters them channel
// innermost; element by element otherwise), with norm_pix_loss reduces them twice (mean, then
// the sum of squared deviations: ops/loss.h) with warp shuffles in a fixed order, and reads
// pred in 16-byte vectors when the rows allow it. Forward: each warp keeps its rows' sum(loss_m * mask_m) and sum(mask_m);
// the block adds its warps' sums in order into a partial, and a one-block kernel adds the
// partials in a fixed order: no atomics, a deterministic loss. Backward: the warp writes d pred
// in 16-byte vectors.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "ops/loss.h"

namespace fastmae {
namespace loss {
namespace {

constexpr int kMaxWarps = 8;
// Dynamic shared memory a block may take without the opt-in: 48 KB less the loss kernel's
// static arrays (warp_loss, warp_mask), which count against the same 48 KB.
constexpr int64_t kDynamicSmem = 48 * 1024 - 2 * kMaxWarps * int64_t(sizeof(float));
constexpr int kFinalThreads = 256;

struct Args {
  patchify::Geom g;
  patchify::ImageStrides is;
  int64_t spn, spl;  // pred strides (rows contiguous)
  int64_t M, L, P;
  bool norm;
  bool img_vec;  // imgs rows can be read as 16-byte vectors along x (set by the launcher)
};

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;  // the same butterfly order on every call: deterministic
}

// The row's (normalised) target into t[0, P), shared by the warp.
template <typename img_t>
__device__ void load_target(const img_t* __restrict__ imgs, const Args& a, int64_t n, int64_t l, float* t, int lane) {
  float sum = 0;
  if (a.img_vec) {
    constexpr int VI = Vec16<img_t>::kSize;
    const int64_t C = a.g.C, runs = a.g.p * (a.g.p / VI);
    for (int64_t u = lane; u < runs; u += 32) {
      int64_t y, x, d0;
      patchify::patch_run(a.g, VI, l, u, y, x, d0);
      for (int64_t c = 0; c < C; ++c) {
        const Vec16<img_t> iv = *reinterpret_cast<const Vec16<img_t>*>(imgs + patchify::image_offset(a.is, n, c, y, x));
#pragma unroll
        for (int e = 0; e < VI; ++e) {
          const float v = static_cast<float>(iv.v[e]);
          t[d0 + e * C + c] = v;
          sum += v;
        }
      }
    }
  } else {
    for (int64_t d = lane; d < a.P; d += 32) {
      int64_t c, y, x;
      patchify::token_to_pixel(a.g, l, d, c, y, x);
      const float v = static_cast<float>(imgs[patchify::image_offset(a.is, n, c, y, x)]);
      t[d] = v;
      sum += v;
    }
  }
  // every pass below reads values other lanes wrote (the vector gather writes runs of V, the
  // passes read with a stride of 32): a shuffle is no memory fence, __syncwarp is
  __syncwarp();
  if (!a.norm) return;
  const float mean = warp_sum(sum) / static_cast<float>(a.P);
  float ss = 0;
  for (int64_t d = lane; d < a.P; d += 32) {
    const float dev = t[d] - mean;
    ss += dev * dev;
  }
  const float rstd = inv_std(static_cast<double>(warp_sum(ss)), a.P);
  for (int64_t d = lane; d < a.P; d += 32) t[d] = normalised(t[d], mean, rstd);
  __syncwarp();
}

template <typename img_t, typename pred_t, bool BACKWARD>
__global__ void loss_kernel(const img_t* __restrict__ imgs, const pred_t* __restrict__ pred,
                            const float* __restrict__ mask, Args a, bool vec_ok, int rows_per_warp,
                            float* __restrict__ partial, const float* __restrict__ grad_out,
                            const float* __restrict__ mask_sum, pred_t* __restrict__ grad) {
  extern __shared__ float smem[];
  __shared__ float warp_loss[kMaxWarps], warp_mask[kMaxWarps];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  float* t = smem + warp * a.P;
  constexpr int V = Vec16<pred_t>::kSize;
  float g_over_sum = 0;
  if constexpr (BACKWARD) g_over_sum = *grad_out / *mask_sum;
  float sl = 0, sm = 0;
  const int64_t row0 = (int64_t(blockIdx.x) * warps + warp) * rows_per_warp;
  for (int64_t row = row0; row < min(a.M, row0 + rows_per_warp); ++row) {
    const float m = mask[row];
    const int64_t n = row / a.L, l = row % a.L;
    if (m == 0.0f) {  // not read
      if constexpr (BACKWARD) {
        if (vec_ok) {
          Vec16<pred_t> z;
#pragma unroll
          for (int e = 0; e < V; ++e) z.v[e] = pred_t(0);
          for (int64_t c = lane; c < a.P / V; c += 32) reinterpret_cast<Vec16<pred_t>*>(grad + row * a.P)[c] = z;
        } else {
          for (int64_t d = lane; d < a.P; d += 32) grad[row * a.P + d] = pred_t(0);
        }
      }
      continue;
    }
    load_target<img_t>(imgs, a, n, l, t, lane);
    const pred_t* pr = pred + n * a.spn + l * a.spl;
    float err = 0;
    if (vec_ok) {
      for (int64_t c = lane; c < a.P / V; c += 32) {
        const Vec16<pred_t> pv = reinterpret_cast<const Vec16<pred_t>*>(pr)[c];
        Vec16<pred_t> gv;
#pragma unroll
        for (int e = 0; e < V; ++e) {
          const float x = static_cast<float>(pv.v[e]), tv = t[c * V + e];
          if constexpr (BACKWARD) {
            gv.v[e] = static_cast<pred_t>(pred_grad(g_over_sum, m, a.P, x, tv));
          } else {
            err += (x - tv) * (x - tv);
          }
        }
        if constexpr (BACKWARD) reinterpret_cast<Vec16<pred_t>*>(grad + row * a.P)[c] = gv;
      }
    } else {
      for (int64_t d = lane; d < a.P; d += 32) {
        const float x = static_cast<float>(pr[d]);
        if constexpr (BACKWARD) {
          grad[row * a.P + d] = static_cast<pred_t>(pred_grad(g_over_sum, m, a.P, x, t[d]));
        } else {
          err += (x - t[d]) * (x - t[d]);
        }
      }
    }
    if constexpr (!BACKWARD) {
      sl += warp_sum(err) / static_cast<float>(a.P) * m;
      sm += m;
    }
    __syncwarp();  // t is rewritten by the next row
  }
  if constexpr (!BACKWARD) {
    if (lane == 0) {
      warp_loss[warp] = sl;
      warp_mask[warp] = sm;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      float bl = 0, bm = 0;
      for (int w = 0; w < warps; ++w) {  // in order
        bl += warp_loss[w];
        bm += warp_mask[w];
      }
      partial[blockIdx.x] = bl;
      partial[gridDim.x + blockIdx.x] = bm;
    }
  }
}

__global__ void final_kernel(const float* __restrict__ partial, int64_t num, float* __restrict__ loss,
                             float* __restrict__ mask_sum) {
  __shared__ float sl[kFinalThreads], sm[kFinalThreads];
  float a = 0, b = 0;
  for (int64_t i = threadIdx.x; i < num; i += kFinalThreads) {
    a += partial[i];
    b += partial[num + i];
  }
  sl[threadIdx.x] = a;
  sm[threadIdx.x] = b;
  __syncthreads();
  for (int s = kFinalThreads / 2; s > 0; s >>= 1) {  // a fixed tree
    if (threadIdx.x < s) {
      sl[threadIdx.x] += sl[threadIdx.x + s];
      sm[threadIdx.x] += sm[threadIdx.x + s];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    *loss = sl[0] / sm[0];
    *mask_sum = sm[0];
  }
}

void prepare(at::Tensor& imgs, at::Tensor& pred, at::Tensor& mask) {
  if (imgs.scalar_type() == at::kDouble) imgs = imgs.to(at::kFloat);  // the reference computes in fp32
  if (pred.scalar_type() == at::kDouble) pred = pred.to(at::kFloat);
  if (pred.stride(2) != 1) pred = pred.contiguous();
  mask = mask.to(at::kFloat).contiguous();
}

Args make_args(const at::Tensor& imgs, const at::Tensor& pred, int64_t p, bool norm) {
  Args a{{imgs.size(1), p, imgs.size(2) / p, imgs.size(3) / p},
         {imgs.stride(0), imgs.stride(1), imgs.stride(2), imgs.stride(3)},
         pred.stride(0), pred.stride(1), 0, 0, 0, norm, false};
  a.L = a.g.L();
  a.M = imgs.size(0) * a.L;
  a.P = a.g.D();
  return a;
}

// a with img_vec set: x contiguous, the other strides, the base and the patch width in whole
// 16-byte vectors of img_t (a run of V pixels along x then never leaves its patch).
template <typename img_t>
Args with_img_vec(Args a, const img_t* imgs) {
  constexpr int64_t V = Vec16<img_t>::kSize;
  a.img_vec = a.is.x == 1 && a.g.p % V == 0 && a.is.y % V == 0 && a.is.c % V == 0 && a.is.n % V == 0 &&
              is_aligned16(imgs);
  return a;
}

struct Launch {
  int warps, rows_per_warp;
  int64_t blocks;
  size_t smem;
};

Launch plan(const Args& a) {
  const int64_t row_bytes = a.P * int64_t(sizeof(float));
  FASTMAE_CHECK(a.P > 0, "patches of P = 0 values (imgs with no channels)");
  FASTMAE_CHECK(row_bytes <= kDynamicSmem, "patches of P = ", a.P, " values are above the CUDA loss kernel's limit of ",
                kDynamicSmem / int64_t(sizeof(float)), " (a warp holds a patch in shared memory)");
  const int warps = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(kMaxWarps, kDynamicSmem / row_bytes)));
  const int rows_per_warp = 4;
  return {warps, rows_per_warp, std::max<int64_t>(1, ceil_div(a.M, int64_t(warps) * rows_per_warp)),
          static_cast<size_t>(warps * row_bytes)};
}

// imgs and pred in fp32 / fp16 / bf16 each (fp64 is converted first): 9 instantiations
#define FASTMAE_LOSS_CASES(...)                \
  AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)    \
  AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)     \
  AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__)
#define FASTMAE_DISPATCH_LOSS(IMG, PRED, ...)                                    \
  AT_DISPATCH_SWITCH(IMG, "fastmae_ext::mae_loss", FASTMAE_LOSS_CASES([&] {       \
    using img_t = scalar_t;                                                      \
    AT_DISPATCH_SWITCH(PRED, "fastmae_ext::mae_loss", FASTMAE_LOSS_CASES([&] {    \
      using pred_t = scalar_t;                                                   \
      __VA_ARGS__();                                                             \
    }));                                                                         \
  }))

std::tuple<at::Tensor, at::Tensor> mae_loss_cuda(const at::Tensor& imgs_in, const at::Tensor& pred_in,
                                                 const at::Tensor& mask_in, int64_t patch_size, bool norm) {
  FASTMAE_CHECK_DIM(imgs_in, 4);
  FASTMAE_CHECK_DIM(pred_in, 3);
  FASTMAE_CHECK_SAME_DEVICE(imgs_in, pred_in);
  FASTMAE_CHECK_SAME_DEVICE(imgs_in, mask_in);
  const c10::cuda::CUDAGuard guard(imgs_in.device());
  at::Tensor imgs = imgs_in, pred = pred_in, mask = mask_in;
  prepare(imgs, pred, mask);
  const Args a = make_args(imgs, pred, patch_size, norm);
  FASTMAE_CHECK(pred.size(0) * pred.size(1) == a.M && pred.size(2) == a.P && mask.numel() == a.M,
                "pred / mask do not match the patchified imgs");
  const Launch k = plan(a);
  at::Tensor partial = at::empty({2, k.blocks}, imgs.options().dtype(at::kFloat));
  at::Tensor loss = empty_output({}, imgs.options().dtype(at::kFloat));
  at::Tensor mask_sum = empty_output({}, imgs.options().dtype(at::kFloat));
  auto stream = at::cuda::getCurrentCUDAStream();
  FASTMAE_DISPATCH_LOSS(imgs.scalar_type(), pred.scalar_type(), [&] {
    const pred_t* pp = pred.const_data_ptr<pred_t>();
    const bool vec_ok = rows_vectorizable(pp, a.P, a.spl) && a.spn % Vec16<pred_t>::kSize == 0;
    const img_t* ip = imgs.const_data_ptr<img_t>();
    loss_kernel<img_t, pred_t, false><<<k.blocks, k.warps * 32, k.smem, stream>>>(
        ip, pp, mask.const_data_ptr<float>(), with_img_vec(a, ip), vec_ok, k.rows_per_warp,
        partial.mutable_data_ptr<float>(), nullptr, nullptr, nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  final_kernel<<<1, kFinalThreads, 0, stream>>>(partial.const_data_ptr<float>(), k.blocks,
                                                loss.mutable_data_ptr<float>(), mask_sum.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {loss, mask_sum};
}

at::Tensor mae_loss_backward_cuda(const at::Tensor& grad_out, const at::Tensor& mask_sum, const at::Tensor& imgs_in,
                                  const at::Tensor& pred_in, const at::Tensor& mask_in, int64_t patch_size,
                                  bool norm) {
  FASTMAE_CHECK_DIM(imgs_in, 4);
  FASTMAE_CHECK_DIM(pred_in, 3);
  FASTMAE_CHECK_SAME_DEVICE(imgs_in, pred_in);
  FASTMAE_CHECK_SAME_DEVICE(imgs_in, mask_in);
  FASTMAE_CHECK(grad_out.numel() == 1 && mask_sum.numel() == 1, "grad_out and mask_sum must be scalars");
  const c10::cuda::CUDAGuard guard(imgs_in.device());
  at::Tensor imgs = imgs_in, pred = pred_in, mask = mask_in;
  prepare(imgs, pred, mask);
  const Args a = make_args(imgs, pred, patch_size, norm);
  FASTMAE_CHECK(pred.size(0) * pred.size(1) == a.M && pred.size(2) == a.P && mask.numel() == a.M,
                "pred / mask do not match the patchified imgs");
  const Launch k = plan(a);
  // the kernel reads both scalars on the device: a CPU scalar (a direct torch.ops call) is moved there
  const at::Tensor g = grad_out.to(imgs.device(), at::kFloat).contiguous();
  const at::Tensor ms = mask_sum.to(imgs.device(), at::kFloat).contiguous();
  at::Tensor grad = empty_output(pred.sizes(), pred.options());
  FASTMAE_DISPATCH_LOSS(imgs.scalar_type(), pred.scalar_type(), [&] {
    const pred_t* pp = pred.const_data_ptr<pred_t>();
    pred_t* gp = grad.mutable_data_ptr<pred_t>();
    const bool vec_ok = rows_vectorizable(pp, a.P, a.spl) && a.spn % Vec16<pred_t>::kSize == 0 && is_aligned16(gp);
    const img_t* ip = imgs.const_data_ptr<img_t>();
    loss_kernel<img_t, pred_t, true><<<k.blocks, k.warps * 32, k.smem, at::cuda::getCurrentCUDAStream()>>>(
        ip, pp, mask.const_data_ptr<float>(), with_img_vec(a, ip), vec_ok, k.rows_per_warp, nullptr,
        g.const_data_ptr<float>(), ms.const_data_ptr<float>(), gp);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad.scalar_type() == pred_in.scalar_type() ? grad : grad.to(pred_in.scalar_type());
}

}  // namespace
}  // namespace loss
}  // namespace fastmae

TORCH_LIBRARY_IMPL(fastmae_ext, CUDA, m) {
  m.impl("mae_loss", &fastmae::loss::mae_loss_cuda);
  m.impl("mae_loss_backward", &fastmae::loss::mae_loss_backward_cuda);
}
