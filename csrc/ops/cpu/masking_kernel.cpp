// Random masking and the fused encoder input on CPU tensors: the C++ twins of
// cuda/masking_kernel.cu.
//
// One task per sample, in one parallel region a call: the sample's (noise key, index) pairs of
// ops/masking.h sorted, which is the reference's stable argsort, giving ids_restore (the
// ranks), the mask and the kept tokens in order; then the sample's output rows: row 0 =
// cls_token + pos[0], row 1 + t = x[ids_keep[t]] + pos[1 + ids_keep[t]], added as torch adds
// (in float for fp16/bf16, rounded once).
#include <ATen/OpMathType.h>
#include <ATen/ops/add.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include "ops/masking.h"
#include "ops/unshuffle.h"

namespace fastmae {
namespace masking {
namespace {

// Sample n's stable order of (noise key, index), written out: ids_restore[n, token] = its rank,
// mask[n, token] = rank >= len_keep, ids_keep[n, rank] = token for the kept ranks. Keys of
// fp16/bf16/fp32 noise fit 32 bits: (key, index) packs into one uint64 (the key's signed order
// made unsigned in the high half, the index in the low half), whose plain order is the
// (key, index) order; fp64 keys sort as (key, index) pairs.
struct ShufflePtrs {
  int64_t* ids_keep;
  float* mask;
  int64_t* ids_restore;
  int64_t L, len_keep;
  void write(int64_t n, int64_t r, int64_t j) const {
    ids_restore[n * L + j] = r;
    mask[n * L + j] = r >= len_keep ? 1.0f : 0.0f;
    if (r < len_keep) ids_keep[n * len_keep + r] = j;
  }
};

template <typename noise_t>
void sort_sample(const at::Tensor& noise, int64_t n, const ShufflePtrs& o, std::vector<uint64_t>& keys) {
  const int64_t L = o.L, sn = noise.stride(0), sl = noise.stride(1);
  const noise_t* u = noise.const_data_ptr<noise_t>() + n * sn;
  if constexpr (std::is_same_v<noise_t, double>) {
    std::vector<std::pair<int64_t, int64_t>> pairs(L);
    for (int64_t j = 0; j < L; ++j) pairs[j] = {key_of<noise_t>(u[j * sl]), j};
    std::sort(pairs.begin(), pairs.end(),
              [](const auto& a, const auto& b) { return before(a.first, a.second, b.first, b.second); });
    for (int64_t r = 0; r < L; ++r) o.write(n, r, pairs[r].second);
  } else {
    keys.resize(L);
    for (int64_t j = 0; j < L; ++j) {
      const uint32_t k = static_cast<uint32_t>(key_of<noise_t>(u[j * sl])) ^ 0x80000000u;
      keys[j] = (static_cast<uint64_t>(k) << 32) | static_cast<uint64_t>(j);
    }
    std::sort(keys.begin(), keys.end());
    for (int64_t r = 0; r < L; ++r) o.write(n, r, static_cast<int64_t>(keys[r] & 0xFFFFFFFFu));
  }
}

using SortFn = void (*)(const at::Tensor&, int64_t, const ShufflePtrs&, std::vector<uint64_t>&);

SortFn sorter(at::ScalarType noise_dtype) {
  SortFn f = nullptr;
  FASTMAE_DISPATCH_FLOAT(noise_dtype, "fastmae_ext::shuffle", [&] { f = &sort_sample<scalar_t>; });
  return f;
}

// ids_keep (N, len_keep) int64, mask (N, L) float32, ids_restore (N, L) int64
struct Shuffle {
  at::Tensor ids_keep, mask, ids_restore;
  ShufflePtrs ptrs() {
    return {ids_keep.mutable_data_ptr<int64_t>(), mask.mutable_data_ptr<float>(),
            ids_restore.mutable_data_ptr<int64_t>(), mask.size(1), ids_keep.size(1)};
  }
};

Shuffle alloc_shuffle(const at::Tensor& noise, int64_t len_keep) {
  FASTMAE_CHECK_DIM(noise, 2);
  FASTMAE_CHECK_FLOAT(noise);
  const int64_t N = noise.size(0), L = noise.size(1);
  FASTMAE_CHECK(len_keep >= 1 && len_keep <= L, "len_keep must be in [1, L]");
  return {at::empty({N, len_keep}, noise.options().dtype(at::kLong)),
          empty_output({N, L}, noise.options().dtype(at::kFloat)),
          empty_output({N, L}, noise.options().dtype(at::kLong))};
}

// One task per sample, one parallel region a call: the sample's sort (its ids_keep), then its
// output rows out[n, P + t] = x[n, ids_keep[n, t]] (+ pos[1 + ids_keep[n, t]]), and out[n, 0] =
// cls_row when P = 1.
template <typename scalar_t>
void mask_and_gather(const at::Tensor& noise, Shuffle& s, const at::Tensor& x, const scalar_t* pos,
                     const scalar_t* cls_a, const scalar_t* cls_b, at::Tensor& out, int64_t P) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = x.size(0), D = x.size(2), K = s.ids_keep.size(1), T = P + K;
  const int64_t sxn = x.stride(0), sxl = x.stride(1);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const ShufflePtrs sp = s.ptrs();
  const SortFn sort = sorter(noise.scalar_type());
  scalar_t* o = out.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint64_t> keys;
    for (int64_t n = begin; n < end; ++n) {
      sort(noise, n, sp, keys);
      const int64_t* keep = sp.ids_keep + n * K;
      for (int64_t t = 0; t < T; ++t) {
        scalar_t* dst = o + (n * T + t) * D;
        if (t < P) {  // the cls row
          for (int64_t d = 0; d < D; ++d) {
            dst[d] = cls_b ? static_cast<scalar_t>(static_cast<acc_t>(cls_a[d]) + static_cast<acc_t>(cls_b[d]))
                           : cls_a[d];
          }
          continue;
        }
        const int64_t j = keep[t - P];
        const scalar_t* src = xp + n * sxn + j * sxl;
        if (pos == nullptr) {
          std::copy(src, src + D, dst);
        } else {
          const scalar_t* pr = pos + (1 + j) * D;
          for (int64_t d = 0; d < D; ++d) {
            dst[d] = static_cast<scalar_t>(static_cast<acc_t>(src[d]) + static_cast<acc_t>(pr[d]));
          }
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> random_masking_cpu(const at::Tensor& x_in, const at::Tensor& noise,
                                                                  int64_t len_keep) {
  FASTMAE_CHECK_DIM(x_in, 3);
  FASTMAE_CHECK(noise.size(0) == x_in.size(0) && noise.size(1) == x_in.size(1), "noise must be (N, L)");
  const at::Tensor x = x_in.stride(2) == 1 ? x_in : x_in.contiguous();
  Shuffle s = alloc_shuffle(noise, len_keep);
  at::Tensor out = empty_output({x.size(0), len_keep, x.size(2)}, x.options());
  FASTMAE_DISPATCH_FLOAT(x.scalar_type(), "fastmae_ext::random_masking", [&] {
    mask_and_gather<scalar_t>(noise, s, x, nullptr, nullptr, nullptr, out, 0);
  });
  return {out, s.mask, s.ids_restore};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> encoder_input_cpu(const at::Tensor& x_in, const at::Tensor& pos_embed,
                                                                 const at::Tensor& cls_token, const at::Tensor& noise,
                                                                 int64_t len_keep) {
  FASTMAE_CHECK_DIM(x_in, 3);
  const int64_t N = x_in.size(0), L = x_in.size(1), D = x_in.size(2);
  FASTMAE_CHECK(noise.size(0) == N && noise.size(1) == L, "noise must be (N, L)");
  FASTMAE_CHECK(pos_embed.numel() == (1 + L) * D && cls_token.numel() == D, "pos_embed / cls_token shapes");
  const at::ScalarType dtype = c10::promoteTypes(x_in.scalar_type(), pos_embed.scalar_type());
  // widenings (exact): every operand in the tokens' dtype, rows contiguous
  at::Tensor x = x_in.to(dtype);
  if (x.stride(2) != 1) x = x.contiguous();
  const at::Tensor pos = pos_embed.reshape({1 + L, D}).to(dtype).contiguous();
  // the cls row: (cls_token + pos[0]) in promote(cls, pos), then cast, as the reference; in the
  // kernel when all three dtypes agree
  const bool same = cls_token.scalar_type() == dtype && pos_embed.scalar_type() == dtype;
  const at::Tensor cls_a = same ? cls_token.reshape({D}).contiguous()
                                : at::add(cls_token.reshape({D}), pos_embed.reshape({1 + L, D})[0]).to(dtype);
  Shuffle s = alloc_shuffle(noise, len_keep);
  at::Tensor out = empty_output({N, 1 + len_keep, D}, x.options().dtype(dtype));
  FASTMAE_DISPATCH_FLOAT(dtype, "fastmae_ext::encoder_input", [&] {
    const scalar_t* p = pos.const_data_ptr<scalar_t>();
    mask_and_gather<scalar_t>(noise, s, x, p, cls_a.const_data_ptr<scalar_t>(), same ? p : nullptr, out, 1);
  });
  return {out, s.mask, s.ids_restore};
}

at::Tensor masked_tokens_backward_cpu(const at::Tensor& grad, const at::Tensor& ids_restore, int64_t num_prefix,
                                      at::ScalarType dtype) {
  FASTMAE_CHECK_DIM(grad, 3);
  FASTMAE_CHECK_FLOAT_DTYPE(dtype);
  const int64_t len_keep = grad.size(1) - num_prefix;
  return unshuffle::unshuffle_rows_cpu(grad, ids_restore, len_keep, 0, num_prefix, std::nullopt, std::nullopt, dtype);
}

}  // namespace
}  // namespace masking
}  // namespace fastmae

TORCH_LIBRARY_IMPL(fastmae_ext, CPU, m) {
  m.impl("random_masking", &fastmae::masking::random_masking_cpu);
  m.impl("encoder_input", &fastmae::masking::encoder_input_cpu);
  m.impl("masked_tokens_backward", &fastmae::masking::masked_tokens_backward_cpu);
}
