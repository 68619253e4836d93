// Random masking and the fused encoder input on CUDA tensors, in one kernel (the CPU twins are
// in cpu/masking_kernel.cpp).
//
// Grid (N, S): S blocks a sample, each owning a slice of the sample's output rows. Every block
// first ranks its sample's L tokens in shared memory: the (noise key, index) pairs of
// ops/masking.h are loaded once, and rank[i] = #{j : (key_j, j) < (key_i, i)} is counted by the
// block's threads (O(L^2) compares a block, ~38k for ViT-B's L = 196: far cheaper than the
// row copies; this is the stable order of the reference's argsort, so ranks are exact). The
// kept tokens' indices land in shared memory (ids_keep[rank] = i, a permutation), and block 0
// of the sample writes ids_restore and the mask. After one barrier each block gathers its rows:
// row 0 = cls_token + pos[0], row 1 + t = x[ids_keep[t]] + pos[1 + ids_keep[t]] (random_masking:
// a plain gather), added in float for fp16/bf16 and rounded once, as torch adds, with 16-byte
// vector loads and stores when the rows allow it. Redundant ranking (S blocks a sample) buys a
// grid as wide as the data without a second launch.
#include <ATen/OpMathType.h>
#include <ATen/ops/add.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "ops/masking.h"
#include "ops/unshuffle.h"

namespace fastmae {
namespace masking {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t, typename noise_t>
__global__ void encoder_input_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ pos,
                                     const scalar_t* __restrict__ cls_a, const scalar_t* __restrict__ cls_b,
                                     const noise_t* __restrict__ noise, scalar_t* __restrict__ out,
                                     float* __restrict__ mask, int64_t* __restrict__ ids_restore, int64_t L,
                                     int64_t D, int64_t len_keep, int64_t num_prefix, int64_t sxn, int64_t sxl,
                                     int64_t snn, int64_t snl, int64_t rows_per_block, bool vec_ok) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ int64_t smem[];
  int64_t* keys = smem;                                   // L keys
  int32_t* keep = reinterpret_cast<int32_t*>(smem + L);  // len_keep kept token indices, in order
  const int64_t n = blockIdx.x;
  for (int64_t j = threadIdx.x; j < L; j += blockDim.x) keys[j] = key_of<noise_t>(noise[n * snn + j * snl]);
  __syncthreads();
  for (int64_t i = threadIdx.x; i < L; i += blockDim.x) {
    const int64_t ki = keys[i];
    int64_t rank = 0;
    for (int64_t j = 0; j < L; ++j) rank += before(keys[j], j, ki, i) ? 1 : 0;
    if (rank < len_keep) keep[rank] = static_cast<int32_t>(i);
    if (blockIdx.y == 0) {
      ids_restore[n * L + i] = rank;
      mask[n * L + i] = rank >= len_keep ? 1.0f : 0.0f;
    }
  }
  __syncthreads();

  const int64_t T = num_prefix + len_keep;
  const int64_t r0 = blockIdx.y * rows_per_block, r1 = min(T, r0 + rows_per_block);
  constexpr int V = Vec16<scalar_t>::kSize;
  const int64_t per_row = vec_ok ? D / V : D;
  for (int64_t k = threadIdx.x; k < (r1 - r0) * per_row; k += blockDim.x) {
    const int64_t t = r0 + k / per_row, c = k % per_row;
    scalar_t* o = out + (n * T + t) * D;
    const scalar_t* a;
    const scalar_t* b;
    if (t < num_prefix) {  // the cls row
      a = cls_a;
      b = cls_b;
    } else {
      const int64_t j = keep[t - num_prefix];
      a = x + n * sxn + j * sxl;
      b = pos == nullptr ? nullptr : pos + (1 + j) * D;
    }
    if (vec_ok) {
      Vec16<scalar_t> va = reinterpret_cast<const Vec16<scalar_t>*>(a)[c];
      if (b != nullptr) {
        const Vec16<scalar_t> vb = reinterpret_cast<const Vec16<scalar_t>*>(b)[c];
#pragma unroll
        for (int e = 0; e < V; ++e) {
          va.v[e] = static_cast<scalar_t>(static_cast<acc_t>(va.v[e]) + static_cast<acc_t>(vb.v[e]));
        }
      }
      reinterpret_cast<Vec16<scalar_t>*>(o)[c] = va;
    } else {
      o[c] = b == nullptr ? a[c] : static_cast<scalar_t>(static_cast<acc_t>(a[c]) + static_cast<acc_t>(b[c]));
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> launch(const at::Tensor& x, const at::Tensor* pos,
                                                      const at::Tensor* cls_a, const at::Tensor* cls_b,
                                                      const at::Tensor& noise, int64_t len_keep, int64_t num_prefix) {
  FASTMAE_CHECK_SAME_DEVICE(x, noise);
  const int64_t N = x.size(0), L = x.size(1), D = x.size(2);
  FASTMAE_CHECK(noise.dim() == 2 && noise.size(0) == N && noise.size(1) == L, "noise must be (N, L)");
  FASTMAE_CHECK(L <= kMaxTokens, "at most ", kMaxTokens, " tokens a sample");
  FASTMAE_CHECK(len_keep >= 1 && len_keep <= L, "len_keep must be in [1, L]");
  // rows dense; a size-1 dim keeps any stride through .contiguous(): D = 1 reads only d = 0
  FASTMAE_CHECK(x.stride(2) == 1 || D <= 1, "x rows must be contiguous");
  at::Tensor out = empty_output({N, num_prefix + len_keep, D}, x.options());
  at::Tensor mask = empty_output({N, L}, x.options().dtype(at::kFloat));
  at::Tensor ids_restore = empty_output({N, L}, x.options().dtype(at::kLong));
  if (N == 0) return {out, mask, ids_restore};  // an empty grid is not a launch CUDA accepts
  const int64_t T = num_prefix + len_keep;
  const int64_t row_bytes = D * x.element_size();
  const int64_t rows_per_block = std::max<int64_t>(1, 16384 / std::max<int64_t>(row_bytes, 1));
  const dim3 grid(static_cast<unsigned>(N), static_cast<unsigned>(ceil_div(T, rows_per_block)));
  const size_t smem = L * sizeof(int64_t) + len_keep * sizeof(int32_t);
  auto stream = at::cuda::getCurrentCUDAStream();
  FASTMAE_DISPATCH_FLOAT(x.scalar_type(), "fastmae_ext::encoder_input", [&] {
    using tok_t = scalar_t;
    const tok_t* xp = x.const_data_ptr<tok_t>();
    const tok_t* pp = pos ? pos->const_data_ptr<tok_t>() : nullptr;
    const tok_t* ca = cls_a ? cls_a->const_data_ptr<tok_t>() : nullptr;
    const tok_t* cb = cls_b ? cls_b->const_data_ptr<tok_t>() : nullptr;
    tok_t* op = out.mutable_data_ptr<tok_t>();
    constexpr int64_t V = Vec16<tok_t>::kSize;
    bool vec_ok = D % V == 0 && x.stride(1) % V == 0 && x.stride(0) % V == 0 && is_aligned16(xp) && is_aligned16(op);
    if (pp) vec_ok = vec_ok && is_aligned16(pp) && is_aligned16(ca) && (cb == nullptr || is_aligned16(cb));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, noise.scalar_type(), "noise", [&] {
      encoder_input_kernel<tok_t, scalar_t><<<grid, kThreads, smem, stream>>>(
          xp, pp, ca, cb, noise.const_data_ptr<scalar_t>(), op, mask.mutable_data_ptr<float>(),
          ids_restore.mutable_data_ptr<int64_t>(), L, D, len_keep, num_prefix, x.stride(0), x.stride(1),
          noise.stride(0), noise.stride(1), rows_per_block, vec_ok);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {out, mask, ids_restore};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> random_masking_cuda(const at::Tensor& x_in, const at::Tensor& noise,
                                                                   int64_t len_keep) {
  FASTMAE_CHECK_DIM(x_in, 3);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.stride(2) == 1 ? x_in : x_in.contiguous();
  return launch(x, nullptr, nullptr, nullptr, noise, len_keep, 0);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> encoder_input_cuda(const at::Tensor& x_in, const at::Tensor& pos_embed,
                                                                  const at::Tensor& cls_token, const at::Tensor& noise,
                                                                  int64_t len_keep) {
  FASTMAE_CHECK_DIM(x_in, 3);
  FASTMAE_CHECK_SAME_DEVICE(x_in, pos_embed);
  FASTMAE_CHECK_SAME_DEVICE(x_in, cls_token);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t L = x_in.size(1), D = x_in.size(2);
  FASTMAE_CHECK(pos_embed.numel() == (1 + L) * D && cls_token.numel() == D, "pos_embed / cls_token shapes");
  const at::ScalarType dtype = c10::promoteTypes(x_in.scalar_type(), pos_embed.scalar_type());
  at::Tensor x = x_in.to(dtype);  // widenings (exact), a copy only for mixed dtypes
  if (x.stride(2) != 1) x = x.contiguous();
  const at::Tensor pos = pos_embed.reshape({1 + L, D}).to(dtype).contiguous();
  const bool same = cls_token.scalar_type() == dtype && pos_embed.scalar_type() == dtype;
  const at::Tensor cls_a = same ? cls_token.reshape({D}).contiguous()
                                : at::add(cls_token.reshape({D}), pos_embed.reshape({1 + L, D})[0]).to(dtype);
  return launch(x, &pos, &cls_a, same ? &pos : nullptr, noise, len_keep, 1);
}

at::Tensor masked_tokens_backward_cuda(const at::Tensor& grad, const at::Tensor& ids_restore, int64_t num_prefix,
                                       at::ScalarType dtype) {
  FASTMAE_CHECK_DIM(grad, 3);
  FASTMAE_CHECK_FLOAT_DTYPE(dtype);
  const int64_t len_keep = grad.size(1) - num_prefix;
  return unshuffle::unshuffle_rows_cuda(grad, ids_restore, len_keep, 0, num_prefix, std::nullopt, std::nullopt, dtype);
}

}  // namespace
}  // namespace masking
}  // namespace fastmae

TORCH_LIBRARY_IMPL(fastmae_ext, CUDA, m) {
  m.impl("random_masking", &fastmae::masking::random_masking_cuda);
  m.impl("encoder_input", &fastmae::masking::encoder_input_cuda);
  m.impl("masked_tokens_backward", &fastmae::masking::masked_tokens_backward_cuda);
}
