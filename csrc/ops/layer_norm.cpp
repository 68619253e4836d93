// Schemas of the fused residual add + LayerNorm (see layer_norm.h for the math).
//
// add_layer_norm_fwd: x (rows, D), residual (rows, D) or None, weight/bias (D) or None.
//   Returns y (rows, D) in out_dtype; s = x + residual (rows, D) in residual_dtype, or an
//   empty tensor when residual is None (s is x then); mean and rstd (rows,) fp32.
// add_layer_norm_bwd: dy (rows, D), ds (rows, D) or None, the saved s, mean, rstd, weight
//   and bias. Returns dx in x_dtype; dresidual in residual_dtype when one is given (else an
//   empty tensor: the caller reuses dx); dweight and dbias (empty when absent).
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(fastmae_ext, m) {
  m.def(
      "add_layer_norm_fwd(Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, float eps, "
      "ScalarType out_dtype, ScalarType residual_dtype) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "add_layer_norm_bwd(Tensor dy, Tensor? ds, Tensor s, Tensor mean, Tensor rstd, Tensor? weight, "
      "Tensor? bias, ScalarType x_dtype, ScalarType? residual_dtype) -> (Tensor, Tensor, Tensor, Tensor)");
}

// The backward has no derivative of its own: differentiating it (double backward) is an error
// naming the op, never a silently zero or missing gradient (without an Autograd kernel, torch's
// fallback drops the graph with only a warning).
TORCH_LIBRARY_IMPL(fastmae_ext, Autograd, m) {
  m.impl("add_layer_norm_bwd", torch::autograd::autogradNotImplementedFallback());
}
