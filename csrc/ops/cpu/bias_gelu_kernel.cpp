// CPU twin of bias + exact GELU (math in ../bias_gelu.h).
//
// Forward: at::parallel_for over rows; each row in one pass: v = x + bias, erf and exp by the
// branch-free approximations of bias_gelu.h, y = gelu(v). fp32 rows are read and written in
// place; fp16 / bf16 rows go through an fp32 row buffer (rowio.h).
// Backward: fixed blocks of kRowsPerPartial rows, at::parallel_for over blocks; one pass per
// row computes g = dy * gelu'(x + bias), writes it as dx and adds it to the block's fp32 dbias
// partial row; the partials are then summed per column in block order. Nothing depends on the
// thread count: the same bits on every run.
// The row loops are compiled three times (AVX-512, AVX2 + FMA, baseline; csrc/common.h) and
// chosen at run time: the erf/exp arithmetic is the time, and 16 lanes halve it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../bias_gelu.h"
#include "rowio.h"  // fp32 <-> storage dtype row conversions

namespace fastmae {
namespace {

using namespace fastmae::cpu;
using namespace fastmae::bias_gelu;
constexpr int64_t kRowsPerPartial = 32;

// y = gelu(x + b) (y may be x).
FASTMAE_ALWAYS_INLINE void fwd_row_body(const float* x, const float* b, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i] + b[i];
    float erf_z, e;
    erf_exp_as(v * kInvSqrt2, &erf_z, &e);
    y[i] = gelu(v, erf_z);
  }
}

// g = dy * gelu'(x + b) to dx (dx may be dy), acc += g.
FASTMAE_ALWAYS_INLINE void bwd_row_body(const float* x, const float* b, const float* dy, float* dx, float* acc,
                                        int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i] + b[i];
    float erf_z, e;
    erf_exp_as(v * kInvSqrt2, &erf_z, &e);
    const float g = dy[i] * gelu_grad(v, erf_z, e);
    dx[i] = g;
    acc[i] += g;
  }
}

FASTMAE_TARGET_AVX512 void fwd_row_avx512(const float* x, const float* b, float* y, int64_t n) {
  fwd_row_body(x, b, y, n);
}
FASTMAE_TARGET_AVX2 void fwd_row_avx2(const float* x, const float* b, float* y, int64_t n) {
  fwd_row_body(x, b, y, n);
}
void fwd_row_base(const float* x, const float* b, float* y, int64_t n) { fwd_row_body(x, b, y, n); }
FASTMAE_TARGET_AVX512 void bwd_row_avx512(const float* x, const float* b, const float* dy, float* dx, float* acc,
                                          int64_t n) {
  bwd_row_body(x, b, dy, dx, acc, n);
}
FASTMAE_TARGET_AVX2 void bwd_row_avx2(const float* x, const float* b, const float* dy, float* dx, float* acc,
                                      int64_t n) {
  bwd_row_body(x, b, dy, dx, acc, n);
}
void bwd_row_base(const float* x, const float* b, const float* dy, float* dx, float* acc, int64_t n) {
  bwd_row_body(x, b, dy, dx, acc, n);
}

// lvl: the loop build, 0 baseline, 1 AVX2 + FMA, 2 AVX-512 (cpu_isa_level, common.h: the best
// the CPU has, which the tests cap to check every build against the oracle).
void fwd_row(int lvl, const float* x, const float* b, float* y, int64_t n) {
  if (lvl == 2) {
    fwd_row_avx512(x, b, y, n);
  } else if (lvl == 1) {
    fwd_row_avx2(x, b, y, n);
  } else {
    fwd_row_base(x, b, y, n);
  }
}

void bwd_row(int lvl, const float* x, const float* b, const float* dy, float* dx, float* acc, int64_t n) {
  if (lvl == 2) {
    bwd_row_avx512(x, b, dy, dx, acc, n);
  } else if (lvl == 1) {
    bwd_row_avx2(x, b, dy, dx, acc, n);
  } else {
    bwd_row_base(x, b, dy, dx, acc, n);
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
  const int lvl = cpu_isa_level();
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    if (xt == at::kFloat) {
      for (int64_t r = r0; r < r1; ++r) {
        fwd_row(lvl, reinterpret_cast<const float*>(xp) + r * H, b.data(), reinterpret_cast<float*>(yp) + r * H, H);
      }
      return;
    }
    std::vector<float> v(H);
    for (int64_t r = r0; r < r1; ++r) {
      load_row(xp + r * H * xe, xt, v.data(), H);
      fwd_row(lvl, v.data(), b.data(), v.data(), H);
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
  const int lvl = cpu_isa_level();
  at::parallel_for(0, nblk, 1, [&](int64_t b0, int64_t b1) {
    // fp32 rows are used in place; others through fp32 buffers (g: dy in, dx out)
    std::vector<float> v(xt == at::kFloat ? 0 : H), g(xt == at::kFloat && dyt == at::kFloat ? 0 : H);
    for (int64_t blk = b0; blk < b1; ++blk) {
      float* acc = pp + blk * H;
      const int64_t r_end = std::min(rows, (blk + 1) * kRowsPerPartial);
      for (int64_t r = blk * kRowsPerPartial; r < r_end; ++r) {
        const float* xr = reinterpret_cast<const float*>(xp + r * H * xe);
        const float* dyr = reinterpret_cast<const float*>(dyp + r * H * dye);
        float* dxr = reinterpret_cast<float*>(dxp + r * H * xe);
        if (xt != at::kFloat) {
          load_row(xr, xt, v.data(), H);
          xr = v.data();
        }
        if (!g.empty()) {
          load_row(dyr, dyt, g.data(), H);
          dyr = g.data();
        }
        bwd_row(lvl, xr, b.data(), dyr, g.empty() ? dxr : g.data(), acc, H);
        if (!g.empty()) store_row(g.data(), xt, dxr, H);
      }
    }
  });
  at::Tensor db = empty_output({H}, x.options().dtype(at::kFloat));
  float* dbp = db.mutable_data_ptr<float>();
  // a parallel region costs more than a few ten thousand adds: chunks of >= 64K partial elements
  const int64_t col_grain = std::max<int64_t>(256, 65536 / std::max<int64_t>(nblk, 1));
  at::parallel_for(0, H, col_grain, [&](int64_t c0, int64_t c1) {
    // column c: 0 + part[0][c] + part[1][c] + ... in block order; rows of partials, vectorised over columns
    for (int64_t c = c0; c < c1; ++c) dbp[c] = 0.0f;
    for (int64_t blk = 0; blk < nblk; ++blk) {
      const float* pr = pp + blk * H;
      for (int64_t c = c0; c < c1; ++c) dbp[c] += pr[c];
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
