// Row loads and stores between a tensor's storage dtype (fp32, fp16, bf16) and fp32 buffers,
// for the CPU twins of the row-wise ops (LayerNorm, bias + GELU, attention). Each is a plain
// typed loop that the compiler vectorises; the dtype switch happens once per row, not per element.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

namespace fastmae {
namespace cpu {

inline void load_row(const void* src, at::ScalarType t, float* dst, int64_t n) {
  switch (t) {
    case at::kFloat:
      std::memcpy(dst, src, n * sizeof(float));
      break;
    case at::kBFloat16: {
      const uint16_t* p = static_cast<const uint16_t*>(src);
      uint32_t* d = reinterpret_cast<uint32_t*>(dst);
      for (int64_t i = 0; i < n; ++i) d[i] = static_cast<uint32_t>(p[i]) << 16;
      break;
    }
    case at::kHalf: {
      const uint16_t* p = static_cast<const uint16_t*>(src);
      for (int64_t i = 0; i < n; ++i) dst[i] = c10::detail::fp16_ieee_to_fp32_value(p[i]);
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
      for (int64_t i = 0; i < n; ++i) d[i] = f32_to_bf16_rne(src[i]);
      break;
    }
    case at::kHalf: {
      uint16_t* d = static_cast<uint16_t*>(dst);
      for (int64_t i = 0; i < n; ++i) d[i] = c10::detail::fp16_ieee_from_fp32_value(src[i]);
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
