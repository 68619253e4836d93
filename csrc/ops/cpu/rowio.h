// Row loads and stores between a tensor's storage dtype (fp32, fp16, bf16) and fp32 buffers,
// for the CPU twins of the row-wise ops (LayerNorm, bias + GELU, attention). The dtype switch
// happens once per row, not per element. fp16 and bf16 rows of 8 or more elements take 8-wide
// AVX2 conversions where the CPU has them (cpu_has_avx2_fma(), common.h): F16C's vcvtph2ps /
// vcvtps2ph (round to nearest even) for fp16, integer shifts and the same round-to-nearest-even
// for bf16; the baseline build and the tails convert one element at a time. Both give the bits
// of torch's own conversions for every non-NaN value (NaN stays NaN; its payload bits may differ).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

#include "common.h"

#if FASTMAE_X86_TARGETS
#include <immintrin.h>
#endif

namespace fastmae {
namespace cpu {

#if FASTMAE_X86_TARGETS
// 8 elements a step; the caller converts the n % 8 tail.
FASTMAE_TARGET_AVX2 inline int64_t f16_to_f32_avx2(const uint16_t* p, float* d, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(d + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + i))));
  return i;
}
FASTMAE_TARGET_AVX2 inline int64_t f32_to_f16_avx2(const float* s, uint16_t* d, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(s + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  return i;
}
FASTMAE_TARGET_AVX2 inline int64_t bf16_to_f32_avx2(const uint16_t* p, float* d, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + i)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + i), _mm256_slli_epi32(w, 16));
  }
  return i;
}
// f32_to_bf16_rne (below) on 8 lanes: u + 0x7fff + lsb, the top half; a NaN keeps its top half
// with the quiet bit set.
FASTMAE_TARGET_AVX2 inline int64_t f32_to_bf16_avx2(const float* s, uint16_t* d, int64_t n) {
  const __m256i one = _mm256_set1_epi32(1), round = _mm256_set1_epi32(0x7fff), quiet = _mm256_set1_epi32(0x40);
  const __m256i abs_mask = _mm256_set1_epi32(0x7fffffff), inf = _mm256_set1_epi32(0x7f800000);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256i u = _mm256_castps_si256(_mm256_loadu_ps(s + i));
    const __m256i hi = _mm256_srli_epi32(u, 16);
    const __m256i rne = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(round, _mm256_and_si256(hi, one))), 16);
    const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, abs_mask), inf);
    const __m256i r = _mm256_blendv_epi8(rne, _mm256_or_si256(hi, quiet), nan);
    // 8 x 32-bit lanes (each < 2^16) to 8 x 16-bit: pack within 128-bit halves, then gather them
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i), _mm256_castsi256_si128(packed));
  }
  return i;
}
#endif

// The vector conversions' entry: how many leading elements of the row they converted (0 where
// the CPU, the build or a short row leaves them all to the scalar loop).
enum class Conv { kF16ToF32, kF32ToF16, kBF16ToF32, kF32ToBF16 };
inline int64_t convert_vector(Conv c, const void* src, void* dst, int64_t n) {
#if FASTMAE_X86_TARGETS
  if (n < 8 || !cpu_has_avx2_fma()) return 0;
  switch (c) {
    case Conv::kF16ToF32:
      return f16_to_f32_avx2(static_cast<const uint16_t*>(src), static_cast<float*>(dst), n);
    case Conv::kF32ToF16:
      return f32_to_f16_avx2(static_cast<const float*>(src), static_cast<uint16_t*>(dst), n);
    case Conv::kBF16ToF32:
      return bf16_to_f32_avx2(static_cast<const uint16_t*>(src), static_cast<float*>(dst), n);
    case Conv::kF32ToBF16:
      return f32_to_bf16_avx2(static_cast<const float*>(src), static_cast<uint16_t*>(dst), n);
  }
#endif
  return 0;
}

inline void load_row(const void* src, at::ScalarType t, float* dst, int64_t n) {
  switch (t) {
    case at::kFloat:
      std::memcpy(dst, src, n * sizeof(float));
      break;
    case at::kBFloat16: {
      const uint16_t* p = static_cast<const uint16_t*>(src);
      uint32_t* d = reinterpret_cast<uint32_t*>(dst);
      for (int64_t i = convert_vector(Conv::kBF16ToF32, src, dst, n); i < n; ++i)
        d[i] = static_cast<uint32_t>(p[i]) << 16;
      break;
    }
    case at::kHalf: {
      const uint16_t* p = static_cast<const uint16_t*>(src);
      for (int64_t i = convert_vector(Conv::kF16ToF32, src, dst, n); i < n; ++i)
        dst[i] = c10::detail::fp16_ieee_to_fp32_value(p[i]);
      break;
    }
    default:
      TORCH_CHECK(false, "fastmae_ext: unsupported dtype ", t);
  }
}

// dst += row (fp32 accumulate)
inline void add_row(const void* src, at::ScalarType t, float* dst, float* tmp, int64_t n) {
  if (t == at::kFloat) {
    const float* p = static_cast<const float*>(src);
    for (int64_t i = 0; i < n; ++i) dst[i] += p[i];
    return;
  }
  load_row(src, t, tmp, n);
  for (int64_t i = 0; i < n; ++i) dst[i] += tmp[i];
}

inline uint16_t f32_to_bf16_rne(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline void store_row(const float* src, at::ScalarType t, void* dst, int64_t n) {
  switch (t) {
    case at::kFloat:
      std::memcpy(dst, src, n * sizeof(float));
      break;
    case at::kBFloat16: {
      uint16_t* d = static_cast<uint16_t*>(dst);
      for (int64_t i = convert_vector(Conv::kF32ToBF16, src, dst, n); i < n; ++i) d[i] = f32_to_bf16_rne(src[i]);
      break;
    }
    case at::kHalf: {
      uint16_t* d = static_cast<uint16_t*>(dst);
      for (int64_t i = convert_vector(Conv::kF32ToF16, src, dst, n); i < n; ++i)
        d[i] = c10::detail::fp16_ieee_from_fp32_value(src[i]);
      break;
    }
    default:
      TORCH_CHECK(false, "fastmae_ext: unsupported dtype ", t);
  }
}

// Sum of n floats with 8 independent partial sums (vectorisable; a fixed order).
inline float sum_row(const float* p, int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) acc[j] += p[i + j];
  float tail = 0;
  for (; i < n; ++i) tail += p[i];
  return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail;
}

inline const char* byte_ptr(const at::Tensor& t) { return static_cast<const char*>(t.const_data_ptr()); }
inline char* byte_ptr_mut(const at::Tensor& t) { return static_cast<char*>(t.mutable_data_ptr()); }

}  // namespace cpu
}  // namespace fastmae
