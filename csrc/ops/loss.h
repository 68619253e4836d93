// The MAE loss (norm-pix, removed patches only): the per-patch math shared by the CPU twin and
// the CUDA kernel. Patch m = n*L + l of image n holds P = p*p*C target values, gathered from
// imgs with the index math of ops/patchify.h (never materialised); with norm_pix_loss the target
// is (t - mean) / sqrt(var + 1e-6), var the unbiased variance. loss_m = sum_d (pred - t)^2 / P,
// loss = sum_m loss_m * mask_m / sum_m mask_m; rows with mask 0 are not read.
#pragma once

#include <cmath>

#include "common.h"
#include "ops/patchify.h"

namespace fastmae {
namespace loss {

constexpr float kVarEps = 1e-6f;

// 1 / sqrt(var + eps) of a patch, from the sums of t and t^2 about a shift: the two-pass
// formula in double (sum of (t - mean)^2), as torch.var.
FASTMAE_HD float inv_std(double sum_sq_dev, int64_t P) {
  const double var = sum_sq_dev / static_cast<double>(P - 1);
  return static_cast<float>(1.0 / sqrt(var + static_cast<double>(kVarEps)));
}

FASTMAE_HD float normalised(float t, float mean, float rstd) { return (t - mean) * rstd; }

// d loss / d pred for one element: the chain rule in the reference's order,
// (grad_out / sum(mask)) * mask_m / P * 2 (pred - t).
FASTMAE_HD float pred_grad(float g_over_sum, float m, int64_t P, float pred, float t) {
  return g_over_sum * m / static_cast<float>(P) * (2.0f * (pred - t));
}

}  // namespace loss
}  // namespace fastmae
