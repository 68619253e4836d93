// patchify / unpatchify index math, shared by the CPU twin and the CUDA kernel.
//
//   tokens[n, i*w + j, (r*p + q)*C + c] == imgs[n, c, i*p + r, j*p + q]
//
// for 0 <= i < h, 0 <= j < w, 0 <= r, q < p, 0 <= c < C (p the patch size, h = H/p, w = W/p,
// D = p*p*C, L = h*w): patches in row-major grid order, each flattened (row, column, channel),
// channel innermost -- the official einsum('nchpwq->nhwpqc').
#pragma once

#include "common.h"

namespace fastmae {
namespace patchify {

struct Geom {
  int64_t C, p, h, w;  // channels, patch size, patch grid
  FASTMAE_HD int64_t D() const { return p * p * C; }
  FASTMAE_HD int64_t L() const { return h * w; }
  FASTMAE_HD int64_t H() const { return h * p; }
  FASTMAE_HD int64_t W() const { return w * p; }
};

// Offset (elements) of imgs[n, c, y, x] through the image's strides (any layout).
struct ImageStrides {
  int64_t n, c, y, x;
};
FASTMAE_HD int64_t image_offset(const ImageStrides& s, int64_t n, int64_t c, int64_t y, int64_t x) {
  return n * s.n + c * s.c + y * s.y + x * s.x;
}

// The image element of token element (n, l, d): fills (c, y, x).
FASTMAE_HD void token_to_pixel(const Geom& g, int64_t l, int64_t d, int64_t& c, int64_t& y, int64_t& x) {
  const int64_t i = l / g.w, j = l - i * g.w;
  const int64_t pc = g.p * g.C;
  const int64_t r = d / pc, rem = d - r * pc;
  const int64_t q = rem / g.C;
  c = rem - q * g.C;
  y = i * g.p + r;
  x = j * g.p + q;
}

// The token element (l, d) of pixel (c, y, x).
FASTMAE_HD void pixel_to_token(const Geom& g, int64_t c, int64_t y, int64_t x, int64_t& l, int64_t& d) {
  const int64_t i = y / g.p, r = y - i * g.p;
  const int64_t j = x / g.p, q = x - j * g.p;
  l = i * g.w + j;
  d = (r * g.p + q) * g.C + c;
}

// Offset (elements) of tokens[n, l, d] through the tokens' strides.
struct TokenStrides {
  int64_t n, l, d;
};
FASTMAE_HD int64_t token_offset(const TokenStrides& s, int64_t n, int64_t l, int64_t d) {
  return n * s.n + l * s.l + d * s.d;
}

}  // namespace patchify
}  // namespace fastmae
