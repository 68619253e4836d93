// CPU twin of softmax attention (math and index helpers in ../attention.h).
//
// at::parallel_for over the B * H (batch, head) pairs, one pair per task, no state shared
// between tasks (deterministic). A pair's q, k, v rows are gathered once (through their
// strides, index math from attention.h) into fp32 buffers, k and v also transposed
// (D x Np, Np = N padded to a multiple of 8 with zero columns), so that every product below
// is C = A B with B's rows contiguous:
//
//   mm(M, Nc, K): register-blocked micro-tiles of 6 rows x 16 (or 8) columns, 12 (6) vector
//   accumulators kept in registers over the whole K loop, one broadcast of A and two loads
//   of B per 12 FMAs; A is read through (row, k) strides, so P^T and dS^T need no copy.
//
// Forward, per strip of 6 query rows: S = q k^T (6 x Np), t = scale S, m = max t,
// P = exp(t - m) / l with l = sum exp(t - m) (an fp32 exp of our own that vectorises, below),
// lse = m + log l, O = P v. Backward, per pair: S = q k^T and P as in the forward (bit for
// bit; the saved lse is not read, see softmax_body), dP = dO v^T, delta = rowsum(P * dP) in
// double (equal to rowsum(dO * O) in exact math, and as accurate as PyTorch's own softmax
// backward where P is nearly one-hot, see attention_bwd_cpu), dS = scale P (dP - delta),
// dV = P^T dO, dK = dS^T q, dQ = dS k, all in fp32 before one rounding to the input dtype. Any N (the N <= 256 limit of backend "ext" is the CUDA
// kernels' and is checked in Python).
//
// The hot loops (mm, the softmax rows) are written once on GCC vector types of 8 floats and
// compiled twice (FASTMAE_TARGET_AVX2 in ../../common.h): for AVX2 + FMA, chosen at run time,
// and for the baseline target (SSE2 on x86-64, NEON on aarch64), where the compiler splits
// each 8-float operation in two.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "../attention.h"
#include "rowio.h"  // fp32 <-> storage dtype conversions

namespace fastmae {
namespace {

using namespace fastmae::cpu;
using attention::Strides4;

// ----------------------------------------------------------------------------- vector helpers
// No function takes or returns an f8 by value (GCC warns that the baseline target passes
// 32-byte vectors differently): vectors are passed by reference, scalars broadcast by f8{} + x.
typedef float f8 __attribute__((vector_size(32)));
typedef int32_t i8 __attribute__((vector_size(32)));
constexpr int kW = 8;    // floats in an f8
constexpr int kMR = 6;   // rows of a micro-tile (AVX2), and of a forward strip
constexpr int kNR = 16;  // columns of a full micro-tile (2 f8)

int64_t pad8(int64_t n) { return (n + kW - 1) / kW * kW; }

FASTMAE_ALWAYS_INLINE void loadu(f8& v, const float* p) { std::memcpy(&v, p, sizeof v); }
FASTMAE_ALWAYS_INLINE void storeu(float* p, const f8& v) { std::memcpy(p, &v, sizeof v); }
FASTMAE_ALWAYS_INLINE float hsum(const f8& v) {
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}
FASTMAE_ALWAYS_INLINE float hmax(const f8& v) {
  float m = v[0];
  for (int i = 1; i < kW; ++i) m = v[i] > m ? v[i] : m;
  return m;
}

// exp(x) in fp32 (Cephes' expf): x = n ln2 + r, |r| <= ln2 / 2, e^r by a degree-7 polynomial,
// 2^n by the exponent bits; about 1 ulp. x below ln(FLT_MIN) gives 0 (so -inf gives 0; the
// true value is below 1.2e-38), x above 88 is clamped (softmax only takes x <= 0 here).
FASTMAE_ALWAYS_INLINE void exp8(f8& x) {
  const f8 lo = f8{} + -87.33654f, hi = f8{} + 88.0f;
  f8 xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const f8 n = (xc * 1.44269504088896341f + magic) - magic;
  f8 r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  f8 p = f8{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const f8 y = p * (r * r) + r + 1.0f;
  const i8 e = (__builtin_convertvector(n, i8) + 127) << 23;
  const f8 out = y * (f8)e;  // (f8)e: the bits of 2^n
  x = x < lo ? f8{} : out;
}

// ----------------------------------------------------------------------------- C = A B
// One MR x (NV * 8) tile of C (ldc) = A (MR x K, element (r, k) at A[r * ars + k * aks]) times
// B (K x NV * 8, rows ldb apart).
template <int MR, int NV>
FASTMAE_ALWAYS_INLINE void tile(int64_t K, const float* A, int64_t ars, int64_t aks, const float* B, int64_t ldb,
                                float* C, int64_t ldc) {
  f8 c[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) c[r][v] = f8{};
  for (int64_t k = 0; k < K; ++k) {
    const float* a = A + k * aks;
    const float* b = B + k * ldb;
    f8 bv[NV];
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) loadu(bv[v], b + v * kW);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const float ar = a[r * ars];  // broadcast by the vector * scalar product
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) c[r][v] += bv[v] * ar;
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) storeu(C + r * ldc + v * kW, c[r][v]);
}

template <int NV, int MR>
FASTMAE_ALWAYS_INLINE void tile_rows(int64_t mr, int64_t K, const float* A, int64_t ars, int64_t aks, const float* B,
                                     int64_t ldb, float* C, int64_t ldc) {
  if constexpr (MR > 1) {
    if (mr < MR) return tile_rows<NV, MR - 1>(mr, K, A, ars, aks, B, ldb, C, ldc);
  }
  tile<MR, NV>(K, A, ars, aks, B, ldb, C, ldc);
}

// C (M x Nc, ldc) = A (M x K, strides ars, aks) B (K x Nc, ldb); Nc a multiple of 8, tiles of
// up to MR rows (6 with AVX2's 16 vector registers; 3 on baseline x86-64, where an f8 takes
// two of its 16). Column blocks outside, row strips inside: a block's B panel stays in L1 over
// all strips.
template <int MR>
FASTMAE_ALWAYS_INLINE void mm_body(int64_t M, int64_t Nc, int64_t K, const float* A, int64_t ars, int64_t aks,
                                   const float* B, int64_t ldb, float* C, int64_t ldc) {
  for (int64_t c0 = 0; c0 < Nc; c0 += kNR) {
    const bool full = Nc - c0 >= kNR;
    for (int64_t r0 = 0; r0 < M; r0 += MR) {
      const int64_t mr = std::min<int64_t>(MR, M - r0);
      if (full)
        tile_rows<2, MR>(mr, K, A + r0 * ars, ars, aks, B + c0, ldb, C + r0 * ldc + c0, ldc);
      else
        tile_rows<1, MR>(mr, K, A + r0 * ars, ars, aks, B + c0, ldb, C + r0 * ldc + c0, ldc);
    }
  }
}

// ----------------------------------------------------------------------------- softmax rows
// Rows (mr x Np) of raw scores S in place: P = exp(t - m) / l with t = scale S, m = max t,
// l = sum exp(t - m), 0 in the pad columns; lse[r] = m + log l. The forward and the backward
// both call this on the same S (the same tiles, bit for bit), so the backward's P is the
// forward's exactly. (exp(t - lse) from the saved lse would add lse's fp32 rounding, a
// relative error of ulp(lse) in P: 3e-5 at logits of 400.)
FASTMAE_ALWAYS_INLINE void softmax_body(float* s, int64_t mr, int64_t N, int64_t Np, float scale, float* lse) {
  for (int64_t r = 0; r < mr; ++r) {
    float* row = s + r * Np;
    f8 x, m8 = f8{} - std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < Np; j += kW) {  // t = scale S, -inf in the pad columns, and max t
      loadu(x, row + j);
      x *= scale;
      storeu(row + j, x);
      if (j + kW > N) {
        for (int64_t c = N; c < Np; ++c) row[c] = -std::numeric_limits<float>::infinity();
        loadu(x, row + j);
      }
      m8 = x > m8 ? x : m8;
    }
    const float m = hmax(m8);
    f8 l8 = f8{};
    for (int64_t j = 0; j < Np; j += kW) {
      loadu(x, row + j);
      x -= m;
      exp8(x);
      storeu(row + j, x);
      l8 += x;
    }
    const float l = hsum(l8), inv = 1.0f / l;
    for (int64_t j = 0; j < Np; j += kW) {
      loadu(x, row + j);
      x *= inv;
      storeu(row + j, x);
    }
    lse[r] = attention::lse_from(m, l);
  }
}

// Backward, dP (N x Np) in place: dS = scale P (dP - delta).
FASTMAE_ALWAYS_INLINE void dscores_body(const float* p, float* dp, const float* delta, int64_t N, int64_t Np,
                                        float scale) {
  for (int64_t i = 0; i < N; ++i) {
    const float dl = delta[i];
    f8 pv, dv;
    for (int64_t j = 0; j < Np; j += kW) {
      const int64_t e = i * Np + j;
      loadu(pv, p + e);
      loadu(dv, dp + e);
      dv = scale * (pv * (dv - dl));
      storeu(dp + e, dv);
    }
  }
}

// The two compilations of each hot loop, and the run-time choice.
#define FASTMAE_ATTN_ENTRY(attr, suffix, MR)                                                                      \
  attr void mm_##suffix(int64_t M, int64_t Nc, int64_t K, const float* A, int64_t ars, int64_t aks,               \
                        const float* B, int64_t ldb, float* C, int64_t ldc) {                                    \
    mm_body<MR>(M, Nc, K, A, ars, aks, B, ldb, C, ldc);                                                           \
  }                                                                                                               \
  attr void softmax_##suffix(float* s, int64_t mr, int64_t N, int64_t Np, float scale, float* lse) {            \
    softmax_body(s, mr, N, Np, scale, lse);                                                                       \
  }                                                                                                               \
  attr void dscores_##suffix(const float* p, float* dp, const float* delta, int64_t N, int64_t Np, float scale) { \
    dscores_body(p, dp, delta, N, Np, scale);                                                                     \
  }
#if defined(__x86_64__)
constexpr int kMRBase = 3;
#else
constexpr int kMRBase = kMR;
#endif
FASTMAE_ATTN_ENTRY(FASTMAE_TARGET_AVX2, avx2, kMR)
FASTMAE_ATTN_ENTRY(, base, kMRBase)
#undef FASTMAE_ATTN_ENTRY

struct Kernels {
  decltype(&mm_base) mm;
  decltype(&softmax_base) softmax;
  decltype(&dscores_base) dscores;
};

// Chosen per call (common.h: the tests cap the level to run the baseline build too).
Kernels kernels() {
  return cpu_has_avx2_fma() ? Kernels{mm_avx2, softmax_avx2, dscores_avx2} : Kernels{mm_base, softmax_base, dscores_base};
}

// ----------------------------------------------------------------------------- gathers
Strides4 strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

// rows (N, D) of one (b, h) of t, as fp32, into dst (N x Dp), pad columns D..Dp zero.
void gather(const at::Tensor& t, int64_t b, int64_t h, int64_t N, int64_t D, int64_t Dp, float* dst) {
  const Strides4 s = strides_of(t);
  const char* base = byte_ptr(t);
  const int64_t es = t.element_size();
  const at::ScalarType st = t.scalar_type();
  for (int64_t n = 0; n < N; ++n) {
    const int64_t o = attention::offset(s, b, n, h, 0);
    float* row = dst + n * Dp;
    if (s.d == 1) {
      load_row(base + o * es, st, row, D);
    } else {
      for (int64_t d = 0; d < D; ++d) load_row(base + (o + d * s.d) * es, st, row + d, 1);
    }
    for (int64_t d = D; d < Dp; ++d) row[d] = 0.0f;
  }
}

// src (N x Dp) transposed into dst (Dp x Np), pad columns N..Np zero.
void transpose(const float* src, int64_t N, int64_t Dp, int64_t Np, float* dst) {
  for (int64_t d = 0; d < Dp; ++d) {
    float* row = dst + d * Np;
    for (int64_t n = 0; n < N; ++n) row[n] = src[n * Dp + d];
    for (int64_t n = N; n < Np; ++n) row[n] = 0.0f;
  }
}

// ----------------------------------------------------------------------------- ops
std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                     double scale_) {
  TORCH_CHECK(q.dim() == 4 && q.sizes() == k.sizes() && q.sizes() == v.sizes(), "attention_fwd: q, k, v (B, N, H, D)");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), "attention_fwd: one dtype");
  const int64_t B = q.size(0), N = q.size(1), H = q.size(2), D = q.size(3);
  const int64_t Np = pad8(N), Dp = pad8(D);
  const float scale = static_cast<float>(scale_);
  at::Tensor out = empty_output({B, N, H, D}, q.options());
  at::Tensor lse = empty_output({B, H, N}, q.options().dtype(at::kFloat));
  const at::ScalarType ot = q.scalar_type();
  const int64_t oe = out.element_size();
  char* op = byte_ptr_mut(out);
  float* lp = lse.mutable_data_ptr<float>();
  const Kernels kn = kernels();
  at::parallel_for(0, B * H, 1, [&](int64_t p0, int64_t p1) {
    std::vector<float> qb(N * Dp), kb(N * Dp), kt(Dp * Np), vb(N * Dp), s(kMR * Np), o(kMR * Dp);
    for (int64_t pair = p0; pair < p1; ++pair) {
      const int64_t b = pair / H, h = pair % H;
      gather(q, b, h, N, D, Dp, qb.data());
      gather(k, b, h, N, D, Dp, kb.data());
      transpose(kb.data(), N, Dp, Np, kt.data());
      gather(v, b, h, N, D, Dp, vb.data());
      float* lrow = lp + attention::lse_offset(b, h, 0, H, N);
      for (int64_t i0 = 0; i0 < N; i0 += kMR) {
        const int64_t mr = std::min<int64_t>(kMR, N - i0);
        kn.mm(mr, Np, Dp, qb.data() + i0 * Dp, Dp, 1, kt.data(), Np, s.data(), Np);  // S = q k^T
        kn.softmax(s.data(), mr, N, Np, scale, lrow + i0);                            // P, lse
        kn.mm(mr, Dp, N, s.data(), Np, 1, vb.data(), Dp, o.data(), Dp);              // O = P v
        for (int64_t r = 0; r < mr; ++r)
          store_row(o.data() + r * Dp, ot, op + attention::out_offset(b, i0 + r, h, 0, N, H, D) * oe, D);
      }
    }
  });
  return {out, lse};
}

at::Tensor attention_bwd_cpu(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const at::Tensor& out, const at::Tensor& lse_, double scale_) {
  TORCH_CHECK(q.dim() == 4 && q.sizes() == k.sizes() && q.sizes() == v.sizes() && dout.sizes() == q.sizes() &&
                  out.sizes() == q.sizes(),
              "attention_bwd: dout, q, k, v, out (B, N, H, D)");
  const int64_t B = q.size(0), N = q.size(1), H = q.size(2), D = q.size(3);
  // lse (the forward's) is not read: the softmax is recomputed from S, see softmax_body
  TORCH_CHECK(lse_.dim() == 3 && lse_.size(0) == B && lse_.size(1) == H && lse_.size(2) == N,
              "attention_bwd: lse (B, H, N)");
  const int64_t Np = pad8(N), Dp = pad8(D);
  const float scale = static_cast<float>(scale_);
  at::Tensor dqkv = empty_output({B, N, 3, H, D}, q.options());
  const at::ScalarType gt = q.scalar_type();
  const int64_t ge = dqkv.element_size();
  char* gp = byte_ptr_mut(dqkv);
  const Kernels kn = kernels();
  at::parallel_for(0, B * H, 1, [&](int64_t p0, int64_t p1) {
    std::vector<float> qb(N * Dp), kb(N * Dp), kt(Dp * Np), vb(N * Dp), vt(Dp * Np), dob(N * Dp);
    std::vector<float> delta(N), lse(N), p(N * Np), ds(N * Np), dq(N * Dp), dk(N * Dp), dv(N * Dp);
    for (int64_t pair = p0; pair < p1; ++pair) {
      const int64_t b = pair / H, h = pair % H;
      gather(q, b, h, N, D, Dp, qb.data());
      gather(k, b, h, N, D, Dp, kb.data());
      transpose(kb.data(), N, Dp, Np, kt.data());
      gather(v, b, h, N, D, Dp, vb.data());
      transpose(vb.data(), N, Dp, Np, vt.data());
      gather(dout, b, h, N, D, Dp, dob.data());
      kn.mm(N, Np, Dp, qb.data(), Dp, 1, kt.data(), Np, p.data(), Np);    // S = q k^T
      kn.softmax(p.data(), N, N, Np, scale, lse.data());                   // P, as in the forward
      kn.mm(N, Np, Dp, dob.data(), Dp, 1, vt.data(), Np, ds.data(), Np);  // dP = dO v^T
      // delta_i = sum_j P_ij dP_ij (= sum_d dO_id O_id, attention.h), in double over the row
      // this twin holds whole: where P is nearly one-hot, dP - delta cancels, and the dO . O
      // form would add the rounding of O and a sum over D of terms far larger than the result
      for (int64_t i = 0; i < N; ++i) {
        double acc = 0.0;
        for (int64_t j = 0; j < N; ++j) acc += static_cast<double>(p[i * Np + j]) * ds[i * Np + j];
        delta[i] = static_cast<float>(acc);
      }
      kn.dscores(p.data(), ds.data(), delta.data(), N, Np, scale);         // dS = scale P (dP - delta)
      kn.mm(N, Dp, N, p.data(), 1, Np, dob.data(), Dp, dv.data(), Dp);    // dV = P^T dO
      kn.mm(N, Dp, N, ds.data(), 1, Np, qb.data(), Dp, dk.data(), Dp);    // dK = dS^T q
      kn.mm(N, Dp, N, ds.data(), Np, 1, kb.data(), Dp, dq.data(), Dp);    // dQ = dS k
      for (int64_t i = 0; i < N; ++i) {
        store_row(dq.data() + i * Dp, gt, gp + attention::dqkv_offset(b, i, 0, h, 0, N, H, D) * ge, D);
        store_row(dk.data() + i * Dp, gt, gp + attention::dqkv_offset(b, i, 1, h, 0, N, H, D) * ge, D);
        store_row(dv.data() + i * Dp, gt, gp + attention::dqkv_offset(b, i, 2, h, 0, N, H, D) * ge, D);
      }
    }
  });
  return dqkv;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmae_ext, CPU, m) {
  m.impl("attention_fwd", &attention_fwd_cpu);
  m.impl("attention_bwd", &attention_bwd_cpu);
}

}  // namespace fastmae
