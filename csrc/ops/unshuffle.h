// Decoder unshuffle: the row map shared by the CPU twin and the CUDA kernel, and the row-gather
// launchers that the decoder unshuffle and the encoder's masked-token backward share.
//
//   out[n, t]       = src[n, t]                          for t < num_cls (the cls row)
//   out[n, c + l]   = src[n, src_off + j] if j < len_keep  (j = ids_restore[n, l])
//                     fill (the mask token, or 0)        otherwise
//   (+ pos[t] for every output row t, when given)
//
// decoder_unshuffle: num_cls = 1, src_off = 1, fill = mask_token, pos = the decoder pos embed.
// masked_tokens_backward: num_cls = 0, src_off = num_prefix, fill = 0, no pos.
#pragma once

#include <optional>

#include "common.h"

namespace fastmae {
namespace unshuffle {

// Whether ids_restore's j names a kept row: 0 <= j < len_keep. Anything else is the fill, so a
// j out of range never reads or writes out of bounds on CUDA, where a kernel cannot raise (the
// CPU twin refuses it: check_id in cpu/unshuffle_kernel.cpp).
FASTMAE_HD bool is_kept(int64_t j, int64_t len_keep) { return j >= 0 && j < len_keep; }

// Source row of output row t (in src), or -1 for the fill; j = ids_restore[n, t - num_cls].
// The backward: the kept row j of x takes the gradient of output row num_cls + l, for
// ids_restore[n, l] = j; the other rows' gradients go to the fill's.
FASTMAE_HD int64_t source_row(int64_t t, int64_t num_cls, int64_t src_off, int64_t j, int64_t len_keep) {
  if (t < num_cls) return t;
  return is_kept(j, len_keep) ? src_off + j : -1;
}

// (N, num_cls + L, D) in out_dtype; src/fill/pos are converted to out_dtype first (a widening
// for the forward; for the backward a cast that commutes with the gather).
at::Tensor unshuffle_rows_cpu(const at::Tensor& src, const at::Tensor& ids_restore, int64_t len_keep,
                              int64_t num_cls, int64_t src_off, const std::optional<at::Tensor>& fill,
                              const std::optional<at::Tensor>& pos, at::ScalarType out_dtype);
at::Tensor unshuffle_rows_cuda(const at::Tensor& src, const at::Tensor& ids_restore, int64_t len_keep,
                               int64_t num_cls, int64_t src_off, const std::optional<at::Tensor>& fill,
                               const std::optional<at::Tensor>& pos, at::ScalarType out_dtype);

}  // namespace unshuffle
}  // namespace fastmae
