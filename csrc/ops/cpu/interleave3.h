// Shared by the C++ twins that move image pixels into patch tokens and back (patchify,
// unpatchify, the loss's target gather): three channel rows of fp32 pixels interleaved into
// (or out of) a token's channel-innermost run, 4 pixels (12 elements) at a time with SSE
// shuffles, which every x86-64 CPU has, or 8 pixels (24 elements) with AVX2 (the *_avx2
// versions: for callers compiled with FASTMAE_TARGET_AVX2 that checked cpu_has_avx2_fma(), see
// common.h). FASTMAE_CPU_SSE / FASTMAE_CPU_AVX2 are 0 elsewhere (aarch64: the callers' scalar
// loops). FASTMAE_PREFETCH hints the next run's rows into cache.
#pragma once

#include "common.h"

#if defined(__x86_64__) && defined(__SSE2__)
#include <xmmintrin.h>
#define FASTMAE_CPU_SSE 1
#else
#define FASTMAE_CPU_SSE 0
#endif

// AVX2 variants (8 pixels, 24 elements), compiled with FASTMAE_TARGET_AVX2 and only called from
// functions compiled for AVX2 too, after fastmae::cpu_has_avx2_fma(): where common.h has the
// x86 target builds (GCC / clang on x86-64).
#define FASTMAE_CPU_AVX2 FASTMAE_X86_TARGETS
#if FASTMAE_CPU_AVX2
#include <immintrin.h>
#endif

#if defined(__GNUC__) || defined(__clang__)
#define FASTMAE_PREFETCH(ptr) __builtin_prefetch(ptr)
#else
#define FASTMAE_PREFETCH(ptr) ((void)0)
#endif

namespace fastmae {
namespace cpu {

#if FASTMAE_CPU_SSE
// (x0..x3), (y0..y3), (z0..z3) -> x0 y0 z0 x1 | y1 z1 x2 y2 | z2 x3 y3 z3 at o[0, 12)
inline void interleave3(const float* a, const float* b, const float* c, float* o) {
  const __m128 x = _mm_loadu_ps(a), y = _mm_loadu_ps(b), z = _mm_loadu_ps(c);
  const __m128 xy_lo = _mm_unpacklo_ps(x, y);  // x0 y0 x1 y1
  const __m128 xy_hi = _mm_unpackhi_ps(x, y);  // x2 y2 x3 y3
  const __m128 t0 = _mm_shuffle_ps(z, xy_lo, _MM_SHUFFLE(2, 2, 0, 0));      // z0 z0 x1 x1
  const __m128 t1 = _mm_shuffle_ps(xy_lo, z, _MM_SHUFFLE(1, 1, 3, 3));      // y1 y1 z1 z1
  const __m128 t2 = _mm_shuffle_ps(xy_hi, z, _MM_SHUFFLE(3, 2, 3, 2));      // x3 y3 z2 z3
  _mm_storeu_ps(o, _mm_shuffle_ps(xy_lo, t0, _MM_SHUFFLE(2, 0, 1, 0)));     // x0 y0 z0 x1
  _mm_storeu_ps(o + 4, _mm_shuffle_ps(t1, xy_hi, _MM_SHUFFLE(1, 0, 2, 0)));  // y1 z1 x2 y2
  _mm_storeu_ps(o + 8, _mm_shuffle_ps(t2, t2, _MM_SHUFFLE(3, 1, 0, 2)));     // z2 x3 y3 z3
}

// the inverse: o[0, 12) = x0 y0 z0 x1 | y1 z1 x2 y2 | z2 x3 y3 z3 -> (x0..x3), (y0..y3), (z0..z3)
inline void deinterleave3(const float* in, float* a, float* b, float* c) {
  const __m128 v0 = _mm_loadu_ps(in), v1 = _mm_loadu_ps(in + 4), v2 = _mm_loadu_ps(in + 8);
  const __m128 x23 = _mm_shuffle_ps(v1, v2, _MM_SHUFFLE(1, 1, 2, 2));  // x2 x2 x3 x3
  const __m128 y01 = _mm_shuffle_ps(v0, v1, _MM_SHUFFLE(0, 0, 1, 1));  // y0 y0 y1 y1
  const __m128 y23 = _mm_shuffle_ps(v1, v2, _MM_SHUFFLE(2, 2, 3, 3));  // y2 y2 y3 y3
  const __m128 z01 = _mm_shuffle_ps(v0, v1, _MM_SHUFFLE(1, 1, 2, 2));  // z0 z0 z1 z1
  _mm_storeu_ps(a, _mm_shuffle_ps(v0, x23, _MM_SHUFFLE(2, 0, 3, 0)));   // x0 x1 x2 x3
  _mm_storeu_ps(b, _mm_shuffle_ps(y01, y23, _MM_SHUFFLE(2, 0, 2, 0)));  // y0 y1 y2 y3
  _mm_storeu_ps(c, _mm_shuffle_ps(z01, v2, _MM_SHUFFLE(3, 0, 2, 0)));   // z0 z1 z2 z3
}
#endif

#if FASTMAE_CPU_AVX2
// The 8-pixel versions. In the interleaved run v0 v1 v2 (lanes 0..7 each), channel a's pixels
// sit at lanes {0,3,6} of v0, {1,4,7} of v1, {2,5} of v2; b's at {1,4,7}, {2,5}, {0,3,6}; c's
// at {2,5}, {0,3,6}, {1,4,7}: the three lane sets are disjoint, so two blends gather a
// channel's 8 pixels into one register (in a fixed lane order) and one cross-lane permute puts
// them in pixel order; interleaving runs the same steps backwards.
FASTMAE_TARGET_AVX2 inline void interleave3_avx2(const float* a, const float* b, const float* c, float* o) {
  // pixel k of each channel moved to the lane it takes in the blends below
  const __m256 x = _mm256_permutevar8x32_ps(_mm256_loadu_ps(a), _mm256_setr_epi32(0, 3, 6, 1, 4, 7, 2, 5));
  const __m256 y = _mm256_permutevar8x32_ps(_mm256_loadu_ps(b), _mm256_setr_epi32(5, 0, 3, 6, 1, 4, 7, 2));
  const __m256 z = _mm256_permutevar8x32_ps(_mm256_loadu_ps(c), _mm256_setr_epi32(2, 5, 0, 3, 6, 1, 4, 7));
  _mm256_storeu_ps(o, _mm256_blend_ps(_mm256_blend_ps(x, y, 0x92), z, 0x24));       // x0 y0 z0 x1 y1 z1 x2 y2
  _mm256_storeu_ps(o + 8, _mm256_blend_ps(_mm256_blend_ps(x, y, 0x24), z, 0x49));   // z2 x3 y3 z3 x4 y4 z4 x5
  _mm256_storeu_ps(o + 16, _mm256_blend_ps(_mm256_blend_ps(x, y, 0x49), z, 0x92));  // y5 z5 x6 y6 z6 x7 y7 z7
}

// the inverse: in[0, 24) -> (x0..x7), (y0..y7), (z0..z7)
FASTMAE_TARGET_AVX2 inline void deinterleave3_avx2(const float* in, float* a, float* b, float* c) {
  const __m256 v0 = _mm256_loadu_ps(in), v1 = _mm256_loadu_ps(in + 8), v2 = _mm256_loadu_ps(in + 16);
  const __m256 x = _mm256_blend_ps(_mm256_blend_ps(v0, v1, 0x92), v2, 0x24);  // x0 x3 x6 x1 x4 x7 x2 x5
  const __m256 y = _mm256_blend_ps(_mm256_blend_ps(v0, v1, 0x24), v2, 0x49);  // y5 y0 y3 y6 y1 y4 y7 y2
  const __m256 z = _mm256_blend_ps(_mm256_blend_ps(v0, v1, 0x49), v2, 0x92);  // z2 z5 z0 z3 z6 z1 z4 z7
  _mm256_storeu_ps(a, _mm256_permutevar8x32_ps(x, _mm256_setr_epi32(0, 3, 6, 1, 4, 7, 2, 5)));
  _mm256_storeu_ps(b, _mm256_permutevar8x32_ps(y, _mm256_setr_epi32(1, 4, 7, 2, 5, 0, 3, 6)));
  _mm256_storeu_ps(c, _mm256_permutevar8x32_ps(z, _mm256_setr_epi32(2, 5, 0, 3, 6, 1, 4, 7)));
}
#endif

}  // namespace cpu
}  // namespace fastmae
