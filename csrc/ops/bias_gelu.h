// Bias + exact (erf) GELU: the math shared by the CPU twin and the CUDA kernels.
//
//   v = x + bias (fp32),  y = gelu(v) = v Phi(v) = 0.5 v (1 + erf(v / sqrt 2))
//   gelu'(v) = Phi(v) + v phi(v),  phi(v) = exp(-v^2 / 2) / sqrt(2 pi)
//   dx = dy * gelu'(v) (rounded to x's dtype),  dbias = sum over rows of the fp32 dy * gelu'(v)
//
// The CUDA kernels take erf and exp from the device library (erff, __expf); the CPU twin
// uses erf_exp_as / exp_poly below: branch-free arithmetic that the compiler vectorises (libm's
// erff/expf calls are not). erf_as is Abramowitz & Stegun 7.1.26 (|error| <= 1.5e-7, the
// approximation ATen's own vectorised CPU erf uses), its exp(-z^2) from exp_poly.
#pragma once

#include "../common.h"

#include <cmath>
#include <cstdint>
#include <cstring>

namespace fastmae {
namespace bias_gelu {

constexpr float kInvSqrt2 = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;

FASTMAE_HD float gelu(float v, float erf_v_over_sqrt2) { return 0.5f * v * (1.0f + erf_v_over_sqrt2); }

// gelu'(v) from erf(v / sqrt 2) and exp(-v^2 / 2).
FASTMAE_HD float gelu_grad(float v, float erf_v_over_sqrt2, float exp_half_v2) {
  return 0.5f * (1.0f + erf_v_over_sqrt2) + v * exp_half_v2 * kInvSqrt2Pi;
}

// exp(x) for -87 <= x <= 0: 2^n * e^r, n = ceil(x log2 e - 1/2) (a nearest integer),
// |r| <= ln2 / 2, e^r by its degree-7 Taylor polynomial (relative error < 1e-8).
// Branch-free (a float -> int truncation, a bit cast): the CPU loops vectorise.
FASTMAE_HD float exp_poly(float x) {
  const int32_t ni = static_cast<int32_t>(x * 1.44269504088896341f - 0.5f);  // truncation = ceil here
  const float n = static_cast<float>(ni);
  const float r = (x - n * 0.693145751953125f) - n * 1.42860682030941723212e-6f;  // ln2 split in two
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (ni + 127) << 23;  // ni >= -126 here: a normal power of two
  float scale;
  std::memcpy(&scale, &bits, 4);
  return p * scale;
}

// min(|z|, 9.25) through the bits (arithmetic integer min: GCC turns float compares and even
// integer selects here into branches, which stop the loop from vectorising). erf(9.25) = 1 and exp(-9.25^2) ~ 1e-37: the
// clamp changes no fp32 result; NaN z gives 9.25 (the NaN propagates through v in gelu).
FASTMAE_HD float abs_clamped(float z) {
  int32_t b;
  std::memcpy(&b, &z, 4);
  b &= 0x7fffffff;
  const int32_t lim = 0x41140000;  // 9.25f
  const int32_t d = b - lim;
  b = lim + (d & (d >> 31));  // min(b, lim) without a select
  float a;
  std::memcpy(&a, &b, 4);
  return a;
}

// erf(z) (Abramowitz & Stegun 7.1.26) and exp(-z^2), branch-free.
FASTMAE_HD void erf_exp_as(float z, float* erf_z, float* exp_mz2) {
  const float a = abs_clamped(z);
  const float e = exp_poly(-a * a);
  const float t = 1.0f / (1.0f + 0.3275911f * a);
  float p = 1.061405429f;
  p = p * t - 1.453152027f;
  p = p * t + 1.421413741f;
  p = p * t - 0.284496736f;
  p = p * t + 0.254829592f;
  *erf_z = copysignf(1.0f - p * t * e, z);
  *exp_mz2 = e;
}

// Number of first-stage dbias partial rows: a fixed function of the row count.
FASTMAE_HD int num_partials(long rows, int rows_per_partial) {
  return static_cast<int>((rows + rows_per_partial - 1) / rows_per_partial);
}

}  // namespace bias_gelu
}  // namespace fastmae
