// Schemas of softmax attention for MAE's short sequences (see attention.h for the math).
//
// attention_fwd: q, k, v (B, N, H, D), any strides, one dtype -> (out (B, N, H, D), lse (B, H, N) fp32).
// attention_bwd: dout, q, k, v, out (B, N, H, D), lse -> dqkv (B, N, 3, H, D): dq, dk, dv packed.
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(fastmae_ext, m) {
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v, float scale) -> (Tensor, Tensor)");
  m.def("attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, float scale) -> Tensor");
}

// The backward has no derivative of its own: differentiating it (double backward) is an error
// naming the op, never a silently zero or missing gradient (without an Autograd kernel, torch's
// fallback drops the graph with only a warning).
TORCH_LIBRARY_IMPL(fastmae_ext, Autograd, m) {
  m.impl("attention_bwd", torch::autograd::autogradNotImplementedFallback());
}
