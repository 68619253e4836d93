// fastmae._C: the module Python imports, and the fastmae_ext operator library.
//
// Importing fastmae._C loads this shared object, which runs the static registrations of every
// op under csrc/ops (TORCH_LIBRARY_FRAGMENT for the schemas, TORCH_LIBRARY_IMPL for the CPU and
// CUDA kernels). The ops are then torch.ops.fastmae_ext.<op>; the module itself only records how
// it was built, for fastmae.ext's diagnosis. No pybind11: a plain CPython module.

#include <Python.h>
#include <torch/library.h>
#include <torch/version.h>

#ifndef FASTMAE_WITH_CUDA
#define FASTMAE_WITH_CUDA 0
#endif

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      "fastmae's C++/CUDA kernels, registered as torch.ops.fastmae_ext.*",
      -1,  // no per-interpreter state
      nullptr,
      nullptr,
      nullptr,
      nullptr,
      nullptr,
  };
  PyObject* m = PyModule_Create(&module_def);
  if (m == nullptr) {
    return nullptr;
  }
  // the torch headers this was compiled against, and whether the CUDA kernels are in it
  if (PyModule_AddStringConstant(m, "torch_version", TORCH_VERSION) < 0 ||
      PyModule_AddIntConstant(m, "with_cuda", FASTMAE_WITH_CUDA) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
}

// The library: every op's schema is a TORCH_LIBRARY_FRAGMENT in csrc/ops/<op>.cpp.
TORCH_LIBRARY(fastmae_ext, m) {}
