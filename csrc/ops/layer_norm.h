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

// rstd from the row's centred sum of squares.
FASTMAE_HD float rstd_from(float centred_sumsq, int D, float eps) {
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
