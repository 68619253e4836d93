"""Build script: the package is pure Python; the C++/CUDA extension under csrc/ is optional.

``pip install -e .`` installs fastmae without compiling anything. ``FASTMAE_BUILD_CUDA=1``
additionally builds ``fastmae._C`` from ``csrc/`` (needs torch with CUDA and nvcc).
"""

import glob
import os

from setuptools import setup


def ext_modules():
    if os.environ.get("FASTMAE_BUILD_CUDA", "0") != "1":
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    sources = sorted(glob.glob("csrc/**/*.cpp", recursive=True) + glob.glob("csrc/**/*.cu", recursive=True))
    if not sources:
        raise RuntimeError("FASTMAE_BUILD_CUDA=1 but csrc/ holds no sources yet")
    ext = CUDAExtension("fastmae._C", sources, extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math"]})
    return [ext], {"build_ext": BuildExtension}


exts, cmdclass = ext_modules()
setup(ext_modules=exts, cmdclass=cmdclass)
