// CUDA kernels of softmax attention for MAE's short sequences (N <= 256; math and index
// helpers in ../attention.h).
//
// fp16 / bf16: tensor cores through mma.sync.m16n8k16 (fp32 accumulate), one (batch, head)
// pair's whole K and V in shared memory (no padding of D = 80 to 128: D is a template
// parameter, 32, 64, 80 or 128, a multiple of the 16-wide k-step).
//   Fragment layout (PTX ISA, m16n8k16 .f16/.bf16), lane = 4 g + t:
//     A (16 x 16, row): {a0, a1, a2, a3} = rows (g, g + 8, g, g + 8), columns 2t, 2t + 1 (+ 8 for a2, a3)
//     B (16 x 8, col):  {b0, b1} = rows (k) 2t, 2t + 1 (+ 8 for b1), column g
//     C (16 x 8, fp32): {c0, c1} row g, {c2, c3} row g + 8, columns 2t, 2t + 1
//   so the C fragments of two adjacent 8-key score tiles are, once rounded and packed,
//   exactly the A fragment of P for the next product (FlashAttention-2's register reuse).
// Forward (attn_fwd_mma): a block of 4 warps owns pairs_per_block pairs; K (N x D, rows
//   padded to D + 8 halves: conflict-free fragment loads) and V transposed (D x N) in shared
//   memory, zero beyond N. Each warp takes 16-row query strips; a strip's q fragments stay in
//   registers; it walks the keys 16 at a time with an online softmax (running max and sum in
//   base 2, rows g and g + 8 of each lane, reduced over the 4 lanes of a quad), P V into fp32
//   accumulators, then O = acc / l and lse = (m + log2 l) ln 2.
// Backward (attn_bwd_mma), one pair per block, two phases on one shared buffer, no atomics:
//   prologue: delta = rowsum(dO * O) and lse * log2(e) per query row into shared memory;
//   phase 1, q and dO rows in shared memory: each warp owns 16-key strips and walks all
//     queries: S^T = K q^T, dP^T = V dO^T, P^T, dS^T = P^T (dP^T - delta); dV += P^T dO,
//     dK += dS^T q in registers; dK, dV written once per strip;
//   phase 2, K and V rows in shared memory: each warp owns 16-query strips and walks all
//     keys: S, dP, dS again; dQ += dS K; written once per strip.
//   The scores are computed twice (once per phase): the price of deterministic dQ without a
//   cross-warp reduction.
// Fragments read from global memory (q, and K, V, dO in the backward) are 32-bit loads of two
//   adjacent d from two row pointers a lane (load_a_rows): the host passes d-contiguous tensors
//   with even strides (pairs_ready copies any other layout). Per-element 64-bit addresses were
//   what pushed the backward to 255 registers and spills at D = 64 and 80.
// fp32: a SIMT path (attn_fwd_simt, attn_bwd_*_simt): one warp per query (or key) row, lanes
//   over D, warp-shuffle dot products, online softmax, the same math in fp32 (no TF32).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <cstdint>

#include "../attention.h"
#include "smem.cuh"

namespace fastmae {
namespace {

using attention::Strides4;
constexpr int kWarps = 4;
constexpr float kLn2 = 0.6931471805599453f;

template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

__device__ __forceinline__ uint32_t pack_raw(uint16_t lo, uint16_t hi) {
  return static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
}

template <typename T>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma16816<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(FASTMAE_CUDA_EMU)  // the CPU emulation of tests/_cuda_emu
  ::emu::mma_m16n8k16(false, c, a, b0, b1);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}
template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                        uint32_t b1) {
#if defined(FASTMAE_CUDA_EMU)  // the CPU emulation of tests/_cuda_emu
  ::emu::mma_m16n8k16(true, c, a, b0, b1);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ uint32_t u32_at(const uint16_t* p) { return *reinterpret_cast<const uint32_t*>(p); }

// The raw 16-bit element (b, n, h, d) of a (B, N, H, D) tensor, 0 beyond N.
__device__ __forceinline__ uint16_t ld_raw(const uint16_t* p, const Strides4& s, int b, int n, int h, int d, int N) {
  return n < N ? p[attention::offset(s, b, n, h, d)] : static_cast<uint16_t>(0);
}

// A fragments (16 rows from row0, all of D in D/16 k-steps) of a (B, N, H, D) tensor in global
// memory whose d stride is 1 and whose other strides and base are even (pairs_ready on the
// host): each fragment register is one 32-bit load of 2 adjacent d, at an immediate offset
// from one of the lane's two row pointers (few live registers: the backward is at the limit).
template <int D>
__device__ __forceinline__ void load_a_rows(const uint16_t* p, const Strides4& s, int b, int h, int row0, int N,
                                            uint32_t (&a)[D / 16][4]) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int r0 = row0 + g, r1 = row0 + g + 8;
  const bool ok0 = r0 < N, ok1 = r1 < N;
  const uint16_t* p0 = p + attention::offset(s, b, ok0 ? r0 : 0, h, 2 * t);
  const uint16_t* p1 = p + attention::offset(s, b, ok1 ? r1 : 0, h, 2 * t);
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    a[kk][0] = ok0 ? u32_at(p0 + kk * 16) : 0u;
    a[kk][1] = ok1 ? u32_at(p1 + kk * 16) : 0u;
    a[kk][2] = ok0 ? u32_at(p0 + kk * 16 + 8) : 0u;
    a[kk][3] = ok1 ? u32_at(p1 + kk * 16 + 8) : 0u;
  }
}

// Rows [0, NP) of one pair of a (B, N, H, D) tensor into shared memory, row-major with row
// stride D + 8 (or, transposed, D rows of stride NP + 8); zeros beyond N.
template <int D>
__device__ void stage_rows(const uint16_t* p, const Strides4& s, int b, int h, int N, int NP, uint16_t* dst,
                           bool transposed) {
  for (int idx = threadIdx.x; idx < NP * D; idx += blockDim.x) {
    const int n = idx / D, d = idx - n * D;
    const uint16_t v = ld_raw(p, s, b, n, h, d, N);
    if (transposed) dst[d * (NP + 8) + n] = v;
    else dst[n * (D + 8) + d] = v;
  }
}

struct AttnArgs {
  const void* q; const void* k; const void* v; const void* o; const void* dout;
  Strides4 sq, sk, sv, so, sdo;
  void* out; float* lse; void* dqkv; float* delta;
  float* row_max; float* row_sum;  // the SIMT backward's softmax statistics per query row (B, H, N)
  int B, N, H;
  float scale;
};

// --------------------------------------------------------------------------- forward (mma)
template <typename T, int D>
__global__ void __launch_bounds__(kWarps * 32) attn_fwd_mma(AttnArgs a) {
  extern __shared__ __align__(16) uint16_t smem[];
  const int N = a.N, NP = attention::padded_len(N), strips = attention::num_strips(N);
  const int ppb = attention::pairs_per_block(N, kWarps);
  const int per_pair = NP * (D + 8) + D * (NP + 8);
  const int pair0 = blockIdx.x * ppb;
  const int npairs = min(ppb, a.B * a.H - pair0);
  const uint16_t* Q = static_cast<const uint16_t*>(a.q);
  const uint16_t* K = static_cast<const uint16_t*>(a.k);
  const uint16_t* V = static_cast<const uint16_t*>(a.v);
  for (int p = 0; p < npairs; ++p) {
    const int pair = pair0 + p, b = pair / a.H, h = pair % a.H;
    stage_rows<D>(K, a.sk, b, h, N, NP, smem + p * per_pair, false);
    stage_rows<D>(V, a.sv, b, h, N, NP, smem + p * per_pair + NP * (D + 8), true);
  }
  __syncthreads();
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const float qk_scale = a.scale * attention::kLog2e;
  for (int task = warp; task < npairs * strips; task += kWarps) {
    int p, strip;
    attention::task_of(task, strips, &p, &strip);
    const int pair = pair0 + p, b = pair / a.H, h = pair % a.H, row0 = strip * 16;
    const uint16_t* Ks = smem + p * per_pair;
    const uint16_t* Vt = Ks + NP * (D + 8);
    uint32_t qa[D / 16][4];
    load_a_rows<D>(Q, a.sq, b, h, row0, N, qa);
    float acc[D / 8][4];
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn) acc[dn][0] = acc[dn][1] = acc[dn][2] = acc[dn][3] = 0.0f;
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.0f, l1 = 0.0f;
#pragma unroll 1
    for (int j0 = 0; j0 < NP; j0 += 16) {
      float s[2][4];
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
        const uint16_t* kr = Ks + (j0 + nt * 8 + g) * (D + 8) + 2 * t;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) mma16816<T>(s[nt], qa[kk], u32_at(kr + kk * 16), u32_at(kr + kk * 16 + 8));
      }
      float cm0 = -INFINITY, cm1 = -INFINITY;
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int key = j0 + nt * 8 + 2 * t + (e & 1);
          s[nt][e] = key < N ? s[nt][e] * qk_scale : -INFINITY;
          if (e < 2) cm0 = fmaxf(cm0, s[nt][e]);
          else cm1 = fmaxf(cm1, s[nt][e]);
        }
      const float mn0 = fmaxf(m0, quad_max(cm0)), mn1 = fmaxf(m1, quad_max(cm1));  // finite: key j0 or an earlier one is real
      const float al0 = exp2f(m0 - mn0), al1 = exp2f(m1 - mn1);
      m0 = mn0;
      m1 = mn1;
      float ps0 = 0.0f, ps1 = 0.0f;
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        s[nt][0] = exp2f(s[nt][0] - m0);
        s[nt][1] = exp2f(s[nt][1] - m0);
        s[nt][2] = exp2f(s[nt][2] - m1);
        s[nt][3] = exp2f(s[nt][3] - m1);
        ps0 += s[nt][0] + s[nt][1];
        ps1 += s[nt][2] + s[nt][3];
      }
      l0 = l0 * al0 + ps0;
      l1 = l1 * al1 + ps1;
      const uint32_t pa[4] = {pack2<T>(s[0][0], s[0][1]), pack2<T>(s[0][2], s[0][3]), pack2<T>(s[1][0], s[1][1]),
                              pack2<T>(s[1][2], s[1][3])};
#pragma unroll
      for (int dn = 0; dn < D / 8; ++dn) {
        acc[dn][0] *= al0;
        acc[dn][1] *= al0;
        acc[dn][2] *= al1;
        acc[dn][3] *= al1;
        const uint16_t* vr = Vt + (dn * 8 + g) * (NP + 8) + j0 + 2 * t;
        mma16816<T>(acc[dn], pa, u32_at(vr), u32_at(vr + 8));
      }
    }
    l0 = quad_sum(l0);
    l1 = quad_sum(l1);
    const float inv0 = 1.0f / l0, inv1 = 1.0f / l1;
    const int r0 = row0 + g, r1 = row0 + g + 8;
    uint16_t* O = static_cast<uint16_t*>(a.out);
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn) {
      const int c = dn * 8 + 2 * t;
      if (r0 < N)
        *reinterpret_cast<uint32_t*>(O + attention::out_offset(b, r0, h, c, N, a.H, D)) =
            pack2<T>(acc[dn][0] * inv0, acc[dn][1] * inv0);
      if (r1 < N)
        *reinterpret_cast<uint32_t*>(O + attention::out_offset(b, r1, h, c, N, a.H, D)) =
            pack2<T>(acc[dn][2] * inv1, acc[dn][3] * inv1);
    }
    if (t == 0) {
      if (r0 < N) a.lse[attention::lse_offset(b, h, r0, a.H, N)] = (m0 + log2f(l0)) * kLn2;
      if (r1 < N) a.lse[attention::lse_offset(b, h, r1, a.H, N)] = (m1 + log2f(l1)) * kLn2;
    }
  }
}

// --------------------------------------------------------------------------- backward (mma)
template <typename T>
__device__ __forceinline__ float to_f(uint16_t raw);
template <>
__device__ __forceinline__ float to_f<__half>(uint16_t raw) { return __half2float(__ushort_as_half(raw)); }
template <>
__device__ __forceinline__ float to_f<__nv_bfloat16>(uint16_t raw) {
  return __bfloat162float(__ushort_as_bfloat16(raw));
}

template <typename T, int D>
__global__ void __launch_bounds__(kWarps * 32) attn_bwd_mma(AttnArgs a) {
  extern __shared__ __align__(16) uint16_t smem[];
  const int N = a.N, NP = attention::padded_len(N), strips = attention::num_strips(N);
  const int pair = blockIdx.x, b = pair / a.H, h = pair % a.H;
  uint16_t* X0 = smem;                   // phase 1: q rows;  phase 2: K rows
  uint16_t* X1 = smem + NP * (D + 8);    // phase 1: dO rows; phase 2: V rows
  float* lse2 = reinterpret_cast<float*>(smem + 2 * NP * (D + 8));
  float* delta = lse2 + NP;
  const uint16_t* Q = static_cast<const uint16_t*>(a.q);
  const uint16_t* K = static_cast<const uint16_t*>(a.k);
  const uint16_t* V = static_cast<const uint16_t*>(a.v);
  const uint16_t* O = static_cast<const uint16_t*>(a.o);
  const uint16_t* DO = static_cast<const uint16_t*>(a.dout);
  uint16_t* G = static_cast<uint16_t*>(a.dqkv);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;

  for (int i = warp; i < NP; i += kWarps) {
    float d = 0.0f;
    if (i < N)
      for (int c = lane; c < D; c += 32) d += to_f<T>(ld_raw(DO, a.sdo, b, i, h, c, N)) * to_f<T>(ld_raw(O, a.so, b, i, h, c, N));
    d = warp_sum(d);
    if (lane == 0) {
      delta[i] = d;
      lse2[i] = i < N ? a.lse[attention::lse_offset(b, h, i, a.H, N)] * attention::kLog2e : INFINITY;
    }
  }
  stage_rows<D>(Q, a.sq, b, h, N, NP, X0, false);
  stage_rows<D>(DO, a.sdo, b, h, N, NP, X1, false);
  __syncthreads();
  const float qk_scale = a.scale * attention::kLog2e;

  // Phase 1: dK, dV per 16-key strip.
  for (int strip = warp; strip < strips; strip += kWarps) {
    const int j0 = strip * 16;
    float dk[D / 8][4], dv[D / 8][4];
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn)
#pragma unroll
      for (int e = 0; e < 4; ++e) dk[dn][e] = dv[dn][e] = 0.0f;
    const bool key0 = j0 + g < N, key1 = j0 + g + 8 < N;
#pragma unroll 1
    for (int i0 = 0; i0 < NP; i0 += 16) {
      float st[2][4], dpt[2][4];
      {
        uint32_t ka[D / 16][4];
        load_a_rows<D>(K, a.sk, b, h, j0, N, ka);
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {
          st[nt][0] = st[nt][1] = st[nt][2] = st[nt][3] = 0.0f;
          const uint16_t* qr = X0 + (i0 + nt * 8 + g) * (D + 8) + 2 * t;
#pragma unroll
          for (int kk = 0; kk < D / 16; ++kk) mma16816<T>(st[nt], ka[kk], u32_at(qr + kk * 16), u32_at(qr + kk * 16 + 8));
        }
      }
      {
        uint32_t va[D / 16][4];
        load_a_rows<D>(V, a.sv, b, h, j0, N, va);
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {
          dpt[nt][0] = dpt[nt][1] = dpt[nt][2] = dpt[nt][3] = 0.0f;
          const uint16_t* dr = X1 + (i0 + nt * 8 + g) * (D + 8) + 2 * t;
#pragma unroll
          for (int kk = 0; kk < D / 16; ++kk) mma16816<T>(dpt[nt], va[kk], u32_at(dr + kk * 16), u32_at(dr + kk * 16 + 8));
        }
      }
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int qi = i0 + nt * 8 + 2 * t + (e & 1);
          const bool key_ok = e < 2 ? key0 : key1;
          const float p = key_ok ? exp2f(st[nt][e] * qk_scale - lse2[qi]) : 0.0f;
          st[nt][e] = p;
          dpt[nt][e] = attention::dscore(p, dpt[nt][e], delta[qi]);
        }
      const uint32_t pa[4] = {pack2<T>(st[0][0], st[0][1]), pack2<T>(st[0][2], st[0][3]), pack2<T>(st[1][0], st[1][1]),
                              pack2<T>(st[1][2], st[1][3])};
      const uint32_t sa[4] = {pack2<T>(dpt[0][0], dpt[0][1]), pack2<T>(dpt[0][2], dpt[0][3]),
                              pack2<T>(dpt[1][0], dpt[1][1]), pack2<T>(dpt[1][2], dpt[1][3])};
#pragma unroll
      for (int dn = 0; dn < D / 8; ++dn) {
        const int c = dn * 8 + g;
        const uint16_t* dr = X1 + (i0 + 2 * t) * (D + 8) + c;
        const uint16_t* qr = X0 + (i0 + 2 * t) * (D + 8) + c;
        mma16816<T>(dv[dn], pa, pack_raw(dr[0], dr[D + 8]), pack_raw(dr[8 * (D + 8)], dr[9 * (D + 8)]));
        mma16816<T>(dk[dn], sa, pack_raw(qr[0], qr[D + 8]), pack_raw(qr[8 * (D + 8)], qr[9 * (D + 8)]));
      }
    }
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn) {
      const int c = dn * 8 + 2 * t;
      if (key0) {
        *reinterpret_cast<uint32_t*>(G + attention::dqkv_offset_row(b * N + j0 + g, 1, h, c, a.H, D)) =
            pack2<T>(dk[dn][0] * a.scale, dk[dn][1] * a.scale);
        *reinterpret_cast<uint32_t*>(G + attention::dqkv_offset_row(b * N + j0 + g, 2, h, c, a.H, D)) =
            pack2<T>(dv[dn][0], dv[dn][1]);
      }
      if (key1) {
        *reinterpret_cast<uint32_t*>(G + attention::dqkv_offset_row(b * N + j0 + g + 8, 1, h, c, a.H, D)) =
            pack2<T>(dk[dn][2] * a.scale, dk[dn][3] * a.scale);
        *reinterpret_cast<uint32_t*>(G + attention::dqkv_offset_row(b * N + j0 + g + 8, 2, h, c, a.H, D)) =
            pack2<T>(dv[dn][2], dv[dn][3]);
      }
    }
  }
  __syncthreads();
  stage_rows<D>(K, a.sk, b, h, N, NP, X0, false);
  stage_rows<D>(V, a.sv, b, h, N, NP, X1, false);
  __syncthreads();

  // Phase 2: dQ per 16-query strip.
  for (int strip = warp; strip < strips; strip += kWarps) {
    const int i0 = strip * 16, r0 = i0 + g, r1 = i0 + g + 8;
    uint32_t qa[D / 16][4], da[D / 16][4];
    load_a_rows<D>(Q, a.sq, b, h, i0, N, qa);
    load_a_rows<D>(DO, a.sdo, b, h, i0, N, da);
    const float l0 = lse2[r0], l1 = lse2[r1], d0 = delta[r0], d1 = delta[r1];
    float dq[D / 8][4];
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn) dq[dn][0] = dq[dn][1] = dq[dn][2] = dq[dn][3] = 0.0f;
#pragma unroll 1
    for (int j0 = 0; j0 < NP; j0 += 16) {
      float s[2][4], dp[2][4];
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
        dp[nt][0] = dp[nt][1] = dp[nt][2] = dp[nt][3] = 0.0f;
        const uint16_t* kr = X0 + (j0 + nt * 8 + g) * (D + 8) + 2 * t;
        const uint16_t* vr = X1 + (j0 + nt * 8 + g) * (D + 8) + 2 * t;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
          mma16816<T>(s[nt], qa[kk], u32_at(kr + kk * 16), u32_at(kr + kk * 16 + 8));
          mma16816<T>(dp[nt], da[kk], u32_at(vr + kk * 16), u32_at(vr + kk * 16 + 8));
        }
      }
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int key = j0 + nt * 8 + 2 * t + (e & 1);
          const float p = key < N ? exp2f(s[nt][e] * qk_scale - (e < 2 ? l0 : l1)) : 0.0f;
          s[nt][e] = attention::dscore(p, dp[nt][e], e < 2 ? d0 : d1);
        }
      const uint32_t sa[4] = {pack2<T>(s[0][0], s[0][1]), pack2<T>(s[0][2], s[0][3]), pack2<T>(s[1][0], s[1][1]),
                              pack2<T>(s[1][2], s[1][3])};
#pragma unroll
      for (int dn = 0; dn < D / 8; ++dn) {
        const uint16_t* kr = X0 + (j0 + 2 * t) * (D + 8) + dn * 8 + g;
        mma16816<T>(dq[dn], sa, pack_raw(kr[0], kr[D + 8]), pack_raw(kr[8 * (D + 8)], kr[9 * (D + 8)]));
      }
    }
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn) {
      const int c = dn * 8 + 2 * t;
      if (r0 < N)
        *reinterpret_cast<uint32_t*>(G + attention::dqkv_offset_row(b * N + r0, 0, h, c, a.H, D)) =
            pack2<T>(dq[dn][0] * a.scale, dq[dn][1] * a.scale);
      if (r1 < N)
        *reinterpret_cast<uint32_t*>(G + attention::dqkv_offset_row(b * N + r1, 0, h, c, a.H, D)) =
            pack2<T>(dq[dn][2] * a.scale, dq[dn][3] * a.scale);
    }
  }
}

// --------------------------------------------------------------------------- fp32 (SIMT)
// One warp per row; lane l holds dims l, l + 32, ... (D <= 128: at most 4).
constexpr int kMaxPerLane = 4;

__device__ __forceinline__ void load_row_f(const float* p, const Strides4& s, int b, int n, int h, int D,
                                           float (&r)[kMaxPerLane]) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int c = 0; c < kMaxPerLane; ++c) {
    const int d = lane + 32 * c;
    r[c] = d < D ? p[attention::offset(s, b, n, h, d)] : 0.0f;
  }
}
__device__ __forceinline__ float dot_row(const float (&x)[kMaxPerLane], const float (&y)[kMaxPerLane]) {
  float v = 0.0f;
#pragma unroll
  for (int c = 0; c < kMaxPerLane; ++c) v += x[c] * y[c];
  return warp_sum(v);
}

__global__ void __launch_bounds__(kWarps * 32) attn_fwd_simt(AttnArgs a, int D) {
  const int row = blockIdx.x * kWarps + (threadIdx.x >> 5), lane = threadIdx.x & 31;
  if (row >= a.B * a.H * a.N) return;
  const int pair = row / a.N, i = row % a.N, b = pair / a.H, h = pair % a.H;
  const float* Q = static_cast<const float*>(a.q);
  const float* K = static_cast<const float*>(a.k);
  const float* V = static_cast<const float*>(a.v);
  float q[kMaxPerLane], acc[kMaxPerLane] = {0, 0, 0, 0};
  load_row_f(Q, a.sq, b, i, h, D, q);
  float m = -INFINITY, l = 0.0f;
  for (int j = 0; j < a.N; ++j) {
    float kr[kMaxPerLane], vr[kMaxPerLane];
    load_row_f(K, a.sk, b, j, h, D, kr);
    load_row_f(V, a.sv, b, j, h, D, vr);
    const float s = dot_row(q, kr) * a.scale;
    const float mn = fmaxf(m, s), al = __expf(m - mn), p = __expf(s - mn);
    l = l * al + p;
#pragma unroll
    for (int c = 0; c < kMaxPerLane; ++c) acc[c] = acc[c] * al + p * vr[c];
    m = mn;
  }
  float* O = static_cast<float*>(a.out);
#pragma unroll
  for (int c = 0; c < kMaxPerLane; ++c) {
    const int d = lane + 32 * c;
    if (d < D) O[attention::out_offset(b, i, h, d, a.N, a.H, D)] = acc[c] / l;
  }
  if (lane == 0) a.lse[attention::lse_offset(b, h, i, a.H, a.N)] = attention::lse_from(m, l);
}

// The backward's scores and probabilities (SIMT): s_ij = fl(q_i . k_j * scale) as the forward
// computes it, P_ij = exp(s_ij - m_i) / l_i from the row's max m_i and sum l_i (attn_bwd_stats_simt),
// not exp(s_ij - lse_i): near the max s_ij - m_i is exact (two nearby floats), while s_ij - lse_i
// carries lse's rounding (an ulp of a logit of hundreds is 3e-5), which came straight through
// dS = P (dP - delta) where P is nearly one-hot (logits spread over hundreds: dq 12x the 2x
// oracle's bound, found by the CPU emulation of tests/_cuda_emu). The CPU twin does the same.
__device__ __forceinline__ float score_simt(const float (&q)[kMaxPerLane], const float (&kr)[kMaxPerLane], float scale) {
  return dot_row(q, kr) * scale;
}
__device__ __forceinline__ float prob_simt(float s, float m, float l) { return __expf(s - m) / l; }

// Per query row, one warp: m_i = max_j s_ij, l_i = sum_j exp(s_ij - m_i) (the scores kept in
// shared memory, N <= 256), then delta_i = sum_j P_ij dP_ij in double with P as the dK / dV and
// dQ kernels compute it (= sum_d dO_id O_id, attention.h). Where P is nearly one-hot, dS =
// P (dP - delta) cancels, and the dO . O form would add the rounding of O and a sum over D of
// terms far larger than the result (the CPU twin's form; the mma path keeps FlashAttention's
// dO . O and lse).
__global__ void __launch_bounds__(kWarps * 32) attn_bwd_stats_simt(AttnArgs a, int D) {
  __shared__ float srow[kWarps][attention::kMaxN];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int row = blockIdx.x * kWarps + warp;
  if (row >= a.B * a.H * a.N) return;
  const int pair = row / a.N, i = row % a.N, b = pair / a.H, h = pair % a.H;
  float q[kMaxPerLane], d[kMaxPerLane];
  load_row_f(static_cast<const float*>(a.q), a.sq, b, i, h, D, q);
  load_row_f(static_cast<const float*>(a.dout), a.sdo, b, i, h, D, d);
  float m = -INFINITY;
  for (int j = 0; j < a.N; ++j) {
    float kr[kMaxPerLane];
    load_row_f(static_cast<const float*>(a.k), a.sk, b, j, h, D, kr);
    const float sj = score_simt(q, kr, a.scale);
    if (lane == (j & 31)) srow[warp][j] = sj;
    m = fmaxf(m, sj);
  }
  __syncwarp();
  float l = 0.0f;
  for (int j = lane; j < a.N; j += 32) l += __expf(srow[warp][j] - m);
  l = warp_sum(l);
  double acc = 0.0;
  for (int j = 0; j < a.N; ++j) {
    float vr[kMaxPerLane];
    load_row_f(static_cast<const float*>(a.v), a.sv, b, j, h, D, vr);
    const float p = prob_simt(srow[warp][j], m, l);
    acc += static_cast<double>(p) * static_cast<double>(dot_row(d, vr));
  }
  if (lane == 0) {
    const int li = attention::lse_offset(b, h, i, a.H, a.N);
    a.delta[li] = static_cast<float>(acc);
    a.row_max[li] = m;
    a.row_sum[li] = l;
  }
}

// dK, dV of one key row per warp (over all queries).
__global__ void __launch_bounds__(kWarps * 32) attn_bwd_kv_simt(AttnArgs a, int D) {
  const int row = blockIdx.x * kWarps + (threadIdx.x >> 5), lane = threadIdx.x & 31;
  if (row >= a.B * a.H * a.N) return;
  const int pair = row / a.N, j = row % a.N, b = pair / a.H, h = pair % a.H;
  float kr[kMaxPerLane], vr[kMaxPerLane], dk[kMaxPerLane] = {0, 0, 0, 0}, dv[kMaxPerLane] = {0, 0, 0, 0};
  load_row_f(static_cast<const float*>(a.k), a.sk, b, j, h, D, kr);
  load_row_f(static_cast<const float*>(a.v), a.sv, b, j, h, D, vr);
  for (int i = 0; i < a.N; ++i) {
    float q[kMaxPerLane], d[kMaxPerLane];
    load_row_f(static_cast<const float*>(a.q), a.sq, b, i, h, D, q);
    load_row_f(static_cast<const float*>(a.dout), a.sdo, b, i, h, D, d);
    const int li = attention::lse_offset(b, h, i, a.H, a.N);
    const float p = prob_simt(score_simt(q, kr, a.scale), a.row_max[li], a.row_sum[li]);
    const float ds = attention::dscore(p, dot_row(d, vr), a.delta[li]);
#pragma unroll
    for (int c = 0; c < kMaxPerLane; ++c) {
      dv[c] += p * d[c];
      dk[c] += ds * q[c];
    }
  }
  float* G = static_cast<float*>(a.dqkv);
#pragma unroll
  for (int c = 0; c < kMaxPerLane; ++c) {
    const int dd = lane + 32 * c;
    if (dd < D) {
      G[attention::dqkv_offset(b, j, 1, h, dd, a.N, a.H, D)] = dk[c] * a.scale;
      G[attention::dqkv_offset(b, j, 2, h, dd, a.N, a.H, D)] = dv[c];
    }
  }
}

// dQ of one query row per warp (over all keys).
__global__ void __launch_bounds__(kWarps * 32) attn_bwd_q_simt(AttnArgs a, int D) {
  const int row = blockIdx.x * kWarps + (threadIdx.x >> 5), lane = threadIdx.x & 31;
  if (row >= a.B * a.H * a.N) return;
  const int pair = row / a.N, i = row % a.N, b = pair / a.H, h = pair % a.H;
  float q[kMaxPerLane], d[kMaxPerLane], dq[kMaxPerLane] = {0, 0, 0, 0};
  load_row_f(static_cast<const float*>(a.q), a.sq, b, i, h, D, q);
  load_row_f(static_cast<const float*>(a.dout), a.sdo, b, i, h, D, d);
  const int li = attention::lse_offset(b, h, i, a.H, a.N);
  const float m = a.row_max[li], l = a.row_sum[li], delta = a.delta[li];
  for (int j = 0; j < a.N; ++j) {
    float kr[kMaxPerLane], vr[kMaxPerLane];
    load_row_f(static_cast<const float*>(a.k), a.sk, b, j, h, D, kr);
    load_row_f(static_cast<const float*>(a.v), a.sv, b, j, h, D, vr);
    const float p = prob_simt(score_simt(q, kr, a.scale), m, l);
    const float ds = attention::dscore(p, dot_row(d, vr), delta);
#pragma unroll
    for (int c = 0; c < kMaxPerLane; ++c) dq[c] += ds * kr[c];
  }
  float* G = static_cast<float*>(a.dqkv);
#pragma unroll
  for (int c = 0; c < kMaxPerLane; ++c) {
    const int dd = lane + 32 * c;
    if (dd < D) G[attention::dqkv_offset(b, i, 0, h, dd, a.N, a.H, D)] = dq[c] * a.scale;
  }
}

// --------------------------------------------------------------------------- host
Strides4 strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

// t as load_a_rows reads it (fp16 / bf16): d contiguous, the other strides even (a size-1 dim's
// stride is never used), the base 4-byte aligned; any other layout is copied (MAE's q, k, v,
// slots of one packed projection, and dO are already so).
at::Tensor pairs_ready(const at::Tensor& t) {
  bool ok = t.stride(3) == 1 && (reinterpret_cast<std::uintptr_t>(t.const_data_ptr()) & 3) == 0;
  for (int d = 0; d < 3; ++d) ok = ok && (t.size(d) == 1 || t.stride(d) % 2 == 0);
  return ok ? t : t.clone(at::MemoryFormat::Contiguous);
}

size_t fwd_smem(int N, int D) {
  const int NP = attention::padded_len(N);
  return static_cast<size_t>(attention::pairs_per_block(N, kWarps)) * (NP * (D + 8) + D * (NP + 8)) * 2;
}
size_t bwd_smem(int N, int D) {
  const int NP = attention::padded_len(N);
  return static_cast<size_t>(2) * NP * (D + 8) * 2 + static_cast<size_t>(2) * NP * 4;
}

template <typename Kernel>
void launch(Kernel kernel, unsigned grid, size_t smem, const AttnArgs& a) {
  // (D = 128 at N > 176 is above the 99 KB of sm_86 / sm_89 / sm_120)
  fastmae::cuda::opt_in_dynamic_smem(kernel, smem, "attention (CUDA): N = " + std::to_string(a.N),
                                     "'triton' or 'sdpa'");
  kernel<<<grid, kWarps * 32, smem, at::cuda::getCurrentCUDAStream()>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void fwd_mma(const AttnArgs& a, int D) {
  const int ppb = attention::pairs_per_block(a.N, kWarps);
  const unsigned grid = static_cast<unsigned>((a.B * a.H + ppb - 1) / ppb);
  const size_t smem = fwd_smem(a.N, D);
  switch (D) {
    case 32: launch(attn_fwd_mma<T, 32>, grid, smem, a); break;
    case 64: launch(attn_fwd_mma<T, 64>, grid, smem, a); break;
    case 80: launch(attn_fwd_mma<T, 80>, grid, smem, a); break;
    case 128: launch(attn_fwd_mma<T, 128>, grid, smem, a); break;
    default: TORCH_CHECK(false, "attention_fwd: head dim ", D, " is not one of 32, 64, 80, 128");
  }
}

template <typename T>
void bwd_mma(const AttnArgs& a, int D) {
  const unsigned grid = static_cast<unsigned>(a.B * a.H);
  const size_t smem = bwd_smem(a.N, D);
  switch (D) {
    case 32: launch(attn_bwd_mma<T, 32>, grid, smem, a); break;
    case 64: launch(attn_bwd_mma<T, 64>, grid, smem, a); break;
    case 80: launch(attn_bwd_mma<T, 80>, grid, smem, a); break;
    case 128: launch(attn_bwd_mma<T, 128>, grid, smem, a); break;
    default: TORCH_CHECK(false, "attention_bwd: head dim ", D, " is not one of 32, 64, 80, 128");
  }
}

void check_shapes(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 4 && q.sizes() == k.sizes() && q.sizes() == v.sizes(), "attention: q, k, v (B, N, H, D)");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), "attention: one dtype");
  FASTMAE_CHECK_SAME_DEVICE(q, k);
  FASTMAE_CHECK_SAME_DEVICE(q, v);
  TORCH_CHECK(q.size(1) <= attention::kMaxN, "attention (CUDA): N must be at most ", attention::kMaxN, ", got ",
              q.size(1));
  const int64_t D = q.size(3);
  TORCH_CHECK(D == 32 || D == 64 || D == 80 || D == 128, "attention (CUDA): head dim must be 32, 64, 80 or 128, got ", D);
  TORCH_CHECK(q.size(0) * q.size(2) < (int64_t(1) << 31) / 256, "attention (CUDA): too many (batch, head) pairs");
}

AttnArgs make_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
  AttnArgs a{};
  a.q = q.const_data_ptr(); a.k = k.const_data_ptr(); a.v = v.const_data_ptr();
  a.sq = strides_of(q); a.sk = strides_of(k); a.sv = strides_of(v);
  a.B = static_cast<int>(q.size(0)); a.N = static_cast<int>(q.size(1)); a.H = static_cast<int>(q.size(2));
  a.scale = static_cast<float>(scale);
  return a;
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                      double scale) {
  check_shapes(q, k, v);
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t B = q.size(0), N = q.size(1), H = q.size(2), D = q.size(3);
  at::Tensor out = empty_output({B, N, H, D}, q.options());
  at::Tensor lse = empty_output({B, H, N}, q.options().dtype(at::kFloat));
  if (B * H * N == 0) return {out, lse};  // nothing to compute (an empty grid is not a launch CUDA accepts)
  const at::Tensor qr = q.scalar_type() != at::kFloat ? pairs_ready(q) : q;  // alive until the launch
  AttnArgs a = make_args(qr, k, v, scale);
  a.out = out.mutable_data_ptr();
  a.lse = lse.mutable_data_ptr<float>();
  switch (q.scalar_type()) {
    case at::kHalf: fwd_mma<__half>(a, static_cast<int>(D)); break;
    case at::kBFloat16: fwd_mma<__nv_bfloat16>(a, static_cast<int>(D)); break;
    case at::kFloat: {
      const unsigned grid = static_cast<unsigned>((B * H * N + kWarps - 1) / kWarps);
      attn_fwd_simt<<<grid, kWarps * 32, 0, at::cuda::getCurrentCUDAStream()>>>(a, static_cast<int>(D));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      break;
    }
    default: TORCH_CHECK(false, "attention_fwd: unsupported dtype ", q.scalar_type());
  }
  return {out, lse};
}

at::Tensor attention_bwd_cuda(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const at::Tensor& out, const at::Tensor& lse_, double scale) {
  check_shapes(q, k, v);
  TORCH_CHECK(dout.sizes() == q.sizes() && out.sizes() == q.sizes(), "attention_bwd: dout, out (B, N, H, D)");
  TORCH_CHECK(dout.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(), "attention_bwd: one dtype");
  FASTMAE_CHECK_SAME_DEVICE(q, dout);
  FASTMAE_CHECK_SAME_DEVICE(q, out);
  FASTMAE_CHECK_SAME_DEVICE(q, lse_);
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t B = q.size(0), N = q.size(1), H = q.size(2), D = q.size(3);
  TORCH_CHECK(lse_.dim() == 3 && lse_.size(0) == B && lse_.size(1) == H && lse_.size(2) == N,
              "attention_bwd: lse (B, H, N)");
  const at::Tensor lse = lse_.contiguous().to(at::kFloat);
  at::Tensor dqkv = empty_output({B, N, 3, H, D}, q.options());
  if (B * H * N == 0) return dqkv;
  const bool mma = q.scalar_type() != at::kFloat;
  const at::Tensor qr = mma ? pairs_ready(q) : q, kr = mma ? pairs_ready(k) : k, vr = mma ? pairs_ready(v) : v;
  const at::Tensor dr = mma ? pairs_ready(dout) : dout;
  AttnArgs a = make_args(qr, kr, vr, scale);
  a.o = out.const_data_ptr(); a.so = strides_of(out);
  a.dout = dr.const_data_ptr(); a.sdo = strides_of(dr);
  a.lse = const_cast<float*>(lse.const_data_ptr<float>());
  a.dqkv = dqkv.mutable_data_ptr();
  switch (q.scalar_type()) {
    case at::kHalf: bwd_mma<__half>(a, static_cast<int>(D)); break;
    case at::kBFloat16: bwd_mma<__nv_bfloat16>(a, static_cast<int>(D)); break;
    case at::kFloat: {
      at::Tensor stats = at::empty({3, B, H, N}, q.options().dtype(at::kFloat));  // delta, row max, row sum
      a.delta = stats[0].mutable_data_ptr<float>();
      a.row_max = stats[1].mutable_data_ptr<float>();
      a.row_sum = stats[2].mutable_data_ptr<float>();
      const unsigned grid = static_cast<unsigned>((B * H * N + kWarps - 1) / kWarps);
      auto stream = at::cuda::getCurrentCUDAStream();
      attn_bwd_stats_simt<<<grid, kWarps * 32, 0, stream>>>(a, static_cast<int>(D));
      attn_bwd_kv_simt<<<grid, kWarps * 32, 0, stream>>>(a, static_cast<int>(D));
      attn_bwd_q_simt<<<grid, kWarps * 32, 0, stream>>>(a, static_cast<int>(D));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      break;
    }
    default: TORCH_CHECK(false, "attention_bwd: unsupported dtype ", q.scalar_type());
  }
  return dqkv;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmae_ext, CUDA, m) {
  m.impl("attention_fwd", &attention_fwd_cuda);
  m.impl("attention_bwd", &attention_bwd_cuda);
}

}  // namespace fastmae
