// CPU twin of the fused residual add + LayerNorm (math in ../layer_norm.h).
//
// Forward: at::parallel_for over rows. Per row, fp32 math: s = x + residual in one pass that
// stores s and sums it (fp32 storage: s is written straight into the output and re-read from
// there, hot in L1; fp16 / bf16: s is rounded and stored, then its rounded values re-read,
// as the backward reads them), then the centred sum of squares, then y = xhat * w + b
// written straight into y (fp32) or through a row buffer (fp16 / bf16).
// Backward: rows are cut into fixed blocks of kRowsPerPartial; at::parallel_for over blocks.
// Per row, one pass computes c1 = sum(xhat * g), c2 = sum(g) and adds dy * xhat, dy into
// the block's dW / dB partial rows, a second pass writes dx (and dresidual). The partials are
// summed over blocks in block order. The blocks never depend on the thread count, so the
// result is the same bits on every run and machine (for one choice of the code path below).
//
// Vectorisation: each row loop works on blocks of kLanes = 16 elements, loads into a local
// array before any store (no aliasing question for the compiler), with 16 independent
// partial sums combined in a fixed tree at the end: GCC vectorises that without
// reassociating anything, so the sums have the same order whatever the vector width. The
// row loops are compiled twice (FASTMAE_TARGET_AVX2, csrc/common.h): for AVX2 + FMA, taken
// where the CPU has them, and for the baseline target. Storage dtypes other than fp32 are
// converted to / from fp32 row buffers (rowio.h) around the same loops.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <memory>
#include <vector>

#include "../layer_norm.h"
#include "rowio.h"

namespace fastmae {
namespace {

using namespace fastmae::cpu;
constexpr int64_t kRowsPerPartial = 32;
constexpr int kLanes = 16;

// A (D,) parameter as fp32: read in place when it is a contiguous fp32 tensor, else converted
// into `store` (filled with `fill` when absent).
const float* param_f32(const std::optional<at::Tensor>& p, int64_t D, float fill, std::vector<float>& store) {
  if (p.has_value() && p->defined() && p->scalar_type() == at::kFloat && p->is_contiguous())
    return p->const_data_ptr<float>();
  store.assign(D, fill);
  if (p.has_value() && p->defined()) {
    at::Tensor c = p->contiguous();
    load_row(c.const_data_ptr(), c.scalar_type(), store.data(), D);
  }
  return store.data();
}

// ----------------------------------------------------------------------------- row loops
// Fixed-order sum of the 16 lanes.
FASTMAE_ALWAYS_INLINE float lanes_sum(const float* a) {
  float t[8], u[4];
  for (int j = 0; j < 8; ++j) t[j] = a[j] + a[j + 8];
  for (int j = 0; j < 4; ++j) u[j] = t[j] + t[j + 4];
  return (u[0] + u[2]) + (u[1] + u[3]);
}

// s = x + r stored; returns sum(s).
FASTMAE_ALWAYS_INLINE float add_store_sum(const float* x, const float* r, float* s, int64_t n) {
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    float v[kLanes];
    for (int j = 0; j < kLanes; ++j) v[j] = x[i + j] + r[i + j];
    for (int j = 0; j < kLanes; ++j) s[i + j] = v[j];
    for (int j = 0; j < kLanes; ++j) acc[j] += v[j];
  }
  float tail = 0.0f;
  for (; i < n; ++i) {
    const float v = x[i] + r[i];
    s[i] = v;
    tail += v;
  }
  return lanes_sum(acc) + tail;
}

FASTMAE_ALWAYS_INLINE void add_rows(const float* x, const float* r, float* s, int64_t n) {
  for (int64_t i = 0; i < n; ++i) s[i] = x[i] + r[i];
}

FASTMAE_ALWAYS_INLINE float sum16(const float* p, int64_t n) {
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] += p[i + j];
  float tail = 0.0f;
  for (; i < n; ++i) tail += p[i];
  return lanes_sum(acc) + tail;
}

FASTMAE_ALWAYS_INLINE float centred_sumsq(const float* p, float mu, int64_t n) {
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) {
      const float c = p[i + j] - mu;
      acc[j] += c * c;
    }
  float tail = 0.0f;
  for (; i < n; ++i) {
    const float c = p[i] - mu;
    tail += c * c;
  }
  return lanes_sum(acc) + tail;
}

FASTMAE_ALWAYS_INLINE void normalize(const float* s, float mu, float rs, const float* w, const float* b, float* y,
                                     int64_t n) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    float v[kLanes];
    for (int j = 0; j < kLanes; ++j) v[j] = layer_norm::forward_elem(s[i + j], mu, rs, w[i + j], b[i + j]);
    for (int j = 0; j < kLanes; ++j) y[i + j] = v[j];
  }
  for (; i < n; ++i) y[i] = layer_norm::forward_elem(s[i], mu, rs, w[i], b[i]);
}

// First backward pass: returns c1 * D = sum(xhat * g) and c2 * D = sum(g) (g = dy * w); with
// kAcc, dy * xhat and dy are added into the dW / dB partial rows.
template <bool kAcc>
FASTMAE_ALWAYS_INLINE void bwd_sums(const float* s, const float* dy, const float* w, float mu, float rs, float* dwp,
                                    float* dbp, int64_t n, float* sxg, float* sg) {
  float a1[kLanes] = {}, a2[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    float xh[kLanes], d[kLanes], pw[kLanes], pb[kLanes];
    for (int j = 0; j < kLanes; ++j) {
      xh[j] = (s[i + j] - mu) * rs;
      d[j] = dy[i + j];
      const float g = d[j] * w[i + j];
      a1[j] += xh[j] * g;
      a2[j] += g;
    }
    if (kAcc) {
      for (int j = 0; j < kLanes; ++j) {
        pw[j] = dwp[i + j] + d[j] * xh[j];
        pb[j] = dbp[i + j] + d[j];
      }
      for (int j = 0; j < kLanes; ++j) dwp[i + j] = pw[j];
      for (int j = 0; j < kLanes; ++j) dbp[i + j] = pb[j];
    }
  }
  float t1 = 0.0f, t2 = 0.0f;
  for (; i < n; ++i) {
    const float xh = (s[i] - mu) * rs, g = dy[i] * w[i];
    t1 += xh * g;
    t2 += g;
    if (kAcc) {
      dwp[i] += dy[i] * xh;
      dbp[i] += dy[i];
    }
  }
  *sxg = lanes_sum(a1) + t1;
  *sg = lanes_sum(a2) + t2;
}

// Second backward pass: dx = (g - xhat * c1 - c2) * rstd (+ ds).
template <bool kDs>
FASTMAE_ALWAYS_INLINE void bwd_dx(const float* s, const float* dy, const float* ds, const float* w, float mu, float rs,
                                  float c1, float c2, float* dx, int64_t n) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    float v[kLanes];
    for (int j = 0; j < kLanes; ++j)
      v[j] = layer_norm::backward_elem(dy[i + j], s[i + j], mu, rs, w[i + j], c1, c2, kDs ? ds[i + j] : 0.0f);
    for (int j = 0; j < kLanes; ++j) dx[i + j] = v[j];
  }
  for (; i < n; ++i) dx[i] = layer_norm::backward_elem(dy[i], s[i], mu, rs, w[i], c1, c2, kDs ? ds[i] : 0.0f);
}

// ----------------------------------------------------------------------------- forward rows
struct FwdArgs {
  const char* x;
  const char* res;  // null without a residual
  char* s;          // null without a residual
  char* y;
  at::ScalarType xt, rt, st, yt;
  int64_t xe, re, se, ye;
  const float* w;
  const float* b;
  float* mean;
  float* rstd;
  int64_t D;
  float eps;
};

// Rows [r0, r1); buf0..buf2: D floats each.
FASTMAE_ALWAYS_INLINE void fwd_rows_body(const FwdArgs& a, int64_t r0, int64_t r1, float* buf0, float* buf1,
                                         float* buf2) {
  const int64_t D = a.D;
  for (int64_t r = r0; r < r1; ++r) {
    // xf: x in fp32 (in place for fp32 storage, else converted into buf0)
    const char* xrow = a.x + r * D * a.xe;
    const float* xf = reinterpret_cast<const float*>(xrow);
    if (a.xt != at::kFloat) {
      load_row(xrow, a.xt, buf0, D);
      xf = buf0;
    }
    const float* sf = xf;  // the normalised row, fp32
    float total;
    if (a.res != nullptr) {
      const char* rrow = a.res + r * D * a.re;
      const float* rf = reinterpret_cast<const float*>(rrow);
      if (a.rt != at::kFloat) {
        load_row(rrow, a.rt, buf1, D);
        rf = buf1;
      }
      char* srow = a.s + r * D * a.se;
      if (a.st == at::kFloat) {
        float* so = reinterpret_cast<float*>(srow);
        total = add_store_sum(xf, rf, so, D);
        sf = so;
      } else {
        // normalise the stored (rounded) s, which is what the backward reads
        add_rows(xf, rf, buf2, D);
        store_row(buf2, a.st, srow, D);
        load_row(srow, a.st, buf2, D);
        sf = buf2;
        total = sum16(sf, D);
      }
    } else {
      total = sum16(sf, D);
    }
    const float mu = total / static_cast<float>(D);
    const float rs = layer_norm::rstd_from(centred_sumsq(sf, mu, D), static_cast<int>(D), a.eps);
    char* yrow = a.y + r * D * a.ye;
    if (a.yt == at::kFloat) {
      normalize(sf, mu, rs, a.w, a.b, reinterpret_cast<float*>(yrow), D);
    } else {
      float* yb = sf == buf0 ? buf1 : buf0;  // a buffer sf is not in
      normalize(sf, mu, rs, a.w, a.b, yb, D);
      store_row(yb, a.yt, yrow, D);
    }
    a.mean[r] = mu;
    a.rstd[r] = rs;
  }
}

FASTMAE_TARGET_AVX2 void fwd_rows_avx2(const FwdArgs& a, int64_t r0, int64_t r1, float* b0, float* b1, float* b2) {
  fwd_rows_body(a, r0, r1, b0, b1, b2);
}
void fwd_rows_base(const FwdArgs& a, int64_t r0, int64_t r1, float* b0, float* b1, float* b2) {
  fwd_rows_body(a, r0, r1, b0, b1, b2);
}

// ----------------------------------------------------------------------------- backward rows
struct BwdArgs {
  const char* s;
  const char* dy;
  const char* ds;  // null when absent
  char* dx;
  char* dres;  // null unless dresidual has its own dtype
  at::ScalarType st, dyt, dst, dxt, drt;
  int64_t se, dye, dse, dxe, dre;
  const float* w;
  const float* mean;
  const float* rstd;
  float* part;  // (blocks, 2, D): dW, dB partials
  int64_t rows, D;
};

// Row converted to fp32: in place for fp32 storage, else into buf.
FASTMAE_ALWAYS_INLINE const float* as_f32(const char* row, at::ScalarType t, float* buf, int64_t n) {
  if (t == at::kFloat) return reinterpret_cast<const float*>(row);
  load_row(row, t, buf, n);
  return buf;
}

// Blocks [b0, b1); buf0..buf3: D floats each.
template <bool kDs, bool kAcc>
FASTMAE_ALWAYS_INLINE void bwd_blocks_body(const BwdArgs& a, int64_t b0, int64_t b1, float* buf0, float* buf1,
                                           float* buf2, float* buf3) {
  const int64_t D = a.D;
  const float invD = 1.0f / static_cast<float>(D);
  for (int64_t blk = b0; blk < b1; ++blk) {
    float* dwp = a.part + blk * 2 * D;
    float* dbp = dwp + D;
    if (kAcc)
      for (int64_t i = 0; i < 2 * D; ++i) dwp[i] = 0.0f;
    const int64_t r_end = std::min(a.rows, (blk + 1) * kRowsPerPartial);
    for (int64_t r = blk * kRowsPerPartial; r < r_end; ++r) {
      const float* sf = as_f32(a.s + r * D * a.se, a.st, buf0, D);
      const float* dyf = as_f32(a.dy + r * D * a.dye, a.dyt, buf1, D);
      const float* dsf = kDs ? as_f32(a.ds + r * D * a.dse, a.dst, buf2, D) : nullptr;
      const float mu = a.mean[r], rs = a.rstd[r];
      float sxg, sg;
      bwd_sums<kAcc>(sf, dyf, a.w, mu, rs, dwp, dbp, D, &sxg, &sg);
      const float c1 = sxg * invD, c2 = sg * invD;
      char* dxrow = a.dx + r * D * a.dxe;
      float* dxf = a.dxt == at::kFloat ? reinterpret_cast<float*>(dxrow) : buf3;
      bwd_dx<kDs>(sf, dyf, dsf, a.w, mu, rs, c1, c2, dxf, D);
      if (a.dxt != at::kFloat) store_row(dxf, a.dxt, dxrow, D);
      if (a.dres != nullptr) store_row(dxf, a.drt, a.dres + r * D * a.dre, D);
    }
  }
}

template <bool kDs, bool kAcc>
FASTMAE_TARGET_AVX2 void bwd_blocks_avx2(const BwdArgs& a, int64_t b0, int64_t b1, float* f0, float* f1, float* f2,
                                         float* f3) {
  bwd_blocks_body<kDs, kAcc>(a, b0, b1, f0, f1, f2, f3);
}
template <bool kDs, bool kAcc>
void bwd_blocks_base(const BwdArgs& a, int64_t b0, int64_t b1, float* f0, float* f1, float* f2, float* f3) {
  bwd_blocks_body<kDs, kAcc>(a, b0, b1, f0, f1, f2, f3);
}

template <bool kDs, bool kAcc>
void bwd_blocks(bool avx2, const BwdArgs& a, int64_t b0, int64_t b1, float* f0, float* f1, float* f2, float* f3) {
  if (avx2)
    bwd_blocks_avx2<kDs, kAcc>(a, b0, b1, f0, f1, f2, f3);
  else
    bwd_blocks_base<kDs, kAcc>(a, b0, b1, f0, f1, f2, f3);
}

// dW, dB: the column sums of the (nblk, 2, D) partials, always in block order.
FASTMAE_ALWAYS_INLINE void combine_body(const float* part, int64_t nblk, int64_t D, float* dw, float* db) {
  for (int64_t c = 0; c < D; ++c) dw[c] = db[c] = 0.0f;
  for (int64_t blk = 0; blk < nblk; ++blk) {
    const float* pw = part + blk * 2 * D;
    const float* pb = pw + D;
    for (int64_t c = 0; c < D; ++c) dw[c] += pw[c];
    for (int64_t c = 0; c < D; ++c) db[c] += pb[c];
  }
}
FASTMAE_TARGET_AVX2 void combine_avx2(const float* part, int64_t nblk, int64_t D, float* dw, float* db) {
  combine_body(part, nblk, D, dw, db);
}
void combine_base(const float* part, int64_t nblk, int64_t D, float* dw, float* db) {
  combine_body(part, nblk, D, dw, db);
}

// ----------------------------------------------------------------------------- ops
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_layer_norm_fwd_cpu(
    const at::Tensor& x_, const std::optional<at::Tensor>& residual_, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, at::ScalarType out_dtype, at::ScalarType residual_dtype) {
  TORCH_CHECK(x_.dim() == 2, "add_layer_norm_fwd: x must be (rows, D)");
  const bool has_res = residual_.has_value() && residual_->defined();
  const at::Tensor x = x_.contiguous();
  const at::Tensor res = has_res ? residual_->contiguous() : at::Tensor();
  const int64_t rows = x.size(0), D = x.size(1);
  if (has_res) TORCH_CHECK(res.sizes() == x.sizes(), "add_layer_norm_fwd: residual must match x");
  std::vector<float> w_store, b_store;
  const float* w = param_f32(weight, D, 1.0f, w_store);
  const float* b = param_f32(bias, D, 0.0f, b_store);

  auto f32 = x.options().dtype(at::kFloat);
  at::Tensor y = empty_output({rows, D}, x.options().dtype(out_dtype));
  at::Tensor s = has_res ? empty_output({rows, D}, x.options().dtype(residual_dtype)) : at::empty({0}, x.options());
  at::Tensor mean = empty_output({rows}, f32), rstd = empty_output({rows}, f32);

  FwdArgs a;
  a.x = byte_ptr(x);
  a.res = has_res ? byte_ptr(res) : nullptr;
  a.s = has_res ? byte_ptr_mut(s) : nullptr;
  a.y = byte_ptr_mut(y);
  a.xt = x.scalar_type();
  a.rt = has_res ? res.scalar_type() : a.xt;
  a.st = residual_dtype;
  a.yt = out_dtype;
  a.xe = x.element_size();
  a.re = has_res ? res.element_size() : 0;
  a.se = s.element_size();
  a.ye = y.element_size();
  a.w = w;
  a.b = b;
  a.mean = mean.mutable_data_ptr<float>();
  a.rstd = rstd.mutable_data_ptr<float>();
  a.D = D;
  a.eps = static_cast<float>(eps);
  const bool avx2 = cpu_has_avx2_fma();

  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1));
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    std::vector<float> buf(3 * D);
    if (avx2)
      fwd_rows_avx2(a, r0, r1, buf.data(), buf.data() + D, buf.data() + 2 * D);
    else
      fwd_rows_base(a, r0, r1, buf.data(), buf.data() + D, buf.data() + 2 * D);
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
  std::vector<float> w_store;
  const float* w = param_f32(weight, D, 1.0f, w_store);

  at::Tensor dx = empty_output({rows, D}, s.options().dtype(x_dtype));
  at::Tensor dres = sep_res ? empty_output({rows, D}, s.options().dtype(*residual_dtype)) : at::empty({0}, s.options());
  const bool acc = has_w || has_b;
  const int64_t nblk = layer_norm::num_partials(rows, kRowsPerPartial);
  // uninitialised: each block zeroes its own partial rows
  std::unique_ptr<float[]> part(new float[acc ? nblk * 2 * D : 1]);

  BwdArgs a;
  a.s = byte_ptr(s);
  a.dy = byte_ptr(dy);
  a.ds = has_ds ? byte_ptr(ds) : nullptr;
  a.dx = byte_ptr_mut(dx);
  a.dres = sep_res ? byte_ptr_mut(dres) : nullptr;
  a.st = s.scalar_type();
  a.dyt = dy.scalar_type();
  a.dst = has_ds ? ds.scalar_type() : a.st;
  a.dxt = x_dtype;
  a.drt = sep_res ? *residual_dtype : x_dtype;
  a.se = s.element_size();
  a.dye = dy.element_size();
  a.dse = has_ds ? ds.element_size() : 0;
  a.dxe = dx.element_size();
  a.dre = dres.element_size();
  a.w = w;
  a.mean = mean.const_data_ptr<float>();
  a.rstd = rstd.const_data_ptr<float>();
  a.part = part.get();
  a.rows = rows;
  a.D = D;
  const bool avx2 = cpu_has_avx2_fma();

  at::parallel_for(0, nblk, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> buf(4 * D);
    float* f = buf.data();
    if (has_ds && acc)
      bwd_blocks<true, true>(avx2, a, b0, b1, f, f + D, f + 2 * D, f + 3 * D);
    else if (has_ds)
      bwd_blocks<true, false>(avx2, a, b0, b1, f, f + D, f + 2 * D, f + 3 * D);
    else if (acc)
      bwd_blocks<false, true>(avx2, a, b0, b1, f, f + D, f + 2 * D, f + 3 * D);
    else
      bwd_blocks<false, false>(avx2, a, b0, b1, f, f + D, f + 2 * D, f + 3 * D);
  });

  at::Tensor dw = at::empty({0}, s.options()), db = at::empty({0}, s.options());
  if (acc) {
    const auto f32 = s.options().dtype(at::kFloat);
    // fp32 parameters: summed straight into the outputs; else into fp32 rows, then converted
    const bool w32 = has_w && weight->scalar_type() == at::kFloat, b32 = has_b && bias->scalar_type() == at::kFloat;
    at::Tensor dw32 = empty_output({D}, f32), db32 = empty_output({D}, f32);
    float* dwp = dw32.mutable_data_ptr<float>();
    float* dbp = db32.mutable_data_ptr<float>();
    if (avx2)
      combine_avx2(part.get(), nblk, D, dwp, dbp);
    else
      combine_base(part.get(), nblk, D, dwp, dbp);
    if (has_w) dw = w32 ? dw32 : dw32.to(weight->scalar_type());
    if (has_b) db = b32 ? db32 : db32.to(bias->scalar_type());
  }
  return {dx, dres, dw, db};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmae_ext, CPU, m) {
  m.impl("add_layer_norm_fwd", &add_layer_norm_fwd_cpu);
  m.impl("add_layer_norm_bwd", &add_layer_norm_bwd_cpu);
}

}  // namespace fastmae
