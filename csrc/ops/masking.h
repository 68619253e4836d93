// Random masking: the order-preserving noise keys and the (key, index) order, shared by the
// CPU twin (which sorts) and the CUDA kernel (which ranks by counting).
//
// The reference's ids_shuffle is the stable ascending argsort of the noise, ids_restore its
// inverse: the rank of each token in the order of (noise, index). The key is an integer image
// of the noise whose signed order is the float order: the float's bits, all but the sign
// flipped for negative values, -0 folded onto +0 and every NaN onto one NaN above +inf (as
// torch's sort orders them). fp16/bf16/fp32 noise converts exactly to fp32 (a 32-bit key),
// fp64 noise gives a 64-bit key; ties are broken by the token index.
#pragma once

#include <cstring>

#include "common.h"

namespace fastmae {
namespace masking {

constexpr int64_t kMaxTokens = 4096;  // the CUDA kernel ranks a sample's keys in shared memory

template <typename To, typename From>
FASTMAE_HD To bit_cast(From v) {
  To out;
  memcpy(&out, &v, sizeof(To));
  return out;
}

FASTMAE_HD int64_t noise_key(float u) {
  int32_t bits = bit_cast<int32_t>(u);
  if (u == 0.0f) bits = 0;           // -0 -> +0: equal, as torch compares them
  if (u != u) bits = 0x7FC00000;     // every NaN -> one NaN, above +inf
  if (bits < 0) bits ^= 0x7FFFFFFF;  // signed order = float order
  return bits;
}

FASTMAE_HD int64_t noise_key(double u) {
  int64_t bits = bit_cast<int64_t>(u);
  if (u == 0.0) bits = 0;
  if (u != u) bits = 0x7FF8000000000000LL;
  if (bits < 0) bits ^= 0x7FFFFFFFFFFFFFFFLL;
  return bits;
}

// The key of one noise value of any float dtype (fp16/bf16 widen to fp32 exactly).
template <typename T>
FASTMAE_HD int64_t key_of(T u) {
  return noise_key(static_cast<float>(u));
}
template <>
FASTMAE_HD int64_t key_of<double>(double u) {
  return noise_key(u);
}

// Token j comes before token i in the stable ascending order of the noise.
FASTMAE_HD bool before(int64_t key_j, int64_t j, int64_t key_i, int64_t i) {
  return key_j < key_i || (key_j == key_i && j < i);
}

// The tokens' row in the encoder input: row 0 is the cls token, kept token t sits at 1 + t.
FASTMAE_HD int64_t token_row(int64_t rank, int64_t num_prefix) { return num_prefix + rank; }

}  // namespace masking
}  // namespace fastmae
