// Chunked row access for the CUDA row-wise kernels (LayerNorm, bias + GELU): a chunk of CH
// consecutive elements of a row in its storage dtype (fp32, fp16 or bf16, chosen at run time:
// a warp-uniform branch) <-> CH fp32 registers. CH = 8 uses 16-byte accesses (two for fp32)
// and needs 16-byte aligned chunks; CH = 1 is the scalar fallback for any D and alignment.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <ATen/ATen.h>

#include <cstdint>

namespace fastmae {
namespace cuda {

enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

inline DType dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kF32;
    case at::kHalf: return kF16;
    case at::kBFloat16: return kBF16;
    default: TORCH_CHECK(false, "fastmae_ext: unsupported dtype ", t);
  }
  return kF32;
}

template <int CH>
__device__ __forceinline__ void load_chunk(const void* base, int64_t idx, DType t, float (&v)[CH]) {
  if constexpr (CH == 8) {
    if (t == kF32) {
      const float4* p = reinterpret_cast<const float4*>(static_cast<const float*>(base) + idx);
      const float4 a = __ldg(p), b = __ldg(p + 1);
      v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w; v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
    } else {
      const uint4 u = __ldg(reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(base) + idx));
      const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        if (t == kF16) {
          const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&w[i]));
          v[2 * i] = f.x; v[2 * i + 1] = f.y;
        } else {
          const float2 f = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&w[i]));
          v[2 * i] = f.x; v[2 * i + 1] = f.y;
        }
      }
    }
  } else {
#pragma unroll
    for (int i = 0; i < CH; ++i) {
      if (t == kF32) v[i] = static_cast<const float*>(base)[idx + i];
      else if (t == kF16) v[i] = __half2float(static_cast<const __half*>(base)[idx + i]);
      else v[i] = __bfloat162float(static_cast<const __nv_bfloat16*>(base)[idx + i]);
    }
  }
}

template <int CH>
__device__ __forceinline__ void store_chunk(void* base, int64_t idx, DType t, const float (&v)[CH]) {
  if constexpr (CH == 8) {
    if (t == kF32) {
      float4* p = reinterpret_cast<float4*>(static_cast<float*>(base) + idx);
      p[0] = make_float4(v[0], v[1], v[2], v[3]);
      p[1] = make_float4(v[4], v[5], v[6], v[7]);
    } else {
      uint32_t w[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        if (t == kF16) {
          const __half2 h = __floats2half2_rn(v[2 * i], v[2 * i + 1]);
          w[i] = *reinterpret_cast<const uint32_t*>(&h);
        } else {
          const __nv_bfloat162 h = __floats2bfloat162_rn(v[2 * i], v[2 * i + 1]);
          w[i] = *reinterpret_cast<const uint32_t*>(&h);
        }
      }
      *reinterpret_cast<uint4*>(static_cast<uint16_t*>(base) + idx) = make_uint4(w[0], w[1], w[2], w[3]);
    }
  } else {
#pragma unroll
    for (int i = 0; i < CH; ++i) {
      if (t == kF32) static_cast<float*>(base)[idx + i] = v[i];
      else if (t == kF16) static_cast<__half*>(base)[idx + i] = __float2half_rn(v[i]);
      else static_cast<__nv_bfloat16*>(base)[idx + i] = __float2bfloat16_rn(v[i]);
    }
  }
}

// v rounded to dtype t and back to fp32 (what storing it and loading it again gives).
template <int CH>
__device__ __forceinline__ void round_chunk(DType t, float (&v)[CH]) {
  if (t == kF16) {
#pragma unroll
    for (int i = 0; i < CH; ++i) v[i] = __half2float(__float2half_rn(v[i]));
  } else if (t == kBF16) {
#pragma unroll
    for (int i = 0; i < CH; ++i) v[i] = __bfloat162float(__float2bfloat16_rn(v[i]));
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// True when every pointer is 16-byte aligned and rows of D elements keep chunks of 8 aligned.
inline bool can_vectorise(int64_t D, std::initializer_list<const at::Tensor*> ts) {
  if (D % 8 != 0) return false;
  for (const at::Tensor* t : ts)
    if (t && t->defined() && t->numel() > 0 && reinterpret_cast<uintptr_t>(t->const_data_ptr()) % 16 != 0)
      return false;
  return true;
}

namespace {
// Column sums of part (P, C) -> red (C): a block of 32 columns x 8 row groups; each thread
// sums its group's rows in order, then the 8 groups are added in order. Deterministic.
__global__ void __launch_bounds__(256) column_sum_kernel(const float* part, float* red, int P, int C) {
  __shared__ float acc[8][33];
  const int col = blockIdx.x * 32 + (threadIdx.x & 31), grp = threadIdx.x >> 5;
  float t = 0.0f;
  if (col < C)
    for (int p = grp; p < P; p += 8) t += part[static_cast<int64_t>(p) * C + col];
  acc[grp][threadIdx.x & 31] = t;
  __syncthreads();
  if (grp == 0 && col < C) {
    float r = 0.0f;
#pragma unroll
    for (int g = 0; g < 8; ++g) r += acc[g][threadIdx.x];
    red[col] = r;
  }
}
}  // namespace

}  // namespace cuda
}  // namespace fastmae
