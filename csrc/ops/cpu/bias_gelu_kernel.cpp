// CPU twin of bias + exact GELU (math in ../bias_gelu.h).
//
// Forward: at::parallel_for over rows; a row is converted to fp32, v = x + bias, erf and exp
// by the branch-free approximations of bias_gelu.h (vectorised loops), stored in x's dtype.
// Backward: fixed blocks of kRowsPerPartial rows, at::parallel_for over blocks; each block
// writes dx for its rows and one fp32 partial row of dbias; the partials are then summed per
// column in block order. Nothing depends on the thread count: the same bits on every run.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../bias_gelu.h"
#include "rowio.h"  // fp32 <-> storage dtype row conversions

namespace fastmae {
namespace {

using namespace fastmae::cpu;
using namespace fastmae::bias_gelu;
constexpr int64_t kRowsPerPartial = 32;

// The two elementwise loops, compiled for AVX2 + FMA and for the baseline target and chosen at
// run time (the pattern of csrc/common.h): v <- gelu(v) (forward), g <- g * gelu'(v) (backward).
FASTMAE_ALWAYS_INLINE void gelu_row_body(float* v, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    float erf_z, e;
    erf_exp_as(v[i] * kInvSqrt2, &erf_z, &e);
    v[i] = gelu(v[i], erf_z);
  }
}

FASTMAE_ALWAYS_INLINE void gelu_grad_row_body(const float* v, float* g, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    float erf_z, e;
    erf_exp_as(v[i] * kInvSqrt2, &erf_z, &e);
    g[i] *= gelu_grad(v[i], erf_z, e);
  }
}

FASTMAE_TARGET_AVX2 void gelu_row_avx2(float* v, int64_t n) { gelu_row_body(v, n); }
void gelu_row_base(float* v, int64_t n) { gelu_row_body(v, n); }
FASTMAE_TARGET_AVX2 void gelu_grad_row_avx2(const float* v, float* g, int64_t n) { gelu_grad_row_body(v, g, n); }
void gelu_grad_row_base(const float* v, float* g, int64_t n) { gelu_grad_row_body(v, g, n); }

void gelu_row(float* v, int64_t n) {
  if (cpu_has_avx2_fma()) {
    gelu_row_avx2(v, n);
  } else {
    gelu_row_base(v, n);
  }
}

void gelu_grad_row(const float* v, float* g, int64_t n) {
  if (cpu_has_avx2_fma()) {
    gelu_grad_row_avx2(v, g, n);
  } else {
    gelu_grad_row_base(v, g, n);
  }
}

at::Tensor bias_gelu_fwd_cpu(const at::Tensor& x_, const at::Tensor& bias_) {
  TORCH_CHECK(x_.dim() == 2 && bias_.dim() == 1 && bias_.size(0) == x_.size(1), "bias_gelu_fwd: x (rows, H), bias (H)");
  const at::Tensor x = x_.contiguous(), bias = bias_.contiguous();
  const int64_t rows = x.size(0), H = x.size(1);
  at::Tensor y = empty_output({rows, H}, x.options());
  std::vector<float> b(H);
  load_row(bias.const_data_ptr(), bias.scalar_type(), b.data(), H);
  const at::ScalarType xt = x.scalar_type();
  const int64_t xe = x.element_size();
  const char* xp = byte_ptr(x);
  char* yp = byte_ptr_mut(y);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(H, 1));
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    std::vector<float> v(H);
    for (int64_t r = r0; r < r1; ++r) {
      load_row(xp + r * H * xe, xt, v.data(), H);
      for (int64_t i = 0; i < H; ++i) v[i] += b[i];
      gelu_row(v.data(), H);
      store_row(v.data(), xt, yp + r * H * xe, H);
    }
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> bias_gelu_bwd_cpu(const at::Tensor& dy_, const at::Tensor& x_,
                                                     const at::Tensor& bias_) {
  TORCH_CHECK(x_.dim() == 2 && dy_.sizes() == x_.sizes() && bias_.dim() == 1 && bias_.size(0) == x_.size(1),
              "bias_gelu_bwd: dy, x (rows, H), bias (H)");
  const at::Tensor dy = dy_.contiguous(), x = x_.contiguous(), bias = bias_.contiguous();
  const int64_t rows = x.size(0), H = x.size(1);
  at::Tensor dx = empty_output({rows, H}, x.options());
  std::vector<float> b(H);
  load_row(bias.const_data_ptr(), bias.scalar_type(), b.data(), H);
  const int64_t nblk = bias_gelu::num_partials(rows, kRowsPerPartial);
  at::Tensor part = at::zeros({std::max<int64_t>(nblk, 1), H}, x.options().dtype(at::kFloat));
  const at::ScalarType xt = x.scalar_type(), dyt = dy.scalar_type();
  const int64_t xe = x.element_size(), dye = dy.element_size();
  const char* xp = byte_ptr(x);
  const char* dyp = byte_ptr(dy);
  char* dxp = byte_ptr_mut(dx);
  float* pp = part.mutable_data_ptr<float>();
  at::parallel_for(0, nblk, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> v(H), g(H);
    for (int64_t blk = b0; blk < b1; ++blk) {
      float* acc = pp + blk * H;
      const int64_t r_end = std::min(rows, (blk + 1) * kRowsPerPartial);
      for (int64_t r = blk * kRowsPerPartial; r < r_end; ++r) {
        load_row(xp + r * H * xe, xt, v.data(), H);
        load_row(dyp + r * H * dye, dyt, g.data(), H);
        for (int64_t i = 0; i < H; ++i) v[i] += b[i];
        gelu_grad_row(v.data(), g.data(), H);
        for (int64_t i = 0; i < H; ++i) acc[i] += g[i];
        store_row(g.data(), xt, dxp + r * H * xe, H);
      }
    }
  });
  at::Tensor db = empty_output({H}, x.options().dtype(at::kFloat));
  float* dbp = db.mutable_data_ptr<float>();
  at::parallel_for(0, H, 256, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      float a = 0.0f;
      for (int64_t blk = 0; blk < nblk; ++blk) a += pp[blk * H + c];
      dbp[c] = a;
    }
  });
  return {dx, db.to(bias.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmae_ext, CPU, m) {
  m.impl("bias_gelu_fwd", &bias_gelu_fwd_cpu);
  m.impl("bias_gelu_bwd", &bias_gelu_bwd_cpu);
}

}  // namespace fastmae
