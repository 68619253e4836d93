// CPU twin of softmax attention (math and index helpers in ../attention.h).
//
// at::parallel_for over the B * H (batch, head) pairs. A pair's q, k, v rows are gathered
// once (through their strides, index math from attention.h) into fp32 buffers, k and v also
// transposed (D x N), so that every inner loop runs over a contiguous axis and vectorises:
// S = scale q k^T row by row, an exact two-pass softmax per row (max, then sum of exp),
// lse = max + log(sum), O = P v. The backward recomputes P from lse, delta = rowsum(dO * O),
// dP = dO v^T, dS = P * (dP - delta), and accumulates dQ = scale dS k, dK = scale dS^T q,
// dV = P^T dO in fp32 before one rounding to the input dtype. Any N (the N <= 256 limit of
// backend "ext" is the CUDA kernels' and is checked in Python).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "../attention.h"
#include "layer_norm_kernel_rowio.h"  // fp32 <-> storage dtype conversions

namespace fastmae {
namespace {

using namespace fastmae::cpu;
using attention::Strides4;

Strides4 strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

// rows (N, D) of one (b, h) of t, as fp32, into dst (N * D); and optionally transposed (D * N).
void gather(const at::Tensor& t, int64_t b, int64_t h, int64_t N, int64_t D, float* dst, float* dst_t) {
  const Strides4 s = strides_of(t);
  const char* base = byte_ptr(t);
  const int64_t es = t.element_size();
  const at::ScalarType st = t.scalar_type();
  for (int64_t n = 0; n < N; ++n) {
    const int64_t o = attention::offset(s, b, n, h, 0);
    if (s.d == 1) {
      load_row(base + o * es, st, dst + n * D, D);
    } else {
      for (int64_t d = 0; d < D; ++d) load_row(base + (o + d * s.d) * es, st, dst + n * D + d, 1);
    }
  }
  if (dst_t != nullptr)
    for (int64_t n = 0; n < N; ++n)
      for (int64_t d = 0; d < D; ++d) dst_t[d * N + n] = dst[n * D + d];
}

// P (N x N) = softmax rows of scale * q k^T; returns lse per row into lse (N).
FASTMAE_CPU_CLONES void scores(const float* q, const float* kt, int64_t N, int64_t D, float scale, float* p, float* lse) {
  for (int64_t i = 0; i < N; ++i) {
    float* row = p + i * N;
    for (int64_t j = 0; j < N; ++j) row[j] = 0.0f;
    for (int64_t d = 0; d < D; ++d) {
      const float qd = q[i * D + d] * scale;
      const float* kr = kt + d * N;
      for (int64_t j = 0; j < N; ++j) row[j] += qd * kr[j];
    }
    float m = row[0];
    for (int64_t j = 1; j < N; ++j) m = row[j] > m ? row[j] : m;
    float l = 0.0f;
    for (int64_t j = 0; j < N; ++j) {
      row[j] = std::exp(row[j] - m);
      l += row[j];
    }
    const float inv = 1.0f / l;
    for (int64_t j = 0; j < N; ++j) row[j] *= inv;
    lse[i] = attention::lse_from(m, l);
  }
}

// o (D) = p (N) v (N x D).
FASTMAE_CPU_CLONES void pv_row(const float* p, const float* v, int64_t N, int64_t D, float* o) {
  for (int64_t d = 0; d < D; ++d) o[d] = 0.0f;
  for (int64_t j = 0; j < N; ++j) {
    const float pj = p[j];
    const float* vr = v + j * D;
    for (int64_t d = 0; d < D; ++d) o[d] += pj * vr[d];
  }
}

// One query row i of the backward: dq (D) and the row's contributions to dk, dv (N x D).
FASTMAE_CPU_CLONES void bwd_row(const float* qi, const float* doi, const float* oi, const float* kb, const float* kt,
                                const float* vt, float lse, float scale, int64_t N, int64_t D, float* p, float* dp,
                                float* dq, float* dk, float* dv) {
  float delta = 0.0f;
  for (int64_t d = 0; d < D; ++d) delta += doi[d] * oi[d];
  for (int64_t j = 0; j < N; ++j) p[j] = dp[j] = 0.0f;
  for (int64_t d = 0; d < D; ++d) {
    const float qd = qi[d] * scale, dod = doi[d];
    const float* kr = kt + d * N;
    const float* vr = vt + d * N;
    for (int64_t j = 0; j < N; ++j) {
      p[j] += qd * kr[j];
      dp[j] += dod * vr[j];
    }
  }
  for (int64_t j = 0; j < N; ++j) p[j] = std::exp(p[j] - lse);
  for (int64_t d = 0; d < D; ++d) dq[d] = 0.0f;
  for (int64_t j = 0; j < N; ++j) {
    const float pij = p[j];
    const float ds = attention::dscore(pij, dp[j], delta) * scale;
    const float* kj = kb + j * D;
    float* dkj = dk + j * D;
    float* dvj = dv + j * D;
    for (int64_t d = 0; d < D; ++d) {
      dq[d] += ds * kj[d];
      dkj[d] += ds * qi[d];
      dvj[d] += pij * doi[d];
    }
  }
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                     double scale_) {
  TORCH_CHECK(q.dim() == 4 && q.sizes() == k.sizes() && q.sizes() == v.sizes(), "attention_fwd: q, k, v (B, N, H, D)");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), "attention_fwd: one dtype");
  const int64_t B = q.size(0), N = q.size(1), H = q.size(2), D = q.size(3);
  const float scale = static_cast<float>(scale_);
  at::Tensor out = empty_output({B, N, H, D}, q.options());
  at::Tensor lse = empty_output({B, H, N}, q.options().dtype(at::kFloat));
  const at::ScalarType ot = q.scalar_type();
  const int64_t oe = out.element_size();
  char* op = byte_ptr_mut(out);
  float* lp = lse.mutable_data_ptr<float>();
  at::parallel_for(0, B * H, 1, [&](int64_t p0, int64_t p1) {
    std::vector<float> qb(N * D), kb(N * D), kt(D * N), vb(N * D), p(N * N), o(D);
    for (int64_t pair = p0; pair < p1; ++pair) {
      const int64_t b = pair / H, h = pair % H;
      gather(q, b, h, N, D, qb.data(), nullptr);
      gather(k, b, h, N, D, kb.data(), kt.data());
      gather(v, b, h, N, D, vb.data(), nullptr);
      scores(qb.data(), kt.data(), N, D, scale, p.data(), lp + attention::lse_offset(b, h, 0, H, N));
      for (int64_t i = 0; i < N; ++i) {
        pv_row(p.data() + i * N, vb.data(), N, D, o.data());
        store_row(o.data(), ot, op + attention::out_offset(b, i, h, 0, N, H, D) * oe, D);
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
  const at::Tensor lse = lse_.contiguous().to(at::kFloat);
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == B && lse.size(1) == H && lse.size(2) == N, "attention_bwd: lse (B, H, N)");
  const float scale = static_cast<float>(scale_);
  at::Tensor dqkv = empty_output({B, N, 3, H, D}, q.options());
  const at::ScalarType gt = q.scalar_type();
  const int64_t ge = dqkv.element_size();
  char* gp = byte_ptr_mut(dqkv);
  const float* lp = lse.const_data_ptr<float>();
  at::parallel_for(0, B * H, 1, [&](int64_t p0, int64_t p1) {
    std::vector<float> qb(N * D), kb(N * D), kt(D * N), vb(N * D), vt(D * N), ob(N * D), dob(N * D);
    std::vector<float> p(N), dp(N), dq(D), dk(N * D), dv(N * D);
    for (int64_t pair = p0; pair < p1; ++pair) {
      const int64_t b = pair / H, h = pair % H;
      gather(q, b, h, N, D, qb.data(), nullptr);
      gather(k, b, h, N, D, kb.data(), kt.data());
      gather(v, b, h, N, D, vb.data(), vt.data());
      gather(out, b, h, N, D, ob.data(), nullptr);
      gather(dout, b, h, N, D, dob.data(), nullptr);
      const float* lrow = lp + attention::lse_offset(b, h, 0, H, N);
      for (int64_t e = 0; e < N * D; ++e) dk[e] = dv[e] = 0.0f;
      for (int64_t i = 0; i < N; ++i) {
        bwd_row(qb.data() + i * D, dob.data() + i * D, ob.data() + i * D, kb.data(), kt.data(), vt.data(), lrow[i],
                scale, N, D, p.data(), dp.data(), dq.data(), dk.data(), dv.data());
        store_row(dq.data(), gt, gp + attention::dqkv_offset(b, i, 0, h, 0, N, H, D) * ge, D);
      }
      for (int64_t j = 0; j < N; ++j) {
        store_row(dk.data() + j * D, gt, gp + attention::dqkv_offset(b, j, 1, h, 0, N, H, D) * ge, D);
        store_row(dv.data() + j * D, gt, gp + attention::dqkv_offset(b, j, 2, h, 0, N, H, D) * ge, D);
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
