"""The index math of the CUDA kernels' 16-byte vector paths (csrc/ops/patchify.h), on the CPU.

No GPU runs here, and the CPU twins do not take these paths, so this compiles a small C++
program against the very header the CUDA kernels include (``FASTMAE_HD`` functions; a stub
``common.h`` stands in for the ATen one) and replays the vector kernels' loops on integer
"images": patchify_vec_kernel (patchify_run: one run of G pixels along x for all C channels
a unit, its outputs at k*G*C), unpatchify_vec_kernel (unpatchify_run) and the loss kernel's
vectorised target gather (patch_run: run u of token l). Every output element must be written
exactly once and equal the scalar map token_to_pixel / pixel_to_token (which the CPU twins'
tests check against the reference), for C = 1, 3 (and 2, 4: the loss gather is generic in C),
patch sizes that are multiples of G, and several grids.

Skips when there is no C++ compiler.
"""

import os
import shutil
import subprocess

import pytest

CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")
CXX = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")

STUB = """#pragma once
#include <cstdint>
#define FASTMAE_HD inline
"""

PROGRAM = r"""
#include "ops/patchify.h"
#include <cstdio>
#include <vector>
using namespace fastmae::patchify;

static int bad = 0;
#define EXPECT(cond)                                                                   \
  do {                                                                                 \
    if (!(cond) && ++bad < 10)                                                         \
      std::printf("failed: %s (C%ld p%ld G%ld h%ld w%ld)\n", #cond, (long)C, (long)p, \
                  (long)G, (long)h, (long)w);                                          \
  } while (0)

int main() {
  int cases = 0;
  for (int64_t C : {1, 2, 3, 4}) for (int64_t p : {2, 4, 8, 12, 16, 32}) for (int64_t G : {2, 4, 8}) {
    if (p % G) continue;
    for (int64_t h : {1, 2, 3}) for (int64_t w : {1, 2, 5}) {
      const int64_t N = 2;
      const Geom g{C, p, h, w};
      ++cases;
      const int64_t H = g.H(), W = g.W(), D = g.D(), L = g.L();
      const ImageStrides s{C * H * W, H * W, W, 1};
      std::vector<int64_t> img(N * C * H * W), ref(N * L * D);
      for (size_t i = 0; i < img.size(); ++i) img[i] = static_cast<int64_t>(i) * 7 + 1;
      for (int64_t n = 0; n < N; ++n)
        for (int64_t l = 0; l < L; ++l)
          for (int64_t d = 0; d < D; ++d) {
            int64_t c, y, x;
            token_to_pixel(g, l, d, c, y, x);
            ref[(n * L + l) * D + d] = img[image_offset(s, n, c, y, x)];
          }
      // the loss kernel's gather: lanes over the runs u of token l, any C
      for (int64_t n = 0; n < N; ++n)
        for (int64_t l = 0; l < L; ++l) {
          std::vector<int64_t> t(D, -1);
          for (int64_t u = 0; u < p * (p / G); ++u) {
            int64_t y, x, d0;
            patch_run(g, G, l, u, y, x, d0);
            EXPECT(x % G == 0 && d0 % G == 0 && d0 + G * C <= D);
            for (int64_t c = 0; c < C; ++c)
              for (int64_t e = 0; e < G; ++e) {
                EXPECT(t[d0 + e * C + c] == -1);
                t[d0 + e * C + c] = img[image_offset(s, n, c, y, x + e)];
              }
          }
          for (int64_t d = 0; d < D; ++d) EXPECT(t[d] == ref[(n * L + l) * D + d]);
        }
      if (C != 1 && C != 3) continue;  // the patchify / unpatchify vector kernels take C = 1, 3
      // patchify_vec_kernel: unit k writes tokens[k*G*C + e*C + c] = imgs[n, c, y, x + e]
      const int64_t units = N * L * p * (p / G);
      EXPECT(units * G * C == N * L * D);
      std::vector<int64_t> tok(N * L * D, -1);
      for (int64_t k = 0; k < units; ++k) {
        int64_t n, y, x;
        patchify_run(g, G, k, n, y, x);
        EXPECT(x % G == 0);
        for (int64_t c = 0; c < C; ++c)
          for (int64_t e = 0; e < G; ++e) {
            EXPECT(tok[k * G * C + e * C + c] == -1);
            tok[k * G * C + e * C + c] = img[image_offset(s, n, c, y, x + e)];
          }
      }
      EXPECT(tok == ref);
      // unpatchify_vec_kernel: unit k writes imgs[n, c, y, x0 + e] = tokens[n, l, d0 + e*C + c]
      const TokenStrides ts{L * D, D, 1};
      const int64_t uunits = N * H * (W / G);
      EXPECT(uunits * G * C == N * C * H * W);
      std::vector<int64_t> back(N * C * H * W, -1);
      for (int64_t k = 0; k < uunits; ++k) {
        int64_t n, y, x0, l, d0;
        unpatchify_run(g, G, k, n, y, x0, l, d0);
        EXPECT(x0 % G == 0 && d0 % G == 0);
        for (int64_t c = 0; c < C; ++c)
          for (int64_t e = 0; e < G; ++e) {
            int64_t& o = back[((n * C + c) * H + y) * W + x0 + e];
            EXPECT(o == -1);
            o = ref[token_offset(ts, n, l, d0 + e * C + c)];
          }
      }
      EXPECT(back == img);
    }
  }
  std::printf("%d cases, %d failures\n", cases, bad);
  return bad != 0 || cases == 0;
}
"""


@pytest.mark.skipif(CXX is None, reason="no C++ compiler")
def test_vector_path_index_math(tmp_path):
    (tmp_path / "common.h").write_text(STUB)
    src = tmp_path / "indexmath.cpp"
    src.write_text(PROGRAM)
    exe = tmp_path / "indexmath"
    # the stub directory first: patchify.h's #include "common.h" finds the stub, not ATen's
    subprocess.run([CXX, "-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror", f"-I{tmp_path}", f"-I{CSRC}",
                    str(src), "-o", str(exe)], check=True, capture_output=True, text=True)
    run = subprocess.run([str(exe)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert " 0 failures" in run.stdout
