// CUDA kernels of the fused residual add + LayerNorm (math in ../layer_norm.h).
//
// Forward: one warp per row, 4 rows per 128-thread block. Lanes own chunks of 8 elements
// (16-byte accesses) or of 1 (any D or alignment). When D <= 1024 with 8-element chunks
// (CACHE = 4 chunks per lane) the row stays in registers between the passes; otherwise the
// mean, variance and output passes re-read the (L1-resident) row.
// Backward: blocks of 4 warps own kRowsPerPartial consecutive rows (a fixed function of the
// row count, never of the device); each warp walks its rows computing dx (= dresidual) and
// accumulating dy * xhat and dy into its own shared-memory row of dW/dB partials (lanes own
// columns: no atomics); the block sums its 4 warps in order and writes one partial row.
// A second kernel sums the partial rows per column in a fixed tree order. Deterministic.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>

#include "../layer_norm.h"
#include "smem.cuh"
#include "layer_norm_kernel_vec.cuh"

namespace fastmae {
namespace {

using namespace fastmae::cuda;
constexpr int kWarps = 4;
constexpr int kRowsPerPartial = 128;

struct FwdArgs {
  const void* x; const void* res; const void* w; const void* b;
  void* y; void* s; float* mean; float* rstd;
  int64_t rows; int D; float eps;
  DType xt, rt, wt, bt, yt, st;
};

template <int CH>
__device__ __forceinline__ void load_param(const void* p, DType t, int c, float fill, float (&v)[CH]) {
  if (p == nullptr) {
#pragma unroll
    for (int i = 0; i < CH; ++i) v[i] = fill;
  } else {
    load_chunk<CH>(p, c, t, v);
  }
}

template <int CH, int CACHE>
__global__ void __launch_bounds__(kWarps * 32) ln_fwd_kernel(FwdArgs a) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (row >= a.rows) return;
  const int64_t off = row * a.D;
  constexpr int STEP = 32 * CH;
  [[maybe_unused]] float cache[CACHE > 0 ? CACHE : 1][CH];

  auto load_s = [&](int c, float (&v)[CH]) {
    load_chunk<CH>(a.x, off + c, a.xt, v);
    if (a.res != nullptr) {
      float r[CH];
      load_chunk<CH>(a.res, off + c, a.rt, r);
#pragma unroll
      for (int i = 0; i < CH; ++i) v[i] += r[i];
      round_chunk<CH>(a.st, v);  // the stored s is what is normalised (and what the backward reads)
    }
  };

  float sum = 0.0f;
  int k = 0;
  for (int c = lane * CH; c < a.D; c += STEP, ++k) {
    float v[CH];
    load_s(c, v);
    if (a.s != nullptr) store_chunk<CH>(a.s, off + c, a.st, v);
#pragma unroll
    for (int i = 0; i < CH; ++i) sum += v[i];
    if constexpr (CACHE > 0) {
#pragma unroll
      for (int j = 0; j < CACHE; ++j)
        if (j == k)
#pragma unroll
          for (int i = 0; i < CH; ++i) cache[j][i] = v[i];
    }
  }
  const float mean = warp_sum(sum) / static_cast<float>(a.D);

  float sq = 0.0f;
  k = 0;
  for (int c = lane * CH; c < a.D; c += STEP, ++k) {
    float v[CH];
    if constexpr (CACHE > 0) {
#pragma unroll
      for (int j = 0; j < CACHE; ++j)
        if (j == k)
#pragma unroll
          for (int i = 0; i < CH; ++i) v[i] = cache[j][i];
    } else {
      load_s(c, v);
    }
#pragma unroll
    for (int i = 0; i < CH; ++i) {
      const float d = v[i] - mean;
      sq += d * d;
    }
  }
  const float rstd = layer_norm::rstd_from(warp_sum(sq), a.D, a.eps);

  k = 0;
  for (int c = lane * CH; c < a.D; c += STEP, ++k) {
    float v[CH], w[CH], b[CH];
    if constexpr (CACHE > 0) {
#pragma unroll
      for (int j = 0; j < CACHE; ++j)
        if (j == k)
#pragma unroll
          for (int i = 0; i < CH; ++i) v[i] = cache[j][i];
    } else {
      load_s(c, v);
    }
    load_param<CH>(a.w, a.wt, c, 1.0f, w);
    load_param<CH>(a.b, a.bt, c, 0.0f, b);
#pragma unroll
    for (int i = 0; i < CH; ++i) v[i] = layer_norm::forward_elem(v[i], mean, rstd, w[i], b[i]);
    store_chunk<CH>(a.y, off + c, a.yt, v);
  }
  if (lane == 0) {
    a.mean[row] = mean;
    a.rstd[row] = rstd;
  }
}

struct BwdArgs {
  const void* dy; const void* ds; const void* s; const float* mean; const float* rstd; const void* w;
  void* dx; void* dres; float* part;  // part: (num_partials, 2, D) fp32
  int64_t rows; int D;
  DType dyt, dst, st, wt, dxt, drt;
};

template <int CH>
__global__ void __launch_bounds__(kWarps * 32) ln_bwd_kernel(BwdArgs a) {
  extern __shared__ float smem[];  // (kWarps, 2, D): each warp's dW/dB partial sums
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int D = a.D;
  float* dw_acc = smem + warp * 2 * D;
  float* db_acc = dw_acc + D;
  for (int c = lane; c < 2 * D; c += 32) dw_acc[c] = 0.0f;  // a warp's own region: no block sync needed
  __syncwarp();
  constexpr int STEP = 32 * CH;
  const float invD = 1.0f / static_cast<float>(D);
  const int64_t r_begin = static_cast<int64_t>(blockIdx.x) * kRowsPerPartial;
  const int64_t r_end = min(a.rows, r_begin + kRowsPerPartial);

  for (int64_t row = r_begin + warp; row < r_end; row += kWarps) {
    const int64_t off = row * D;
    const float mu = a.mean[row], rs = a.rstd[row];
    float c1 = 0.0f, c2 = 0.0f;
    for (int c = lane * CH; c < D; c += STEP) {
      float s[CH], dy[CH], w[CH];
      load_chunk<CH>(a.s, off + c, a.st, s);
      load_chunk<CH>(a.dy, off + c, a.dyt, dy);
      load_param<CH>(a.w, a.wt, c, 1.0f, w);
#pragma unroll
      for (int i = 0; i < CH; ++i) {
        const float xh = (s[i] - mu) * rs, g = dy[i] * w[i];
        c1 += xh * g;
        c2 += g;
        dw_acc[c + i] += dy[i] * xh;
        db_acc[c + i] += dy[i];
      }
    }
    c1 = warp_sum(c1) * invD;
    c2 = warp_sum(c2) * invD;
    for (int c = lane * CH; c < D; c += STEP) {
      float s[CH], dy[CH], w[CH], ds[CH];
      load_chunk<CH>(a.s, off + c, a.st, s);
      load_chunk<CH>(a.dy, off + c, a.dyt, dy);
      load_param<CH>(a.w, a.wt, c, 1.0f, w);
      if (a.ds != nullptr) {
        load_chunk<CH>(a.ds, off + c, a.dst, ds);
      } else {
#pragma unroll
        for (int i = 0; i < CH; ++i) ds[i] = 0.0f;
      }
#pragma unroll
      for (int i = 0; i < CH; ++i) ds[i] = layer_norm::backward_elem(dy[i], s[i], mu, rs, w[i], c1, c2, ds[i]);
      store_chunk<CH>(a.dx, off + c, a.dxt, ds);
      if (a.dres != nullptr) store_chunk<CH>(a.dres, off + c, a.drt, ds);
    }
  }
  __syncthreads();
  float* out = a.part + static_cast<int64_t>(blockIdx.x) * 2 * D;
  for (int c = threadIdx.x; c < 2 * D; c += kWarps * 32) {
    float t = 0.0f;
#pragma unroll
    for (int wi = 0; wi < kWarps; ++wi) t += smem[wi * 2 * D + c];
    out[c] = t;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_layer_norm_fwd_cuda(
    const at::Tensor& x_, const std::optional<at::Tensor>& residual_, const std::optional<at::Tensor>& weight_,
    const std::optional<at::Tensor>& bias_, double eps, at::ScalarType out_dtype, at::ScalarType residual_dtype) {
  TORCH_CHECK(x_.dim() == 2, "add_layer_norm_fwd: x must be (rows, D)");
  const c10::cuda::CUDAGuard guard(x_.device());
  const bool has_res = residual_.has_value() && residual_->defined();
  const at::Tensor x = x_.contiguous();
  const at::Tensor res = has_res ? residual_->contiguous() : at::Tensor();
  const at::Tensor w = (weight_.has_value() && weight_->defined()) ? weight_->contiguous() : at::Tensor();
  const at::Tensor b = (bias_.has_value() && bias_->defined()) ? bias_->contiguous() : at::Tensor();
  const int64_t rows = x.size(0), D = x.size(1);
  if (has_res) {
    TORCH_CHECK(res.sizes() == x.sizes(), "add_layer_norm_fwd: residual must match x");
    FASTMAE_CHECK_SAME_DEVICE(x, res);
  }
  if (w.defined()) FASTMAE_CHECK_SAME_DEVICE(x, w);
  if (b.defined()) FASTMAE_CHECK_SAME_DEVICE(x, b);
  layer_norm::check_fwd_dtypes(x, residual_, weight_, bias_, out_dtype, residual_dtype);
  TORCH_CHECK(D <= layer_norm::kCudaMaxD, "add_layer_norm_fwd: D = ", D, " is above the CUDA kernels' ",
              layer_norm::kCudaMaxD, " (32-bit column offsets)");
  auto f32 = x.options().dtype(at::kFloat);
  at::Tensor y = empty_output({rows, D}, x.options().dtype(out_dtype));
  at::Tensor s = has_res ? empty_output({rows, D}, x.options().dtype(residual_dtype)) : at::empty({0}, x.options());
  at::Tensor mean = empty_output({rows}, f32), rstd = empty_output({rows}, f32);
  if (rows == 0) return {y, s, mean, rstd};
  if (D == 0) {  // empty rows: mean and rstd are 0 / 0, as the CPU twin computes them; nothing to launch
    mean.fill_(std::numeric_limits<float>::quiet_NaN());
    rstd.fill_(std::numeric_limits<float>::quiet_NaN());
    return {y, s, mean, rstd};
  }

  FwdArgs a;
  a.x = x.const_data_ptr(); a.res = has_res ? res.const_data_ptr() : nullptr;
  a.w = w.defined() ? w.const_data_ptr() : nullptr; a.b = b.defined() ? b.const_data_ptr() : nullptr;
  a.y = y.mutable_data_ptr(); a.s = has_res ? s.mutable_data_ptr() : nullptr;
  a.mean = mean.mutable_data_ptr<float>(); a.rstd = rstd.mutable_data_ptr<float>();
  a.rows = rows; a.D = static_cast<int>(D); a.eps = static_cast<float>(eps);
  a.xt = dtype_code(x.scalar_type()); a.rt = has_res ? dtype_code(res.scalar_type()) : kF32;
  a.wt = w.defined() ? dtype_code(w.scalar_type()) : kF32; a.bt = b.defined() ? dtype_code(b.scalar_type()) : kF32;
  a.yt = dtype_code(out_dtype); a.st = dtype_code(residual_dtype);

  const dim3 grid(static_cast<unsigned>((rows + kWarps - 1) / kWarps)), block(kWarps * 32);
  auto stream = at::cuda::getCurrentCUDAStream();
  if (can_vectorise(D, {&x, &res, &w, &b, &y, &s})) {
    if (D <= 32 * 8 * 4) ln_fwd_kernel<8, 4><<<grid, block, 0, stream>>>(a);
    else ln_fwd_kernel<8, 0><<<grid, block, 0, stream>>>(a);
  } else {
    ln_fwd_kernel<1, 0><<<grid, block, 0, stream>>>(a);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {y, s, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_layer_norm_bwd_cuda(
    const at::Tensor& dy_, const std::optional<at::Tensor>& ds_, const at::Tensor& s_, const at::Tensor& mean_,
    const at::Tensor& rstd_, const std::optional<at::Tensor>& weight_, const std::optional<at::Tensor>& bias_,
    at::ScalarType x_dtype, std::optional<at::ScalarType> residual_dtype) {
  TORCH_CHECK(s_.dim() == 2 && dy_.sizes() == s_.sizes(), "add_layer_norm_bwd: dy and s must be (rows, D)");
  const c10::cuda::CUDAGuard guard(s_.device());
  const at::Tensor dy = dy_.contiguous(), s = s_.contiguous();
  const at::Tensor mean = mean_.contiguous().to(at::kFloat), rstd = rstd_.contiguous().to(at::kFloat);
  const bool has_ds = ds_.has_value() && ds_->defined();
  const at::Tensor ds = has_ds ? ds_->contiguous() : at::Tensor();
  const at::Tensor w = (weight_.has_value() && weight_->defined()) ? weight_->contiguous() : at::Tensor();
  const bool has_b = bias_.has_value() && bias_->defined();
  const bool sep_res = residual_dtype.has_value() && *residual_dtype != x_dtype;
  const int64_t rows = s.size(0), D = s.size(1);
  if (has_ds) {
    TORCH_CHECK(ds.sizes() == s.sizes(), "add_layer_norm_bwd: ds must match s");
    FASTMAE_CHECK_SAME_DEVICE(s, ds);
  }
  FASTMAE_CHECK_SAME_DEVICE(s, dy);
  FASTMAE_CHECK_SAME_DEVICE(s, mean);
  FASTMAE_CHECK_SAME_DEVICE(s, rstd);
  TORCH_CHECK(mean.numel() == rows && rstd.numel() == rows, "add_layer_norm_bwd: mean and rstd must be (rows,)");
  if (w.defined()) FASTMAE_CHECK_SAME_DEVICE(s, w);
  layer_norm::check_bwd_dtypes(dy, ds_, s, weight_, bias_, x_dtype, residual_dtype);
  TORCH_CHECK(2 * D <= layer_norm::kCudaMaxD, "add_layer_norm_bwd: D = ", D, " is above the CUDA kernels' ",
              layer_norm::kCudaMaxD / 2, " (32-bit offsets into the 2 x D partial rows)");
  at::Tensor dx = empty_output({rows, D}, s.options().dtype(x_dtype));
  at::Tensor dres = sep_res ? empty_output({rows, D}, s.options().dtype(*residual_dtype)) : at::empty({0}, s.options());
  const int P = layer_norm::num_partials(rows, kRowsPerPartial);
  at::Tensor part = at::empty({std::max(P, 1), 2, D}, s.options().dtype(at::kFloat));
  auto stream = at::cuda::getCurrentCUDAStream();
  if (rows > 0 && D > 0) {
    BwdArgs a;
    a.dy = dy.const_data_ptr(); a.ds = has_ds ? ds.const_data_ptr() : nullptr; a.s = s.const_data_ptr();
    a.mean = mean.const_data_ptr<float>(); a.rstd = rstd.const_data_ptr<float>();
    a.w = w.defined() ? w.const_data_ptr() : nullptr;
    a.dx = dx.mutable_data_ptr(); a.dres = sep_res ? dres.mutable_data_ptr() : nullptr;
    a.part = part.mutable_data_ptr<float>();
    a.rows = rows; a.D = static_cast<int>(D);
    a.dyt = dtype_code(dy.scalar_type()); a.dst = has_ds ? dtype_code(ds.scalar_type()) : kF32;
    a.st = dtype_code(s.scalar_type()); a.wt = w.defined() ? dtype_code(w.scalar_type()) : kF32;
    a.dxt = dtype_code(x_dtype); a.drt = sep_res ? dtype_code(*residual_dtype) : kF32;
    const size_t shm = static_cast<size_t>(kWarps) * 2 * D * sizeof(float);  // a block's dW / dB partials
    auto launch = [&](auto kernel) {
      fastmae::cuda::opt_in_dynamic_smem(kernel, shm, "add_layer_norm_bwd: D = " + std::to_string(D),
                                         "'triton' or 'torch'");
      kernel<<<P, kWarps * 32, shm, stream>>>(a);
    };
    if (can_vectorise(D, {&dy, &ds, &s, &w, &dx, &dres})) launch(ln_bwd_kernel<8>);
    else launch(ln_bwd_kernel<1>);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    part.zero_();
  }
  at::Tensor dw = at::empty({0}, s.options()), db = at::empty({0}, s.options());
  if (w.defined() || has_b) {
    at::Tensor red = empty_output({2 * D}, s.options().dtype(at::kFloat));
    const int64_t C = 2 * D;
    if (C > 0) {  // an empty grid is not a launch CUDA accepts
      column_sum_kernel<<<static_cast<unsigned>((C + 31) / 32), 256, 0, stream>>>(
          part.const_data_ptr<float>(), red.mutable_data_ptr<float>(), std::max(P, 1), static_cast<int>(C));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    // copies (copy=true): dw and db must not alias each other (nor red)
    if (w.defined()) dw = red.narrow(0, 0, D).to(w.scalar_type(), /*non_blocking=*/false, /*copy=*/true);
    if (has_b) db = red.narrow(0, D, D).to(bias_->scalar_type(), /*non_blocking=*/false, /*copy=*/true);
  }
  return {dx, dres, dw, db};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmae_ext, CUDA, m) {
  m.impl("add_layer_norm_fwd", &add_layer_norm_fwd_cuda);
  m.impl("add_layer_norm_bwd", &add_layer_norm_bwd_cuda);
}

}  // namespace fastmae
