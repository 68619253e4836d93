// A CPU emulation of the CUDA C++ that fastmae's kernels use (csrc/ops/cuda/*.cu), for testing
// those kernels on machines without a GPU. Force-included (-include) ahead of each kernel file,
// which tests/_cuda_emu/__init__.py first rewrites a little: `k<<<grid, block, smem, stream>>>(args);` becomes
// `::emu::launch(k, ::emu::Config(grid, block, smem, stream), [&] { k(args); });`,
// `extern __shared__ T name[];` a pointer to the block's dynamic shared memory, the CUDA
// includes the headers of this folder, and each TORCH_LIBRARY_IMPL(fastmae_ext, CUDA, m) a
// fragment of the namespace fastmae_emu with the same functions (schemas inferred).
//
// Execution model (emu.cpp): the blocks of a launch run one after another; the threads of a
// block are fibers on the calling thread, each run until it reaches a barrier.
// __syncthreads releases when every thread of the block that has not returned waits at one;
// a warp collective (__shfl_xor_sync, __syncwarp, mma.sync) when all 32 lanes of the warp wait
// at the same collective, and it is then computed from all the lanes' inputs at once. A lane
// that returned before its warp's collective, a warp split between two collectives or between a
// collective and __syncthreads, or a block whose threads all wait with no barrier to release is
// an error naming the kernel, as are launches CUDA would refuse (an empty grid, gridDim.y or z
// above 65535, more than 1024 threads a block, dynamic shared memory above 48 KB without the
// opt-in attribute or above the card's limit, static and dynamic together above the limit).
// Dynamic shared memory and static __shared__ arrays are filled with 0xff bytes (NaN, -1) before
// each block, and writes past the dynamic memory's end are caught by a guard band. The order in
// which runnable threads are resumed can be reversed or shuffled (emu_set_order), so that a
// result that depends on it (a race between two barriers) shows as a difference between runs.
//
// What it does not model: memory ordering within a phase (a shuffle orders memory here, not on
// a GPU), timing, registers, the caching of __ldg, errors of the real compiler; numerics of
// intrinsics are those of the C library (exp2f, __expf), and the tensor-core product is an fp32
// sum of the exact products in k order.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <type_traits>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __shared__ static

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(8) float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

using cudaStream_t = void*;
using cudaError_t = int;
constexpr cudaError_t cudaSuccess = 0;
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

// ------------------------------------------------------------------------------ fp16 / bf16
struct __half { unsigned short __x; };
struct __nv_bfloat16 { unsigned short __x; };
struct __half2 { __half x, y; };
struct __nv_bfloat162 { __nv_bfloat16 x, y; };
inline __half __float2half_rn(float f) { return {c10::Half(f).x}; }
inline float __half2float(__half h) { return static_cast<float>(c10::Half(h.__x, c10::Half::from_bits())); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return {c10::BFloat16(f).x}; }
inline float __bfloat162float(__nv_bfloat16 h) {
  return static_cast<float>(c10::BFloat16(h.__x, c10::BFloat16::from_bits()));
}
inline __half __ushort_as_half(unsigned short u) { return {u}; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) { return {u}; }
inline __half2 __floats2half2_rn(float lo, float hi) { return {__float2half_rn(lo), __float2half_rn(hi)}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) {
  return {__float2bfloat16_rn(lo), __float2bfloat16_rn(hi)};
}
inline float2 __half22float2(__half2 h) { return {__half2float(h.x), __half2float(h.y)}; }
inline float2 __bfloat1622float2(__nv_bfloat162 h) { return {__bfloat162float(h.x), __bfloat162float(h.y)}; }

// ------------------------------------------------------------------------------ math
inline float __expf(float x) { return std::exp(x); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
template <typename T>
inline T __ldg(const T* p) { return *p; }
template <typename A, typename B>
inline std::common_type_t<A, B> min(A a, B b) { return b < a ? b : a; }
template <typename A, typename B>
inline std::common_type_t<A, B> max(A a, B b) { return a < b ? b : a; }

// ------------------------------------------------------------------------------ runtime
namespace emu {

struct Config {
  dim3 grid, block;
  size_t smem;
  Config(dim3 g, dim3 b, size_t s = 0, cudaStream_t = nullptr) : grid(g), block(b), smem(s) {}
};

extern dim3 g_block_idx, g_block_dim, g_grid_dim;
const dim3& thread_idx();
void* dynamic_smem();

// Runs body once per thread of every block (threadIdx, blockIdx and the rest set for it).
void launch_body(const void* kernel, const char* name, const Config& cfg, const std::function<void()>& body);
template <typename K>
const void* key_of(K* k) { return reinterpret_cast<const void*>(k); }
template <typename K>
void launch(K* kernel, const Config& cfg, const std::function<void()>& body, const char* name = "kernel") {
  launch_body(key_of(kernel), name, cfg, body);
}
void set_max_dynamic_smem(const void* kernel, int bytes);
// A static __shared__ array of the running kernel (the rewrite adds the call after each
// declaration): static and dynamic shared memory together are held to CUDA's limits.
void note_static_smem(const void* array, size_t bytes);
int smem_optin();

// Warp collectives: each lane passes its own operands; the scheduler computes every lane's
// result once all 32 have arrived.
void syncthreads();
void syncwarp(unsigned mask);
uint64_t shfl_xor(unsigned mask, uint64_t bits, int lane_mask, int width);
// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}: c += A B on the warp's fragments.
void mma_m16n8k16(bool bf16, float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

}  // namespace emu

#define threadIdx (::emu::thread_idx())
#define blockIdx (::emu::g_block_idx)
#define blockDim (::emu::g_block_dim)
#define gridDim (::emu::g_grid_dim)

inline void __syncthreads() { ::emu::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { ::emu::syncwarp(mask); }
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "emu: shuffle of a type above 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  bits = ::emu::shfl_xor(mask, bits, lane_mask, width);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

template <typename K>
inline cudaError_t cudaFuncSetAttribute(K* kernel, cudaFuncAttribute attr, int value) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) ::emu::set_max_dynamic_smem(::emu::key_of(kernel), value);
  return cudaSuccess;
}
