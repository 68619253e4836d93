// Random masking and the fused encoder input: the schemas (CPU kernels in
// cpu/masking_kernel.cpp, CUDA kernels in cuda/masking_kernel.cu, autograd and fake tensors in
// fastmae/ext/masking.py). The noise is given (fastmae.ext draws torch.rand when the caller
// gives none, as the reference does); len_keep = int(L * (1 - mask_ratio)), from fastmae.ops.
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(fastmae_ext, m) {
  // -> (x_masked (N, len_keep, D), mask (N, L) float32, ids_restore (N, L) int64)
  m.def("random_masking(Tensor x, Tensor noise, int len_keep) -> (Tensor, Tensor, Tensor)");
  // x + pos_embed[1:], masked, cls_token + pos_embed[0] prepended:
  // -> (tokens (N, 1 + len_keep, D) in promote(x, pos_embed), mask, ids_restore)
  m.def("encoder_input(Tensor x, Tensor pos_embed, Tensor cls_token, Tensor noise, int len_keep)"
        " -> (Tensor, Tensor, Tensor)");
  // the backward of the token gather: grad (N, num_prefix + len_keep, D) back to the kept
  // positions, zero at the removed ones -> (N, L, D) in dtype
  m.def("masked_tokens_backward(Tensor grad, Tensor ids_restore, int num_prefix, ScalarType dtype) -> Tensor");
}

// The backward has no derivative of its own: differentiating it (double backward) is an error
// naming the op, never a silently zero or missing gradient (without an Autograd kernel, torch's
// fallback drops the graph with only a warning).
TORCH_LIBRARY_IMPL(fastmae_ext, Autograd, m) {
  m.impl("masked_tokens_backward", torch::autograd::autogradNotImplementedFallback());
}
