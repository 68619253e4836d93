// Schemas of bias + exact GELU (see bias_gelu.h for the math).
//
// bias_gelu_fwd: x (rows, H), bias (H) -> gelu(x + bias) (rows, H) in x's dtype.
// bias_gelu_bwd: dy (rows, H), the saved x and bias -> (dx in x's dtype, dbias in bias's dtype).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(fastmae_ext, m) {
  m.def("bias_gelu_fwd(Tensor x, Tensor bias) -> Tensor");
  m.def("bias_gelu_bwd(Tensor dy, Tensor x, Tensor bias) -> (Tensor, Tensor)");
}
