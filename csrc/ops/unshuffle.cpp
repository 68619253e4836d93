// Decoder unshuffle: the schemas (CPU kernels in cpu/unshuffle_kernel.cpp, CUDA kernels in
// cuda/unshuffle_kernel.cu, autograd and fake tensors in fastmae/ext/unshuffle.py).
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(fastmae_ext, m) {
  // (N, 1 + len_keep, D) decoder tokens -> (N, 1 + L, D): mask tokens in, original order, + pos_embed
  m.def("decoder_unshuffle(Tensor x, Tensor ids_restore, Tensor mask_token, Tensor? pos_embed) -> Tensor");
  // -> (grad of x (N, 1 + len_keep, D) in x_dtype, grad summed over the removed rows (D,) in fp32/fp64)
  m.def("decoder_unshuffle_backward(Tensor grad, Tensor ids_restore, int len_keep, ScalarType x_dtype)"
        " -> (Tensor, Tensor)");
}

// The backward has no derivative of its own: differentiating it (double backward) is an error
// naming the op, never a silently zero or missing gradient (without an Autograd kernel, torch's
// fallback drops the graph with only a warning).
TORCH_LIBRARY_IMPL(fastmae_ext, Autograd, m) {
  m.impl("decoder_unshuffle_backward", torch::autograd::autogradNotImplementedFallback());
}
