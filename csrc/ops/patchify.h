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

// 16-byte vector paths (CUDA): patchify / unpatchify move runs of G pixels along x (G a
// multiple of both dtypes' 16-byte vector widths; p % G == 0, so a run never leaves its patch)
// for all C channels at once: in tokens the run is G*C contiguous elements, channel innermost,
// in the image it is C runs of G contiguous pixels, one per channel plane.
//
// Run u of token l (0 <= u < p*(p/G): u = r*(p/G) + qg): the token elements from
// d0 = (r*p + qg*G)*C, G*C of them, are the pixels from (y, x) = (i*p + r, j*p + qg*G),
// l = i*w + j: element d0 + e*C + c is pixel (c, y, x + e).
FASTMAE_HD void patch_run(const Geom& g, int64_t G, int64_t l, int64_t u, int64_t& y, int64_t& x, int64_t& d0) {
  const int64_t groups = g.p / G;
  const int64_t r = u / groups, q0 = (u - r * groups) * G;
  const int64_t i = l / g.w, j = l - i * g.w;
  y = i * g.p + r;
  x = j * g.p + q0;
  d0 = (r * g.p + q0) * g.C;
}

// Patchify unit k (token order): k = (n*L + l)*(p*(p/G)) + u, run u of token l of sample n;
// its G*C outputs start at token offset (n*L + l)*D + d0 == k*G*C (as D = p*(p/G)*G*C). Fills
// (n, y, x).
FASTMAE_HD void patchify_run(const Geom& g, int64_t G, int64_t k, int64_t& n, int64_t& y, int64_t& x) {
  const int64_t runs = g.p * (g.p / G);
  const int64_t row = k / runs, u = k - row * runs;  // row = n*L + l
  n = row / g.L();
  int64_t d0;
  patch_run(g, G, row - n * g.L(), u, y, x, d0);
}

// Unpatchify unit k (image order): k = (n*H + y)*(W/G) + xg, the pixels (c, y, xg*G + e) of
// sample n for every c, 0 <= e < G: output offsets ((n*C + c)*H + y)*W + xg*G + e. Their token
// elements are (n, l, d0 + e*C + c) with (l, d0) = pixel_to_token(c = 0, y, xg*G). Fills
// (n, y, x0 = xg*G, l, d0).
FASTMAE_HD void unpatchify_run(const Geom& g, int64_t G, int64_t k, int64_t& n, int64_t& y, int64_t& x0,
                               int64_t& l, int64_t& d0) {
  const int64_t groups = g.W() / G;
  x0 = (k % groups) * G;
  const int64_t row = k / groups;  // n*H + y
  y = row % g.H();
  n = row / g.H();
  pixel_to_token(g, 0, y, x0, l, d0);
}

}  // namespace patchify
}  // namespace fastmae
