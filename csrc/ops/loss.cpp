// The MAE reconstruction loss: the schemas (CPU kernels in cpu/loss_kernel.cpp, CUDA kernels in
// cuda/loss_kernel.cu, autograd and fake tensors in fastmae/ext/loss.py).
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(fastmae_ext, m) {
  // -> (loss, sum(mask)), float32 scalars; the second is saved for the backward
  m.def("mae_loss(Tensor imgs, Tensor pred, Tensor mask, int patch_size, bool norm_pix_loss) -> (Tensor, Tensor)");
  // -> d loss / d pred, (N, L, P) contiguous in pred's dtype
  m.def("mae_loss_backward(Tensor grad_out, Tensor mask_sum, Tensor imgs, Tensor pred, Tensor mask, int patch_size,"
        " bool norm_pix_loss) -> Tensor");
}

// The backward has no derivative of its own: differentiating it (double backward) is an error
// naming the op, never a silently zero or missing gradient (without an Autograd kernel, torch's
// fallback drops the graph with only a warning).
TORCH_LIBRARY_IMPL(fastmae_ext, Autograd, m) {
  m.impl("mae_loss_backward", torch::autograd::autogradNotImplementedFallback());
}
