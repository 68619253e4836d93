// patchify / unpatchify: the schemas (CPU kernels in cpu/patchify_kernel.cpp, CUDA kernels in
// cuda/patchify_kernel.cu, autograd and fake tensors in fastmae/ext/patchify.py).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(fastmae_ext, m) {
  // (N, C, H, W) images -> (N, L, p*p*C) tokens, contiguous, in out_dtype (default imgs')
  m.def("patchify(Tensor imgs, int patch_size, ScalarType? out_dtype) -> Tensor");
  // (N, h*w, p*p*C) tokens -> (N, C, h*p, w*p) images, contiguous, in out_dtype (default x's)
  m.def("unpatchify(Tensor x, int patch_size, int h, int w, ScalarType? out_dtype) -> Tensor");
}
