// The MAE loss on CPU tensors: the C++ twin of cuda/loss_kernel.cu.
//
// Forward: fixed blocks of kRows patches (the partition does not depend on the thread count),
// one task each: for every patch with mask != 0 the target is gathered from imgs into a row
// buffer (ops/patchify.h; for an fp32 image with unit x stride and C = 3, each patch row's
// three channel runs are interleaved 4 pixels at a time with SSE shuffles), normalised
// (ops/loss.h; sums in 16 float lanes added in double), and the squared error summed; each
// block writes (sum loss_m * mask_m, sum mask_m) in double, and the blocks are added in order:
// a deterministic loss. Backward: the same row pass writes d pred (zero rows for mask 0).
// fp32 pred with a unit last stride is read in place (no row copy).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "ops/cpu/interleave3.h"
#include "ops/loss.h"

// The patches' image rows are 3*p strided runs: the next patch's are prefetched while one is
// gathered (its rows continue the current ones).

namespace fastmae {
namespace loss {
namespace {

constexpr int64_t kRows = 32;

struct Args {
  patchify::Geom g;
  patchify::ImageStrides is;
  int64_t spn, spl, spd;  // pred strides
  int64_t M, L, P;
  bool norm;
};

// Sums over a row in kLanes independent float partial sums (so that the compiler vectorises the
// loop) combined in double at the end: a fixed order, whatever the thread count.
constexpr int kLanes = 16;

template <typename F>
double lane_sum(int64_t P, F term) {
  float acc[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= P; d += kLanes) {
    for (int k = 0; k < kLanes; ++k) acc[k] += term(d + k);
  }
  double total = 0;
  for (; d < P; ++d) total += static_cast<double>(term(d));
  for (int k = 0; k < kLanes; ++k) total += static_cast<double>(acc[k]);
  return total;
}


// The patch's (normalised) target, float32, into t[0, P). C_STATIC > 0: the channel count as a
// compile-time constant (the gather's inner loop unrolls); 0: runtime. X1: unit x stride.
template <typename img_t, int C_STATIC, bool X1>
void load_target(const img_t* imgs, const Args& a, int64_t n, int64_t l, float* t) {
  const int64_t p = a.g.p, C = C_STATIC > 0 ? C_STATIC : a.g.C;
  const int64_t sc = a.is.c, sx = X1 ? 1 : a.is.x;
  int64_t c0, y0, x0;
  patchify::token_to_pixel(a.g, l, 0, c0, y0, x0);  // the patch's first pixel; row r is r*sy further
  const img_t* patch = imgs + patchify::image_offset(a.is, n, c0, y0, x0);
  const bool next_in_row = (l + 1) % a.g.w != 0;  // the next patch, to the right: its rows prefetched
  for (int64_t r = 0; r < p; ++r) {
    const img_t* in = patch + r * a.is.y;
    if (next_in_row) {
      for (int64_t c = 0; c < C; ++c) FASTMAE_PREFETCH(in + c * sc + p * sx);
    }
    float* o = t + r * p * C;
    int64_t q = 0;
#if FASTMAE_CPU_SSE
    if constexpr (X1 && C_STATIC == 3 && std::is_same_v<img_t, float>) {
      for (; q + 4 <= p; q += 4) cpu::interleave3(in + q, in + sc + q, in + 2 * sc + q, o + q * 3);
    }
#endif
    for (; q < p; ++q)
      for (int64_t c = 0; c < C; ++c) o[q * C + c] = static_cast<float>(in[c * sc + q * sx]);
  }
  if (!a.norm) return;
  const float mean = static_cast<float>(lane_sum(a.P, [&](int64_t d) { return t[d]; }) / static_cast<double>(a.P));
  const double ss = lane_sum(a.P, [&](int64_t d) {
    const float dev = t[d] - mean;
    return dev * dev;
  });
  const float rstd = inv_std(ss, a.P);
  for (int64_t d = 0; d < a.P; ++d) t[d] = normalised(t[d], mean, rstd);
}

template <typename img_t>
void load_target(const img_t* imgs, const Args& a, int64_t n, int64_t l, float* t) {
  const bool x1 = a.is.x == 1;
  if (a.g.C == 3) {
    x1 ? load_target<img_t, 3, true>(imgs, a, n, l, t) : load_target<img_t, 3, false>(imgs, a, n, l, t);
  } else {
    x1 ? load_target<img_t, 0, true>(imgs, a, n, l, t) : load_target<img_t, 0, false>(imgs, a, n, l, t);
  }
}

// pred's row as float32: in place for fp32 with a unit stride, else converted into x[0, P)
template <typename pred_t>
const float* load_pred(const pred_t* pr, int64_t stride, int64_t P, float* x) {
  if constexpr (std::is_same_v<pred_t, float>) {
    if (stride == 1) return pr;
  }
  if (stride == 1) {
    for (int64_t d = 0; d < P; ++d) x[d] = static_cast<float>(pr[d]);
  } else {
    for (int64_t d = 0; d < P; ++d) x[d] = static_cast<float>(pr[d * stride]);
  }
  return x;
}

Args make_args(const at::Tensor& imgs, const at::Tensor& pred, int64_t patch_size, bool norm) {
  const int64_t p = patch_size;
  Args a{{imgs.size(1), p, imgs.size(2) / p, imgs.size(3) / p},
         {imgs.stride(0), imgs.stride(1), imgs.stride(2), imgs.stride(3)},
         pred.stride(0), pred.stride(1), pred.stride(2), 0, 0, 0, norm};
  a.L = a.g.L();
  a.M = imgs.size(0) * a.L;
  a.P = a.g.D();
  return a;
}

// float64 inputs are computed in float32, as the reference does (.float()); the mask as float32
void prepare(at::Tensor& imgs, at::Tensor& pred, at::Tensor& mask) {
  if (imgs.scalar_type() == at::kDouble) imgs = imgs.to(at::kFloat);
  if (pred.scalar_type() == at::kDouble) pred = pred.to(at::kFloat);
  mask = mask.to(at::kFloat).contiguous();
}

std::tuple<at::Tensor, at::Tensor> mae_loss_cpu(const at::Tensor& imgs_in, const at::Tensor& pred_in,
                                                const at::Tensor& mask_in, int64_t patch_size, bool norm) {
  FASTMAE_CHECK_DIM(imgs_in, 4);
  FASTMAE_CHECK_DIM(pred_in, 3);
  at::Tensor imgs = imgs_in, pred = pred_in, mask = mask_in;
  prepare(imgs, pred, mask);
  const Args a = make_args(imgs, pred, patch_size, norm);
  FASTMAE_CHECK(pred.size(0) * pred.size(1) == a.M && pred.size(2) == a.P && mask.numel() == a.M,
                "pred / mask do not match the patchified imgs");
  const int64_t blocks = ceil_div(a.M, kRows);
  std::vector<double> part_loss(blocks), part_mask(blocks);
  const float* mp = mask.const_data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, imgs.scalar_type(), "fastmae_ext::mae_loss", [&] {
    using img_t = scalar_t;
    const img_t* ip = imgs.const_data_ptr<img_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(), "fastmae_ext::mae_loss", [&] {
      const scalar_t* pp = pred.const_data_ptr<scalar_t>();
      at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
        std::vector<float> t(a.P), x(a.P);
        for (int64_t b = begin; b < end; ++b) {
          double sl = 0, sm = 0;
          for (int64_t row = b * kRows; row < std::min(a.M, (b + 1) * kRows); ++row) {
            const float m = mp[row];
            if (m == 0.0f) continue;  // loss_m * 0: not read
            const int64_t n = row / a.L, l = row % a.L;
            load_target<img_t>(ip, a, n, l, t.data());
            const float* xr = load_pred<scalar_t>(pp + n * a.spn + l * a.spl, a.spd, a.P, x.data());
            const double err = lane_sum(a.P, [&](int64_t d) {
              const float e = xr[d] - t[d];
              return e * e;
            });
            sl += err / static_cast<double>(a.P) * m;
            sm += m;
          }
          part_loss[b] = sl;
          part_mask[b] = sm;
        }
      });
    });
  });
  double sl = 0, sm = 0;
  for (int64_t b = 0; b < blocks; ++b) {  // in order: deterministic
    sl += part_loss[b];
    sm += part_mask[b];
  }
  at::Tensor loss = empty_output({}, imgs.options().dtype(at::kFloat));
  at::Tensor mask_sum = empty_output({}, imgs.options().dtype(at::kFloat));
  loss.fill_(static_cast<float>(sl / sm));
  mask_sum.fill_(static_cast<float>(sm));
  return {loss, mask_sum};
}

at::Tensor mae_loss_backward_cpu(const at::Tensor& grad_out, const at::Tensor& mask_sum, const at::Tensor& imgs_in,
                                 const at::Tensor& pred_in, const at::Tensor& mask_in, int64_t patch_size,
                                 bool norm) {
  at::Tensor imgs = imgs_in, pred = pred_in, mask = mask_in;
  prepare(imgs, pred, mask);
  const Args a = make_args(imgs, pred, patch_size, norm);
  at::Tensor grad = empty_output(pred.sizes(), pred.options());
  const float g_over_sum = grad_out.item<float>() / mask_sum.item<float>();
  const float* mp = mask.const_data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, imgs.scalar_type(), "fastmae_ext::mae_loss_backward", [&] {
    using img_t = scalar_t;
    const img_t* ip = imgs.const_data_ptr<img_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(), "fastmae_ext::mae_loss_backward",
                                    [&] {
      const scalar_t* pp = pred.const_data_ptr<scalar_t>();
      scalar_t* gp = grad.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, a.M, kRows, [&](int64_t begin, int64_t end) {
        std::vector<float> t(a.P), x(a.P);
        for (int64_t row = begin; row < end; ++row) {
          scalar_t* out = gp + row * a.P;
          const float m = mp[row];
          if (m == 0.0f) {
            std::fill(out, out + a.P, scalar_t(0));
            continue;
          }
          const int64_t n = row / a.L, l = row % a.L;
          load_target<img_t>(ip, a, n, l, t.data());
          const float* xr = load_pred<scalar_t>(pp + n * a.spn + l * a.spl, a.spd, a.P, x.data());
          for (int64_t d = 0; d < a.P; ++d) {
            out[d] = static_cast<scalar_t>(pred_grad(g_over_sum, m, a.P, xr[d], t[d]));
          }
        }
      });
    });
  });
  // float64 pred: computed in float32 as the reference, returned in pred's dtype
  return grad.scalar_type() == pred_in.scalar_type() ? grad : grad.to(pred_in.scalar_type());
}

}  // namespace
}  // namespace loss
}  // namespace fastmae

TORCH_LIBRARY_IMPL(fastmae_ext, CPU, m) {
  m.impl("mae_loss", &fastmae::loss::mae_loss_cpu);
  m.impl("mae_loss_backward", &fastmae::loss::mae_loss_backward_cpu);
}
