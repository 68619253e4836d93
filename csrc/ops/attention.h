// Softmax attention for MAE's short sequences: the index math and softmax pieces shared by
// the CPU twin and the CUDA kernels.
//
// Tensors are (B, N, H, D) with any element strides (q, k, v may be the unbound slots of a
// packed (B, N, 3, H, D) projection); the output is (B, N, H, D) contiguous, the logsumexp
// (B, H, N) fp32 contiguous, natural log (the Triton kernel's convention), and the backward
// writes dq, dk, dv into one (B, N, 3, H, D) contiguous tensor.
//
// Forward:  S = scale q k^T,  lse_i = log sum_j exp(S_ij),  P = exp(S - lse),  O = P v.
// Backward: P recomputed from lse,  delta_i = sum_d dO_id O_id (the CPU twin: sum_j P_ij dP_ij),  dV = P^T dO,  dP = dO v^T,
//           dS = P * (dP - delta),  dQ = scale dS k,  dK = scale dS^T q.
//
// CUDA tiling (one (batch, head) pair's whole K and V in shared memory): the sequence is
// padded to a multiple of 16 (the mma.sync k-step); query rows go in 16-row strips, one
// warp per strip; pairs_per_block pairs share a block when the strips of one pair do not
// fill its warps.
#pragma once

#include "../common.h"

#include <cstdint>

namespace fastmae {
namespace attention {

constexpr int kMaxN = 256;  // the one-tile limit of the "ext" backend (CPU and CUDA alike)
constexpr float kLog2e = 1.4426950408889634f;

struct Strides4 {
  int64_t b, n, h, d;
};

FASTMAE_HD int64_t offset(const Strides4& s, int64_t b, int64_t n, int64_t h, int64_t d) {
  return b * s.b + n * s.n + h * s.h + d * s.d;
}

// Offsets into the contiguous (B, N, H, D) output and (B, N, 3, H, D) gradient.
FASTMAE_HD int64_t out_offset(int64_t b, int64_t n, int64_t h, int64_t d, int64_t N, int64_t H, int64_t D) {
  return ((b * N + n) * H + h) * D + d;
}
FASTMAE_HD int64_t dqkv_offset(int64_t b, int64_t n, int slot, int64_t h, int64_t d, int64_t N, int64_t H,
                               int64_t D) {
  return (((b * N + n) * 3 + slot) * H + h) * D + d;
}
// dqkv_offset(b, n, slot, h, d, N, H, D) from the flat row b*N + n, all operands unsigned 32-bit
// (row < 2^31: the launchers check B*H*N; d < D <= 128), widened without sign: the CUDA
// backward's stores, where the sign words of the 64-bit operands cost registers.
FASTMAE_HD int64_t dqkv_offset_row(uint32_t row, uint32_t slot, uint32_t h, uint32_t d, uint32_t H, uint32_t D) {
  return static_cast<int64_t>(((static_cast<uint64_t>(row) * 3 + slot) * H + h) * D + d);
}
FASTMAE_HD int64_t lse_offset(int64_t b, int64_t h, int64_t n, int64_t H, int64_t N) { return (b * H + h) * N + n; }

// The padded sequence length (a multiple of 16) and the number of 16-row strips.
FASTMAE_HD int padded_len(int N) { return (N + 15) / 16 * 16; }
FASTMAE_HD int num_strips(int N) { return padded_len(N) / 16; }

// (batch, head) pairs per block of `warps` warps: as many as fit one strip per warp, at most 4.
FASTMAE_HD int pairs_per_block(int N, int warps) {
  const int p = warps / num_strips(N);
  return p < 1 ? 1 : (p > 4 ? 4 : p);
}

// Block-local task t (of pairs_per_block * num_strips) -> (pair within the block, strip).
FASTMAE_HD void task_of(int t, int strips, int* pair, int* strip) {
  *pair = t / strips;
  *strip = t % strips;
}

// Row logsumexp from the running max m and sum l of exp(s - m).
FASTMAE_HD float lse_from(float m, float l) { return m + logf(l); }

// dS from P, dP and delta.
FASTMAE_HD float dscore(float p, float dp, float delta) { return p * (dp - delta); }

}  // namespace attention
}  // namespace fastmae
