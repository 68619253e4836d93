// Schemas of bias + exact GELU (see bias_gelu.h for the math).
//
// bias_gelu_fwd: x (rows, H), bias (H) -> gelu(x + bias) (rows, H) in x's dtype.
// bias_gelu_bwd: dy (rows, H), the saved x and bias -> (dx in x's dtype, dbias in bias's dtype).
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(fastmae_ext, m) {
  m.def("bias_gelu_fwd(Tensor x, Tensor bias) -> Tensor");
  m.def("bias_gelu_bwd(Tensor dy, Tensor x, Tensor bias) -> (Tensor, Tensor)");
}

// The backward has no derivative of its own: differentiating it (double backward) is an error
// naming the op, never a silently zero or missing gradient (without an Autograd kernel, torch's
// fallback drops the graph with only a warning).
TORCH_LIBRARY_IMPL(fastmae_ext, Autograd, m) {
  m.impl("bias_gelu_bwd", torch::autograd::autogradNotImplementedFallback());
}
