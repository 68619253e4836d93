// Fused residual add + LayerNorm: the math shared by the CPU twin and the CUDA kernels.
//
// Forward, one row of D elements (fp32 math whatever the storage dtypes):
//   s    = x + residual                       (stored in residual_dtype when there is a residual)
//   mean = sum(s) / D,  var = sum((s - mean)^2) / D,  rstd = 1 / sqrt(var + eps)
//   y    = (s - mean) * rstd * w + b          (stored in out_dtype)
// Backward, from dy (and ds, the gradient reaching s directly), with xhat = (s - mean) * rstd,
// g = dy * w, c1 = sum(xhat * g) / D and c2 = sum(g) / D:
//   dsum = (g - xhat * c1 - c2) * rstd + ds   (= dx = dresidual)
//   dw   = sum over rows of dy * xhat,  db = sum over rows of dy.
// mean and rstd are saved per row (fp32); the backward recomputes xhat from the saved s.
#pragma once

#include "../common.h"

namespace fastmae {
namespace layer_norm {

// The dtypes the kernels store and load (host): float32, float16, bfloat16; the same check,
// and message, on both devices. (fastmae.ops validates user input first.)
inline void check_dtype(at::ScalarType t, const char* op, const char* what) {
  TORCH_CHECK(t == at::kFloat || t == at::kHalf || t == at::kBFloat16, op, ": ", what,
              " must be float32, float16 or bfloat16, got ", t);
}
inline void check_dtype(const std::optional<at::Tensor>& t, const char* op, const char* what) {
  if (t.has_value() && t->defined()) check_dtype(t->scalar_type(), op, what);
}

inline void check_fwd_dtypes(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                             const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                             at::ScalarType out_dtype, at::ScalarType residual_dtype) {
  constexpr const char* op = "add_layer_norm_fwd";
  check_dtype(x.scalar_type(), op, "x");
  check_dtype(residual, op, "residual");
  check_dtype(weight, op, "weight");
  check_dtype(bias, op, "bias");
  check_dtype(out_dtype, op, "out_dtype");
  check_dtype(residual_dtype, op, "residual_dtype");
}

inline void check_bwd_dtypes(const at::Tensor& dy, const std::optional<at::Tensor>& ds, const at::Tensor& s,
                             const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                             at::ScalarType x_dtype, std::optional<at::ScalarType> residual_dtype) {
  constexpr const char* op = "add_layer_norm_bwd";
  check_dtype(dy.scalar_type(), op, "dy");
  check_dtype(ds, op, "ds");
  check_dtype(s.scalar_type(), op, "s");
  check_dtype(weight, op, "weight");
  check_dtype(bias, op, "bias");  // db is returned in its dtype
  check_dtype(x_dtype, op, "x_dtype");
  if (residual_dtype.has_value()) check_dtype(*residual_dtype, op, "residual_dtype");
}

// The widest row the CUDA kernels index with 32-bit column offsets (a lane's last chunk start
// plus a warp's stride stays below 2^31).
constexpr int64_t kCudaMaxD = (int64_t{1} << 31) - 1 - 32 * 8;

// rstd from the row's centred sum of squares (D = 0: 0 / 0, NaN, as the mean).
FASTMAE_HD float rstd_from(float centred_sumsq, int64_t D, float eps) {
#ifdef __CUDA_ARCH__
  return rsqrtf(centred_sumsq / static_cast<float>(D) + eps);
#else
  return 1.0f / sqrtf(centred_sumsq / static_cast<float>(D) + eps);
#endif
}

// One element of the forward output; w = 1, b = 0 without affine parameters.
FASTMAE_HD float forward_elem(float s, float mean, float rstd, float w, float b) {
  return (s - mean) * rstd * w + b;
}

// One element of the input gradient (dx = dresidual), given the row's c1 and c2.
FASTMAE_HD float backward_elem(float dy, float s, float mean, float rstd, float w, float c1, float c2, float ds) {
  const float xhat = (s - mean) * rstd;
  return (dy * w - xhat * c1 - c2) * rstd + ds;
}

// Number of first-stage partial rows of dW/dB: a fixed function of the row count (never of
// the device), so the reduction order, hence the result, is the same on every run.
FASTMAE_HD int num_partials(long rows, int rows_per_partial) {
  return static_cast<int>((rows + rows_per_partial - 1) / rows_per_partial);
}

}  // namespace layer_norm
}  // namespace fastmae
