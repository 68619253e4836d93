// Shared by every op of fastmae._C: host/device qualifiers, dtype dispatch, 16-byte vectors,
// argument checks. Included by the C++ (CPU) and the CUDA sources alike.
#pragma once

// The per-operator headers, not ATen/ATen.h: a fraction of the compile time
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>

// Index math shared by a CUDA kernel and its CPU twin lives in csrc/ops/<op>.h as FASTMAE_HD
// functions: host-and-device when nvcc compiles them, plain inline C++ otherwise.
#if defined(__CUDACC__)
#define FASTMAE_HD __host__ __device__ __forceinline__
#else
#define FASTMAE_HD inline
#endif

// The float dtypes fastmae's kernels take: fp32, fp64, fp16, bf16. `scalar_t` in the body.
#define FASTMAE_DISPATCH_FLOAT(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

// Dispatch on an (input, output) dtype pair for kernels that cast on the way: the same dtype,
// or fp16/bf16 <-> fp32 (mixed precision). `in_t` and `out_t` in the body. Other pairs are
// not instantiated (compile time): `dispatched` is set to false and the caller converts.
#define FASTMAE_DISPATCH_CAST_PAIR(IN, OUT, dispatched, NAME, ...)                              \
  do {                                                                                          \
    dispatched = true;                                                                          \
    if ((IN) == (OUT)) {                                                                        \
      FASTMAE_DISPATCH_FLOAT(IN, NAME, [&] {                                                   \
        using in_t = scalar_t;                                                                  \
        using out_t = scalar_t;                                                                 \
        __VA_ARGS__();                                                                          \
      });                                                                                       \
    } else if ((OUT) == at::kFloat && ((IN) == at::kHalf || (IN) == at::kBFloat16)) {           \
      AT_DISPATCH_REDUCED_FLOATING_TYPES(IN, NAME, [&] {                                        \
        using in_t = scalar_t;                                                                  \
        using out_t = float;                                                                    \
        __VA_ARGS__();                                                                          \
      });                                                                                       \
    } else if ((IN) == at::kFloat && ((OUT) == at::kHalf || (OUT) == at::kBFloat16)) {          \
      AT_DISPATCH_REDUCED_FLOATING_TYPES(OUT, NAME, [&] {                                       \
        using in_t = float;                                                                     \
        using out_t = scalar_t;                                                                 \
        __VA_ARGS__();                                                                          \
      });                                                                                       \
    } else {                                                                                    \
      dispatched = false;                                                                       \
    }                                                                                           \
  } while (0)

// Argument checks: the public Python entry point (fastmae.ops) validates user input with
// clear errors; these only guard the C++ ops against misuse through torch.ops directly.
#define FASTMAE_CHECK(cond, ...) TORCH_CHECK(cond, "fastmae_ext: ", __VA_ARGS__)
#define FASTMAE_CHECK_DIM(t, d) FASTMAE_CHECK((t).dim() == (d), #t " must have " #d " dims, got ", (t).dim())
#define FASTMAE_CHECK_FLOAT(t) FASTMAE_CHECK(at::isFloatingType((t).scalar_type()), #t " must be floating point")
#define FASTMAE_CHECK_SAME_DEVICE(a, b) \
  FASTMAE_CHECK((a).device() == (b).device(), #a " and " #b " must be on one device")
// A dtype argument (out_dtype, x_dtype, ...): one of the float dtypes FASTMAE_DISPATCH_FLOAT
// takes (not float8 / float4, which isFloatingType also names), the same check and message on
// every device.
#define FASTMAE_CHECK_FLOAT_DTYPE(dt) ::fastmae::check_float_dtype((dt), #dt)

namespace fastmae {
inline void check_float_dtype(at::ScalarType t, const char* name) {
  FASTMAE_CHECK(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16, name,
                " must be float32, float64, float16 or bfloat16, got ", t);
}

// An optional out_dtype argument: the dtype it names (checked as above), else t's.
inline at::ScalarType out_type(const at::Tensor& t, std::optional<at::ScalarType> out_dtype) {
  if (!out_dtype.has_value()) return t.scalar_type();
  check_float_dtype(*out_dtype, "out_dtype");
  return *out_dtype;
}
}  // namespace fastmae

// CPU kernels: the build targets baseline x86-64 (SSE2) or aarch64, so that one wheel runs
// anywhere. On x86-64 a hot loop may be compiled a second time for AVX2+FMA (and a third for
// AVX-512) and picked at run time: write the body once as an always-inline template, then thin
// entry points,
//
//   FASTMAE_TARGET_AVX2 void rows_avx2(...) { rows_body(...); }   // compiled for AVX2+FMA
//   void rows_base(...) { rows_body(...); }                         // baseline
//   ... if (fastmae::cpu_has_avx2_fma()) rows_avx2(...); else rows_base(...);
//
// The target attribute does not reach into lambdas: call the entry point from inside
// at::parallel_for's lambda, not at::parallel_for from inside the entry point. Elsewhere
// (aarch64, MSVC) the target macros are empty and the CPU's level is 0.
//
// Levels: 0 baseline, 1 AVX2 + FMA (+ F16C, which every AVX2 CPU has), 2 AVX-512 F/DQ/BW/VL
// (with the rest). cpu_isa_level() is the best level this CPU has, capped by cpu_isa_cap(): the
// private op fastmae_ext::_cpu_isa_cap (csrc/ops/cpu_isa.cpp) lowers it so that the tests run
// every build of every kernel against its oracle. cpu_has_avx2_fma() / cpu_has_avx512() answer for the capped level: ask them per
// call (never cache the answer in a static), so that the cap reaches every kernel.
namespace fastmae {
int cpu_isa_cap();  // 2 unless the tests lowered it
}  // namespace fastmae

#if !defined(__CUDACC__) && defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FASTMAE_X86_TARGETS 1
#define FASTMAE_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define FASTMAE_TARGET_AVX512 __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma,f16c")))
#define FASTMAE_ALWAYS_INLINE inline __attribute__((always_inline))
namespace fastmae {
inline int cpu_isa_detected() {
  static const int level = [] {
    if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma") || !__builtin_cpu_supports("f16c")) return 0;
    const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
                        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
    return avx512 ? 2 : 1;
  }();
  return level;
}
}  // namespace fastmae
#else
#define FASTMAE_X86_TARGETS 0
#define FASTMAE_TARGET_AVX2
#define FASTMAE_TARGET_AVX512
#define FASTMAE_ALWAYS_INLINE inline
namespace fastmae {
inline int cpu_isa_detected() { return 0; }
}  // namespace fastmae
#endif

namespace fastmae {
inline int cpu_isa_level() {
  const int cap = cpu_isa_cap(), cpu = cpu_isa_detected();
  return cap < cpu ? cap : cpu;
}
inline bool cpu_has_avx2_fma() { return cpu_isa_level() >= 1; }
inline bool cpu_has_avx512() { return cpu_isa_level() >= 2; }
}  // namespace fastmae

namespace fastmae {

// A 16-byte vector of T (4 floats, 8 halves, 2 doubles): one LDG.128 / STG.128 on a GPU.
template <typename T>
struct alignas(16) Vec16 {
  static constexpr int kSize = 16 / sizeof(T);
  T v[kSize];
};

FASTMAE_HD bool is_aligned16(const void* p) { return (reinterpret_cast<std::uintptr_t>(p) & 15) == 0; }

// Whether rows of `row_elems` elements of T starting at `base`, `row_stride` elements apart,
// can all be accessed as 16-byte vectors.
template <typename T>
FASTMAE_HD bool rows_vectorizable(const T* base, int64_t row_elems, int64_t row_stride) {
  constexpr int64_t v = Vec16<T>::kSize;
  return is_aligned16(base) && row_elems % v == 0 && row_stride % v == 0;
}

FASTMAE_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Kernel outputs are allocated through empty_output: when the tests switch poisoning on
// (fastmae._library.poisoned_outputs, forwarded by fastmae.ext), outputs start as NaN (floats)
// or -1 (integers), so an element a kernel fails to write fails its test. Defined in
// csrc/ops/poison.cpp.
bool poison_outputs();
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options);

}  // namespace fastmae
