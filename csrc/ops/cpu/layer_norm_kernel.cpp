// CPU twin of the fused residual add + LayerNorm (math in ../layer_norm.h).
//
// Forward: at::parallel_for over rows. Per row, fp32 math: s = x + residual in one pass that
// stores s and sums the stored values, then the centred sum of squares over the row (hot in
// L1), then y = xhat * w + b stored. When x, residual, s and y are all fp32, or all bf16, the
// row is read and written in place with bf16 converted in registers (rounded s kept in an fp32
// row buffer for the next passes); any other dtype mix goes through fp32 row buffers (rowio.h),
// s rounded to its dtype and read back, as the backward reads it.
// Backward: rows are cut into fixed blocks of kRowsPerPartial; at::parallel_for over blocks.
// Per row, one pass computes c1 = sum(xhat * g), c2 = sum(g) and adds dy * xhat, dy into
// the block's dW / dB partial rows, a second pass writes dx (and dresidual); fp32 rows in
// place, fp16 / bf16 through fp32 row buffers. The partials are summed over blocks in block
// order. The blocks never depend on the thread count, so the result is the same bits on every
// run and machine (for one choice of the code path below).
//
// Vectorisation: the row loops are written on 8-lane vectors (fvec.h: GCC / Clang vector
// extensions, no auto-vectoriser involved) and every row sum keeps 32 independent lanes so that
// no add waits on the last (Sum32: a fixed order that depends only on D). The loops are compiled
// twice (FASTMAE_TARGET_AVX2, csrc/common.h): for AVX2 + FMA, taken where the CPU has them, and
// for the baseline target. At MAE's shapes the rows stream from L3 (benchmarks/bench_cpu_twins.py).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <memory>
#include <type_traits>
#include <vector>

#include "../layer_norm.h"
#include "fvec.h"
#include "rowio.h"

namespace fastmae {
namespace {

using namespace fastmae::cpu;
constexpr int64_t kRowsPerPartial = 32;

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
// 8-lane vectors (fvec.h); every row sum keeps 32 lanes, in the fixed order Sum32 describes.
// T is the rows' storage type, float or bf16 (converted in registers).

// s = x + r stored in T; returns sum(s) of the stored values, which go to sf as fp32 too
// (for T = float, sf is s).
template <class T>
FASTMAE_ALWAYS_INLINE float add_store_sum(const T* x, const T* r, T* s, float* sf, int64_t n) {
  constexpr bool kF32 = std::is_same_v<T, float>;
  Sum32 acc;
  int64_t i = 0;
  for (; i + kSumLanes <= n; i += kSumLanes)
    for (int k = 0; k < 4; ++k) {
      const int64_t j = i + kVecLanes * k;
      const f32x8 v = vstore(s + j, vload(x + j) + vload(r + j));
      if (!kF32) vstore(sf + j, v);
      acc.lane[k] += v;
    }
  for (; i + kVecLanes <= n; i += kVecLanes) {
    const f32x8 v = vstore(s + i, vload(x + i) + vload(r + i));
    if (!kF32) vstore(sf + i, v);
    acc.lane[0] += v;
  }
  float tail = 0.0f;
  for (; i < n; ++i) {
    const float v = sstore(s + i, sload(x + i) + sload(r + i));
    if (!kF32) sf[i] = v;
    tail += v;
  }
  return acc.total() + tail;
}

FASTMAE_ALWAYS_INLINE void add_rows(const float* x, const float* r, float* s, int64_t n) {
  int64_t i = 0;
  for (; i + kVecLanes <= n; i += kVecLanes) vstore(s + i, vload(x + i) + vload(r + i));
  for (; i < n; ++i) s[i] = x[i] + r[i];
}

// x as fp32 into f.
template <class T>
FASTMAE_ALWAYS_INLINE void widen(const T* x, float* f, int64_t n) {
  int64_t i = 0;
  for (; i + kVecLanes <= n; i += kVecLanes) vstore(f + i, vload(x + i));
  for (; i < n; ++i) f[i] = sload(x + i);
}

FASTMAE_ALWAYS_INLINE float row_sum(const float* p, int64_t n) {
  Sum32 acc;
  int64_t i = 0;
  for (; i + kSumLanes <= n; i += kSumLanes)
    for (int k = 0; k < 4; ++k) acc.lane[k] += vload(p + i + kVecLanes * k);
  for (; i + kVecLanes <= n; i += kVecLanes) acc.lane[0] += vload(p + i);
  float tail = 0.0f;
  for (; i < n; ++i) tail += p[i];
  return acc.total() + tail;
}

FASTMAE_ALWAYS_INLINE float centred_sumsq(const float* p, float mu, int64_t n) {
  Sum32 acc;
  const f32x8 m = vsplat(mu);
  int64_t i = 0;
  for (; i + kSumLanes <= n; i += kSumLanes)
    for (int k = 0; k < 4; ++k) {
      const f32x8 c = vload(p + i + kVecLanes * k) - m;
      acc.lane[k] += c * c;
    }
  for (; i + kVecLanes <= n; i += kVecLanes) {
    const f32x8 c = vload(p + i) - m;
    acc.lane[0] += c * c;
  }
  float tail = 0.0f;
  for (; i < n; ++i) {
    const float c = p[i] - mu;
    tail += c * c;
  }
  return acc.total() + tail;
}

// y = (s - mean) * rstd * w + b (layer_norm::forward_elem), stored in T.
template <class T>
FASTMAE_ALWAYS_INLINE void normalize(const float* s, float mu, float rs, const float* w, const float* b, T* y,
                                     int64_t n) {
  const f32x8 m = vsplat(mu), r = vsplat(rs);
  int64_t i = 0;
  for (; i + kVecLanes <= n; i += kVecLanes) vstore(y + i, (vload(s + i) - m) * r * vload(w + i) + vload(b + i));
  for (; i < n; ++i) sstore(y + i, layer_norm::forward_elem(s[i], mu, rs, w[i], b[i]));
}

// First backward pass over 8 elements (see bwd_sums).
template <bool kAcc>
FASTMAE_ALWAYS_INLINE void bwd_block(const float* s, const float* dy, const float* w, const f32x8& m, const f32x8& r,
                                     float* dwp, float* dbp, f32x8& a1, f32x8& a2) {
  const f32x8 xh = (vload(s) - m) * r, d = vload(dy), g = d * vload(w);
  a1 += xh * g;
  a2 += g;
  if (kAcc) {
    vstore(dwp, vload(dwp) + d * xh);
    vstore(dbp, vload(dbp) + d);
  }
}

// First backward pass: returns c1 * D = sum(xhat * g) and c2 * D = sum(g) (g = dy * w); with
// kAcc, dy * xhat and dy are added into the dW / dB partial rows.
template <bool kAcc>
FASTMAE_ALWAYS_INLINE void bwd_sums(const float* s, const float* dy, const float* w, float mu, float rs, float* dwp,
                                    float* dbp, int64_t n, float* sxg, float* sg) {
  Sum32 a1, a2;
  const f32x8 m = vsplat(mu), r = vsplat(rs);
  int64_t i = 0;
  for (; i + kSumLanes <= n; i += kSumLanes)
    for (int k = 0; k < 4; ++k) {
      const int64_t j = i + kVecLanes * k;
      bwd_block<kAcc>(s + j, dy + j, w + j, m, r, dwp + j, dbp + j, a1.lane[k], a2.lane[k]);
    }
  for (; i + kVecLanes <= n; i += kVecLanes)
    bwd_block<kAcc>(s + i, dy + i, w + i, m, r, dwp + i, dbp + i, a1.lane[0], a2.lane[0]);
  float t1 = 0.0f, t2 = 0.0f;
  for (; i < n; ++i) {
    const float d = dy[i], xh = (s[i] - mu) * rs, g = d * w[i];
    t1 += xh * g;
    t2 += g;
    if (kAcc) {
      dwp[i] += d * xh;
      dbp[i] += d;
    }
  }
  *sxg = a1.total() + t1;
  *sg = a2.total() + t2;
}

// Second backward pass: dx = (g - xhat * c1 - c2) * rstd (+ ds) (layer_norm::backward_elem).
template <bool kDs>
FASTMAE_ALWAYS_INLINE void bwd_dx(const float* s, const float* dy, const float* ds, const float* w, float mu, float rs,
                                  float c1, float c2, float* dx, int64_t n) {
  const f32x8 m = vsplat(mu), r = vsplat(rs), k1 = vsplat(c1), k2 = vsplat(c2);
  int64_t i = 0;
  for (; i + kVecLanes <= n; i += kVecLanes) {
    const f32x8 xh = (vload(s + i) - m) * r;
    const f32x8 d = kDs ? vload(ds + i) : f32x8{};  // + 0 without ds, as the scalar tail (and CUDA): -0 -> +0
    vstore(dx + i, (vload(dy + i) * vload(w + i) - xh * k1 - k2) * r + d);
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

// One row whose x, residual (when given), s and y are all stored in T (fp32 or bf16): loaded
// and stored in registers. buf: D floats (the rounded s, or x, in fp32 for T = bf16).
template <class T>
FASTMAE_ALWAYS_INLINE void fwd_row_same(const FwdArgs& a, int64_t r, float* buf) {
  const int64_t D = a.D;
  const T* x = reinterpret_cast<const T*>(a.x) + r * D;
  const float* sf;  // the normalised row, fp32
  float total;
  if (a.res != nullptr) {
    T* s = reinterpret_cast<T*>(a.s) + r * D;
    float* so;
    if constexpr (std::is_same_v<T, float>)
      so = s;
    else
      so = buf;
    total = add_store_sum(x, reinterpret_cast<const T*>(a.res) + r * D, s, so, D);
    sf = so;
  } else {
    if constexpr (std::is_same_v<T, float>) {
      sf = x;
    } else {
      widen(x, buf, D);
      sf = buf;
    }
    total = row_sum(sf, D);
  }
  const float mu = total / static_cast<float>(D);
  const float rs = layer_norm::rstd_from(centred_sumsq(sf, mu, D), D, a.eps);
  normalize(sf, mu, rs, a.w, a.b, reinterpret_cast<T*>(a.y) + r * D, D);
  a.mean[r] = mu;
  a.rstd[r] = rs;
}

// One row of any other dtype mix, through fp32 row buffers (buf0..buf2: D floats each).
FASTMAE_ALWAYS_INLINE void fwd_row_mixed(const FwdArgs& a, int64_t r, float* buf0, float* buf1, float* buf2) {
  const int64_t D = a.D;
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
      total = add_store_sum(xf, rf, so, so, D);
      sf = so;
    } else {
      // normalise the stored (rounded) s, which is what the backward reads
      add_rows(xf, rf, buf2, D);
      store_row(buf2, a.st, srow, D);
      load_row(srow, a.st, buf2, D);
      sf = buf2;
      total = row_sum(sf, D);
    }
  } else {
    total = row_sum(sf, D);
  }
  const float mu = total / static_cast<float>(D);
  const float rs = layer_norm::rstd_from(centred_sumsq(sf, mu, D), D, a.eps);
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

// Rows [r0, r1); buf0..buf2: D floats each.
FASTMAE_ALWAYS_INLINE void fwd_rows_body(const FwdArgs& a, int64_t r0, int64_t r1, float* buf0, float* buf1,
                                         float* buf2) {
  const bool same = a.yt == a.xt && (a.res == nullptr || (a.rt == a.xt && a.st == a.xt));
  if (same && a.xt == at::kFloat) {
    for (int64_t r = r0; r < r1; ++r) fwd_row_same<float>(a, r, buf0);
  } else if (same && a.xt == at::kBFloat16) {
    for (int64_t r = r0; r < r1; ++r) fwd_row_same<bf16>(a, r, buf0);
  } else {
    for (int64_t r = r0; r < r1; ++r) fwd_row_mixed(a, r, buf0, buf1, buf2);
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

// One row: fp32 rows in place, fp16 / bf16 through fp32 row buffers (buf0..buf3: D floats
// each). (Converting bf16 in registers instead, as the forward does, loads and widens s and dy
// twice: measured slower here.)
template <bool kDs, bool kAcc>
FASTMAE_ALWAYS_INLINE void bwd_row(const BwdArgs& a, int64_t r, float* dwp, float* dbp, float* buf0, float* buf1,
                                   float* buf2, float* buf3) {
  const int64_t D = a.D;
  const float* sf = as_f32(a.s + r * D * a.se, a.st, buf0, D);
  const float* dyf = as_f32(a.dy + r * D * a.dye, a.dyt, buf1, D);
  const float* dsf = kDs ? as_f32(a.ds + r * D * a.dse, a.dst, buf2, D) : nullptr;
  const float mu = a.mean[r], rs = a.rstd[r], invD = 1.0f / static_cast<float>(D);
  float sxg, sg;
  bwd_sums<kAcc>(sf, dyf, a.w, mu, rs, dwp, dbp, D, &sxg, &sg);
  char* dxrow = a.dx + r * D * a.dxe;
  float* dxf = a.dxt == at::kFloat ? reinterpret_cast<float*>(dxrow) : buf3;
  bwd_dx<kDs>(sf, dyf, dsf, a.w, mu, rs, sxg * invD, sg * invD, dxf, D);
  if (a.dxt != at::kFloat) store_row(dxf, a.dxt, dxrow, D);
  if (a.dres != nullptr) store_row(dxf, a.drt, a.dres + r * D * a.dre, D);
}

// Blocks [b0, b1); buf0..buf3: D floats each.
template <bool kDs, bool kAcc>
FASTMAE_ALWAYS_INLINE void bwd_blocks_body(const BwdArgs& a, int64_t b0, int64_t b1, float* buf0, float* buf1,
                                           float* buf2, float* buf3) {
  const int64_t D = a.D;
  for (int64_t blk = b0; blk < b1; ++blk) {
    float* dwp = a.part + blk * 2 * D;
    float* dbp = dwp + D;
    if (kAcc)
      for (int64_t i = 0; i < 2 * D; ++i) dwp[i] = 0.0f;
    const int64_t r_end = std::min(a.rows, (blk + 1) * kRowsPerPartial);
    for (int64_t r = blk * kRowsPerPartial; r < r_end; ++r) bwd_row<kDs, kAcc>(a, r, dwp, dbp, buf0, buf1, buf2, buf3);
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
  layer_norm::check_fwd_dtypes(x, residual_, weight, bias, out_dtype, residual_dtype);
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
  layer_norm::check_bwd_dtypes(dy, ds_, s, weight, bias, x_dtype, residual_dtype);
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
