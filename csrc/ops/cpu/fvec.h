// 8-lane fp32 vectors for the CPU twins' row loops, as GCC / Clang vector extensions: one ymm
// register where the loop is compiled for AVX2 (FASTMAE_TARGET_AVX2, common.h), two xmm in the
// baseline build; the compiler emits the instructions of whichever target the loop is built for,
// with no intrinsics and no reliance on its auto-vectoriser. Loads and stores are unaligned
// (memcpy, one vmovups).
//
// Row sums. A sum carried in one vector waits for its previous add or FMA at every step (3-4
// cycles), while the CPU could issue two a cycle: the row loops keep 32 independent lanes
// (Sum32: four vectors; element i of a 32-element block goes to lane i % 32, the rest of the
// row, 8 at a time, to lanes 0-7, then a scalar tail) and combine them at the end in one fixed
// tree. The order depends only on the row length: the same in every build and on every run.
//
// Storage dtypes. vload / vstore (and sload / sstore, one element) take fp32 or bf16 rows:
// bf16 is widened by a shift and rounded to nearest even in registers (rowio.h's rule, the
// bits of torch's conversion), and a store returns the value it stored as fp32, so that a loop
// can go on with the rounded value without reading it back. fp16 rows go through rowio.h.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>

#include "common.h"
#include "rowio.h"

#if !defined(__GNUC__) && !defined(__clang__)
#error "fastmae's CPU kernels need GCC or Clang (vector extensions, csrc/ops/cpu/fvec.h)"
#endif

// A vector passed or returned by value has another ABI in a build with AVX than in one
// without, which GCC notes at every such function (-Wpsabi, an error under -Werror). The row
// loops inline these helpers into one build's entry point, and no call crosses builds: the
// note is off in every file that includes this header.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace fastmae {
namespace cpu {

typedef float f32x8 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));
typedef uint16_t u16x8 __attribute__((vector_size(16)));
constexpr int kVecLanes = 8;
constexpr int kSumLanes = 32;  // four vectors
using bf16 = c10::BFloat16;

FASTMAE_ALWAYS_INLINE f32x8 vsplat(float f) { return f32x8{f, f, f, f, f, f, f, f}; }  // -0 stays -0

FASTMAE_ALWAYS_INLINE f32x8 vload(const float* p) {
  f32x8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
FASTMAE_ALWAYS_INLINE f32x8 vstore(float* p, const f32x8& v) {
  std::memcpy(p, &v, sizeof v);
  return v;
}
FASTMAE_ALWAYS_INLINE float sload(const float* p) { return *p; }
FASTMAE_ALWAYS_INLINE float sstore(float* p, float v) { return *p = v; }

// (Casts between vector types of one size reinterpret the bits; __builtin_convertvector converts
// lane values.)
FASTMAE_ALWAYS_INLINE f32x8 vload(const bf16* p) {
  u16x8 h;
  std::memcpy(&h, p, sizeof h);
  return (f32x8)(__builtin_convertvector(h, u32x8) << 16);
}
// f32_to_bf16_rne on 8 lanes: u + 0x7fff + lsb, the top half; a NaN keeps its top half with
// the quiet bit set.
FASTMAE_ALWAYS_INLINE f32x8 vstore(bf16* p, const f32x8& v) {
  const u32x8 u = (u32x8)v, hi = u >> 16;
  const i32x8 nan = (i32x8)(u & 0x7fffffffu) > 0x7f800000;
  const u32x8 top = nan ? (hi | 0x40u) : (u + 0x7fffu + (hi & 1u)) >> 16;
  const u16x8 h = __builtin_convertvector(top, u16x8);
  std::memcpy(p, &h, sizeof h);
  return (f32x8)(top << 16);
}
FASTMAE_ALWAYS_INLINE float sload(const bf16* p) { return static_cast<float>(*p); }
FASTMAE_ALWAYS_INLINE float sstore(bf16* p, float v) {
  const uint16_t h = f32_to_bf16_rne(v);
  std::memcpy(p, &h, sizeof h);
  return sload(p);
}

// 32 running sums; total() combines them in a fixed tree.
struct Sum32 {
  f32x8 lane[4] = {};
  FASTMAE_ALWAYS_INLINE float total() const {
    const f32x8 t = (lane[0] + lane[2]) + (lane[1] + lane[3]);
    float e[kVecLanes];
    std::memcpy(e, &t, sizeof e);
    return ((e[0] + e[4]) + (e[2] + e[6])) + ((e[1] + e[5]) + (e[3] + e[7]));
  }
};

}  // namespace cpu
}  // namespace fastmae
