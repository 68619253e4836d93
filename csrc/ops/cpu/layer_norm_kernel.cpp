// CPU twin of the fused residual add + LayerNorm (math in ../layer_norm.h).
//
// Forward: at::parallel_for over rows; each row is converted once into an fp32 buffer (s is
// rounded to residual_dtype first: the stored s is normalised, as the backward reads it), its
// mean and centred variance are two passes over that buffer, then y is written.
// Backward: rows are cut into fixed blocks of kRowsPerPartial; at::parallel_for over blocks,
// each block writes dx (and dresidual) for its rows and its own dW/dB partial sums; a second
// pass sums the partials over blocks in block order. The blocks never depend on the thread
// count, so the result is the same bits on every run and machine.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../layer_norm.h"
#include "layer_norm_kernel_rowio.h"

namespace fastmae {
namespace {

using namespace fastmae::cpu;
constexpr int64_t kRowsPerPartial = 32;

std::vector<float> param_or(const std::optional<at::Tensor>& p, int64_t D, float fill) {
  std::vector<float> out(D, fill);
  if (p.has_value() && p->defined()) {
    at::Tensor c = p->contiguous();
    load_row(c.const_data_ptr(), c.scalar_type(), out.data(), D);
  }
  return out;
}

// One row of the forward: s = x (+ residual) into buf (rounded to s_dtype when stored), its
// mean and rstd, y stored; residual and s are null without a residual.
FASTMAE_CPU_CLONES void fwd_row(const char* x, at::ScalarType xt, const char* res, at::ScalarType rt, char* s,
                                at::ScalarType st, char* y, at::ScalarType yt, const float* w, const float* b,
                                float* buf, float* tmp, int64_t D, float eps, float* mean, float* rstd) {
  load_row(x, xt, buf, D);
  if (res != nullptr) {
    add_row(res, rt, buf, tmp, D);
    store_row(buf, st, s, D);
    // normalise the stored (rounded) s, which is what the backward reads
    if (st != at::kFloat) load_row(s, st, buf, D);
  }
  const float mu = sum_row(buf, D) / static_cast<float>(D);
  for (int64_t i = 0; i < D; ++i) {
    const float c = buf[i] - mu;
    tmp[i] = c * c;
  }
  const float rs = layer_norm::rstd_from(sum_row(tmp, D), static_cast<int>(D), eps);
  for (int64_t i = 0; i < D; ++i) tmp[i] = layer_norm::forward_elem(buf[i], mu, rs, w[i], b[i]);
  store_row(tmp, yt, y, D);
  *mean = mu;
  *rstd = rs;
}

// One row of the backward: dx (and dresidual) stored, dy * xhat and dy added into the block's
// dW / dB partial rows. ds and dres are null when absent.
FASTMAE_CPU_CLONES void bwd_row(const char* s, at::ScalarType st, const char* dy, at::ScalarType dyt, const char* ds,
                                at::ScalarType dst, char* dx, at::ScalarType dxt, char* dres, at::ScalarType drt,
                                const float* w, float mu, float rs, float* dwp, float* dbp, float* sv, float* dyv,
                                float* g, float* xh, float* tmp, int64_t D) {
  const float invD = 1.0f / static_cast<float>(D);
  load_row(s, st, sv, D);
  load_row(dy, dyt, dyv, D);
  for (int64_t i = 0; i < D; ++i) {
    xh[i] = (sv[i] - mu) * rs;
    g[i] = dyv[i] * w[i];
    tmp[i] = xh[i] * g[i];
    dwp[i] += dyv[i] * xh[i];
    dbp[i] += dyv[i];
  }
  const float c1 = sum_row(tmp, D) * invD, c2 = sum_row(g, D) * invD;
  if (ds != nullptr) {
    load_row(ds, dst, tmp, D);
  } else {
    for (int64_t i = 0; i < D; ++i) tmp[i] = 0.0f;
  }
  for (int64_t i = 0; i < D; ++i) tmp[i] = layer_norm::backward_elem(dyv[i], sv[i], mu, rs, w[i], c1, c2, tmp[i]);
  store_row(tmp, dxt, dx, D);
  if (dres != nullptr) store_row(tmp, drt, dres, D);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_layer_norm_fwd_cpu(
    const at::Tensor& x_, const std::optional<at::Tensor>& residual_, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, at::ScalarType out_dtype, at::ScalarType residual_dtype) {
  TORCH_CHECK(x_.dim() == 2, "add_layer_norm_fwd: x must be (rows, D)");
  const bool has_res = residual_.has_value() && residual_->defined();
  const at::Tensor x = x_.contiguous();
  const at::Tensor res = has_res ? residual_->contiguous() : at::Tensor();
  const int64_t rows = x.size(0), D = x.size(1);
  if (has_res) TORCH_CHECK(res.sizes() == x.sizes(), "add_layer_norm_fwd: residual must match x");
  const std::vector<float> w = param_or(weight, D, 1.0f), b = param_or(bias, D, 0.0f);

  auto f32 = x.options().dtype(at::kFloat);
  at::Tensor y = empty_output({rows, D}, x.options().dtype(out_dtype));
  at::Tensor s = has_res ? empty_output({rows, D}, x.options().dtype(residual_dtype)) : at::empty({0}, x.options());
  at::Tensor mean = empty_output({rows}, f32), rstd = empty_output({rows}, f32);

  const at::ScalarType xt = x.scalar_type(), rt = has_res ? res.scalar_type() : xt;
  const int64_t xe = x.element_size(), re = has_res ? res.element_size() : 0;
  const int64_t ye = y.element_size(), se = s.element_size();
  const char* xp = byte_ptr(x);
  const char* rp = has_res ? byte_ptr(res) : nullptr;
  char* yp = byte_ptr_mut(y);
  char* sp = has_res ? byte_ptr_mut(s) : nullptr;
  float* mp = mean.mutable_data_ptr<float>();
  float* rsp = rstd.mutable_data_ptr<float>();
  const float feps = static_cast<float>(eps);

  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1));
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    std::vector<float> buf(D), tmp(D);
    for (int64_t r = r0; r < r1; ++r)
      fwd_row(xp + r * D * xe, xt, has_res ? rp + r * D * re : nullptr, rt, has_res ? sp + r * D * se : nullptr,
              residual_dtype, yp + r * D * ye, out_dtype, w.data(), b.data(), buf.data(), tmp.data(), D, feps, mp + r,
              rsp + r);
  });
  return {y, s, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_layer_norm_bwd_cpu(
    const at::Tensor& dy_, const std::optional<at::Tensor>& ds_, const at::Tensor& s_, const at::Tensor& mean_,
    const at::Tensor& rstd_, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    at::ScalarType x_dtype, std::optional<at::ScalarType> residual_dtype) {
  TORCH_CHECK(s_.dim() == 2 && dy_.sizes() == s_.sizes(), "add_layer_norm_bwd: dy and s must be (rows, D)");
  const at::Tensor dy = dy_.contiguous(), s = s_.contiguous();
  const at::Tensor mean = mean_.contiguous().to(at::kFloat), rstd = rstd_.contiguous().to(at::kFloat);
  const bool has_ds = ds_.has_value() && ds_->defined();
  const at::Tensor ds = has_ds ? ds_->contiguous() : at::Tensor();
  if (has_ds) TORCH_CHECK(ds.sizes() == s.sizes(), "add_layer_norm_bwd: ds must match s");
  const bool has_w = weight.has_value() && weight->defined(), has_b = bias.has_value() && bias->defined();
  const bool sep_res = residual_dtype.has_value() && *residual_dtype != x_dtype;
  const int64_t rows = s.size(0), D = s.size(1);
  const std::vector<float> w = param_or(weight, D, 1.0f);

  at::Tensor dx = empty_output({rows, D}, s.options().dtype(x_dtype));
  at::Tensor dres = sep_res ? empty_output({rows, D}, s.options().dtype(*residual_dtype)) : at::empty({0}, s.options());
  const int64_t nblk = layer_norm::num_partials(rows, kRowsPerPartial);
  at::Tensor part = at::empty({std::max<int64_t>(nblk, 1), 2, D}, s.options().dtype(at::kFloat));

  const at::ScalarType st = s.scalar_type(), dyt = dy.scalar_type(), dst = has_ds ? ds.scalar_type() : st;
  const int64_t se = s.element_size(), dye = dy.element_size(), dse = has_ds ? ds.element_size() : 0;
  const int64_t dxe = dx.element_size(), dre = dres.element_size();
  const char* sp = byte_ptr(s);
  const char* dyp = byte_ptr(dy);
  const char* dsp = has_ds ? byte_ptr(ds) : nullptr;
  char* dxp = byte_ptr_mut(dx);
  char* drp = sep_res ? byte_ptr_mut(dres) : nullptr;
  const float* mp = mean.const_data_ptr<float>();
  const float* rsp = rstd.const_data_ptr<float>();
  float* pp = part.mutable_data_ptr<float>();
  const at::ScalarType rdt = sep_res ? *residual_dtype : x_dtype;

  at::parallel_for(0, nblk, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> sv(D), dyv(D), g(D), xh(D), tmp(D);
    for (int64_t blk = b0; blk < b1; ++blk) {
      float* dwp = pp + blk * 2 * D;
      float* dbp = dwp + D;
      for (int64_t i = 0; i < D; ++i) dwp[i] = dbp[i] = 0.0f;
      const int64_t r_end = std::min(rows, (blk + 1) * kRowsPerPartial);
      for (int64_t r = blk * kRowsPerPartial; r < r_end; ++r)
        bwd_row(sp + r * D * se, st, dyp + r * D * dye, dyt, has_ds ? dsp + r * D * dse : nullptr, dst,
                dxp + r * D * dxe, x_dtype, sep_res ? drp + r * D * dre : nullptr, rdt, w.data(), mp[r], rsp[r], dwp,
                dbp, sv.data(), dyv.data(), g.data(), xh.data(), tmp.data(), D);
    }
  });

  at::Tensor dw = at::empty({0}, s.options()), db = at::empty({0}, s.options());
  if (has_w || has_b) {
    at::Tensor red = empty_output({2, D}, s.options().dtype(at::kFloat));
    float* rp = red.mutable_data_ptr<float>();
    // Column sums over the blocks, always in block order.
    at::parallel_for(0, D, 256, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        float a = 0.0f, bb = 0.0f;
        for (int64_t blk = 0; blk < nblk; ++blk) {
          a += pp[blk * 2 * D + c];
          bb += pp[blk * 2 * D + D + c];
        }
        rp[c] = a;
        rp[D + c] = bb;
      }
    });
    // copies (copy=true): dw and db must not alias each other (nor red)
    if (has_w) dw = red[0].to(weight->scalar_type(), /*non_blocking=*/false, /*copy=*/true);
    if (has_b) db = red[1].to(bias->scalar_type(), /*non_blocking=*/false, /*copy=*/true);
  }
  return {dx, dres, dw, db};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmae_ext, CPU, m) {
  m.impl("add_layer_norm_fwd", &add_layer_norm_fwd_cpu);
  m.impl("add_layer_norm_bwd", &add_layer_norm_bwd_cpu);
}

}  // namespace fastmae
