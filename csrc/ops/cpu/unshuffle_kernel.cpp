// Decoder unshuffle on CPU tensors: the C++ twins of cuda/unshuffle_kernel.cu.
//
// Forward: one task per block of output rows; each row is copied once from its source row
// (ops/unshuffle.h: the cls row, a kept token, or the mask token) with the position embedding
// added as torch adds. Backward: one task per sample scatters the gradient rows to their kept
// rows (a permutation: every row of grad_x written once) and sums the removed rows into a
// per-sample partial in a fixed order; the partials are summed over the batch in a fixed order,
// so the result does not depend on the thread count.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/TypeCast.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "ops/unshuffle.h"

namespace fastmae {
namespace unshuffle {
namespace {

// ids_restore's values are token positions: [0, L) (read here anyway, so checked for free; the
// CUDA kernels, which cannot raise, take any other value as the fill: unshuffle.h).
void check_id(int64_t j, int64_t L) {
  TORCH_CHECK_VALUE(j >= 0 && j < L, "ids_restore must hold token positions in [0, L=", L,
                    ") (random_masking's ids_restore), got ", j);
}

template <typename scalar_t, typename idx_t>
void rows_kernel(const at::Tensor& src, const at::Tensor& ids, int64_t len_keep, int64_t num_cls, int64_t src_off,
                 const scalar_t* fill, const scalar_t* pos, at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = out.size(0), T = out.size(1), D = out.size(2), L = ids.size(1);
  const int64_t ssn = src.stride(0), sst = src.stride(1), sin = ids.stride(0), sil = ids.stride(1);
  const scalar_t* sp = src.const_data_ptr<scalar_t>();
  const idx_t* ip = ids.const_data_ptr<idx_t>();
  scalar_t* o = out.mutable_data_ptr<scalar_t>();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1));
  at::parallel_for(0, N * T, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / T, t = row % T;
      const int64_t j = t < num_cls || t - num_cls >= L ? 0 : static_cast<int64_t>(ip[n * sin + (t - num_cls) * sil]);
      check_id(j, L);
      const int64_t s = source_row(t, num_cls, src_off, j, len_keep);
      const scalar_t* in = s >= 0 ? sp + n * ssn + s * sst : fill;
      scalar_t* dst = o + row * D;
      if (pos != nullptr) {
        const scalar_t* pr = pos + t * D;
        if (in != nullptr) {
          for (int64_t d = 0; d < D; ++d) {
            dst[d] = static_cast<scalar_t>(static_cast<acc_t>(in[d]) + static_cast<acc_t>(pr[d]));
          }
        } else {
          for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(static_cast<acc_t>(pr[d]));
        }
      } else if (in != nullptr) {
        std::copy(in, in + D, dst);
      } else {
        std::fill(dst, dst + D, scalar_t(0));
      }
    }
  });
}

}  // namespace

at::Tensor unshuffle_rows_cpu(const at::Tensor& src_in, const at::Tensor& ids_restore, int64_t len_keep,
                              int64_t num_cls, int64_t src_off, const std::optional<at::Tensor>& fill_in,
                              const std::optional<at::Tensor>& pos_in, at::ScalarType dtype) {
  FASTMAE_CHECK_DIM(src_in, 3);
  FASTMAE_CHECK_DIM(ids_restore, 2);
  FASTMAE_CHECK(ids_restore.scalar_type() == at::kLong || ids_restore.scalar_type() == at::kInt,
                "ids_restore must be int64 or int32");
  const int64_t N = src_in.size(0), D = src_in.size(2), L = ids_restore.size(1);
  at::Tensor src = src_in.to(dtype);
  if (src.stride(2) != 1) src = src.contiguous();
  const at::Tensor fill = fill_in.has_value() ? fill_in->reshape({D}).to(dtype).contiguous() : at::Tensor();
  const at::Tensor pos = pos_in.has_value() ? pos_in->reshape({num_cls + L, D}).to(dtype).contiguous() : at::Tensor();
  at::Tensor out = empty_output({N, num_cls + L, D}, src.options());
  if (out.numel() == 0) return out;
  FASTMAE_DISPATCH_FLOAT(dtype, "fastmae_ext::unshuffle_rows", [&] {
    const scalar_t* f = fill.defined() ? fill.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* p = pos.defined() ? pos.const_data_ptr<scalar_t>() : nullptr;
    if (ids_restore.scalar_type() == at::kLong) {
      rows_kernel<scalar_t, int64_t>(src, ids_restore, len_keep, num_cls, src_off, f, p, out);
    } else {
      rows_kernel<scalar_t, int32_t>(src, ids_restore, len_keep, num_cls, src_off, f, p, out);
    }
  });
  return out;
}

namespace {

at::Tensor decoder_unshuffle_cpu(const at::Tensor& x, const at::Tensor& ids_restore, const at::Tensor& mask_token,
                                 const std::optional<at::Tensor>& pos_embed) {
  FASTMAE_CHECK_DIM(x, 3);
  FASTMAE_CHECK(x.size(1) >= 2 && x.size(1) - 1 <= ids_restore.size(1), "x must be (N, 1 + len_keep, D)");
  at::ScalarType dtype = c10::promoteTypes(x.scalar_type(), mask_token.scalar_type());
  if (pos_embed.has_value()) dtype = c10::promoteTypes(dtype, pos_embed->scalar_type());
  return unshuffle_rows_cpu(x, ids_restore, x.size(1) - 1, 1, 1, mask_token, pos_embed, dtype);
}

template <typename in_t, typename acc_t, typename idx_t>
void backward_kernel(const at::Tensor& g, const at::Tensor& ids, int64_t len_keep, at::Tensor& gx, acc_t* partial) {
  const int64_t N = g.size(0), L = g.size(1) - 1, D = g.size(2);
  const int64_t sgn = g.stride(0), sgt = g.stride(1), sin = ids.stride(0), sil = ids.stride(1);
  const in_t* gp = g.const_data_ptr<in_t>();
  const idx_t* ip = ids.const_data_ptr<idx_t>();
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      acc_t* acc = partial + n * D;
      std::fill(acc, acc + D, acc_t(0));
      const in_t* gn = gp + n * sgn;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gx.scalar_type(), "gx", [&] {
        scalar_t* gxn = gx.mutable_data_ptr<scalar_t>() + n * (1 + len_keep) * D;
        for (int64_t d = 0; d < D; ++d) gxn[d] = c10::convert<scalar_t>(gn[d]);  // the cls row
        for (int64_t l = 0; l < L; ++l) {
          const int64_t j = ip[n * sin + l * sil];
          check_id(j, L);
          const auto* row = gn + (1 + l) * sgt;
          if (is_kept(j, len_keep)) {
            scalar_t* dst = gxn + (1 + j) * D;
            for (int64_t d = 0; d < D; ++d) dst[d] = c10::convert<scalar_t>(row[d]);
          } else {
            for (int64_t d = 0; d < D; ++d) acc[d] += static_cast<acc_t>(row[d]);
          }
        }
      });
    }
  });
}

std::tuple<at::Tensor, at::Tensor> decoder_unshuffle_backward_cpu(const at::Tensor& grad_in,
                                                                  const at::Tensor& ids_restore, int64_t len_keep,
                                                                  at::ScalarType x_dtype) {
  FASTMAE_CHECK_DIM(grad_in, 3);
  FASTMAE_CHECK_FLOAT_DTYPE(x_dtype);
  FASTMAE_CHECK(ids_restore.size(1) == grad_in.size(1) - 1, "grad must be (N, 1 + L, D)");
  const at::Tensor grad = grad_in.stride(2) == 1 ? grad_in : grad_in.contiguous();
  const int64_t N = grad.size(0), D = grad.size(2);
  const at::ScalarType acc = grad.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor gx = empty_output({N, 1 + len_keep, D}, grad.options().dtype(x_dtype));
  at::Tensor partial = at::empty({N, D}, grad.options().dtype(acc));
  FASTMAE_DISPATCH_FLOAT(grad.scalar_type(), "fastmae_ext::decoder_unshuffle_backward", [&] {
    using in_t = scalar_t;
    using acc_t = at::opmath_type<in_t>;
    if (ids_restore.scalar_type() == at::kLong) {
      backward_kernel<in_t, acc_t, int64_t>(grad, ids_restore, len_keep, gx, partial.mutable_data_ptr<acc_t>());
    } else {
      backward_kernel<in_t, acc_t, int32_t>(grad, ids_restore, len_keep, gx, partial.mutable_data_ptr<acc_t>());
    }
  });
  // the batch sum, in a fixed order (sample 0 first)
  at::Tensor gm = empty_output({D}, grad.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES(acc, "fastmae_ext::decoder_unshuffle_backward", [&] {
    const scalar_t* p = partial.const_data_ptr<scalar_t>();
    scalar_t* out = gm.mutable_data_ptr<scalar_t>();
    for (int64_t d = 0; d < D; ++d) out[d] = 0;
    for (int64_t n = 0; n < N; ++n)
      for (int64_t d = 0; d < D; ++d) out[d] += p[n * D + d];
  });
  return {gx, gm};
}

}  // namespace
}  // namespace unshuffle
}  // namespace fastmae

TORCH_LIBRARY_IMPL(fastmae_ext, CPU, m) {
  m.impl("decoder_unshuffle", &fastmae::unshuffle::decoder_unshuffle_cpu);
  m.impl("decoder_unshuffle_backward", &fastmae::unshuffle::decoder_unshuffle_backward_cpu);
}
