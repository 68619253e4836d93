"""Build script: the package is pure Python plus the optional extension ``fastmae._C`` (csrc/).

``pip install --no-build-isolation -e .`` (or ``.``) builds ``fastmae._C`` from every
``csrc/**/*.cpp`` and ``csrc/**/*.cu``:

* with ``CUDAExtension`` when the installed torch has CUDA and a CUDA toolkit (nvcc) is
  found: CUDA kernels for CUDA tensors and the C++ twins for CPU tensors;
* with ``CppExtension`` when there is only a C++ compiler (a CPU torch): the C++ twins;
* not at all, with a one-line notice, when neither (or torch does not import, as in
  pip's isolated build environment: hence ``--no-build-isolation``).

Environment (all optional; nobody has to export anything):

``FASTMAE_BUILD_EXT``    unset/empty: as above; ``0``: never build; ``1``: build or fail loudly;
                         ``cpu``: the C++ kernels only (a quick build while working on them)
``TORCH_CUDA_ARCH_LIST`` the GPU architectures, default ``8.0;9.0``
``MAX_JOBS``             parallel compile jobs (ninja)
``FASTMAE_WERROR``       ``0``: warnings are not errors (default: they are, for fastmae's own sources;
                         scripts/gpu_check.sh builds with 0 on a machine whose compiler CI never saw)
``CUDA_HOME``            the CUDA toolkit, found otherwise (see :func:`find_cuda_home`)

The build records the torch it was built with in ``fastmae/_C_build.json`` next to the
module; :mod:`fastmae.ext` compares it with the running torch when the backend is asked for.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;9.0"
BUILD_INFO = "_C_build.json"


def build_ext_mode(env=None) -> str | None:
    """``FASTMAE_BUILD_EXT`` parsed: ``"auto"`` (unset/empty), ``"never"`` (0), ``"required"`` (1) or
    ``"cpu"`` (required, the C++ kernels only: a quick build for working on the CPU twins)."""
    env = os.environ if env is None else env
    value = env.get("FASTMAE_BUILD_EXT", "").strip().lower()
    if value in ("", "auto"):
        return "auto"
    if value in ("0", "false", "no", "off"):
        return "never"
    if value in ("1", "true", "yes", "on"):
        return "required"
    if value == "cpu":
        return "cpu"
    raise SystemExit(f"FASTMAE_BUILD_EXT must be 0 or 1 (or unset, or cpu), got {value!r}")


def _is_cuda_home(path: str | None) -> bool:
    """A CUDA toolkit directory: bin/nvcc and the runtime library the link needs."""
    if not path or not os.path.isdir(path):
        return False
    libs = ("lib64/libcudart.so", "lib/libcudart.so", "targets/x86_64-linux/lib/libcudart.so",
            "targets/sbsa-linux/lib/libcudart.so", "lib/x64/cudart.lib")
    nvcc = any(os.path.isfile(os.path.join(path, "bin", n)) for n in ("nvcc", "nvcc.exe"))
    return nvcc and any(os.path.exists(os.path.join(path, lib)) for lib in libs)


def _homes_named_by(nvcc: str) -> list[str]:
    """Toolkit directories an ``nvcc`` on PATH leads to: through symlinks, and through a
    wrapper script (``exec /usr/local/cuda-13.0/bin/nvcc "$@"``) naming the real one."""
    real = os.path.realpath(nvcc)
    found = [os.path.dirname(os.path.dirname(real))]
    try:
        if os.path.getsize(real) < 16384:
            with open(real, "rb") as f:
                text = f.read().decode("utf-8", "replace")
            for m in re.finditer(r"(/[^\s'\"]+)/bin/nvcc\b", text):
                found.append(os.path.realpath(m.group(1)))
    except OSError:
        pass
    return found


def find_cuda_home(env=None, which=shutil.which) -> str | None:
    """The CUDA toolkit directory (the one with lib64/libcudart.so), or None.

    In order: ``CUDA_HOME`` / ``CUDA_PATH`` when they name a toolkit; the ``nvcc`` on PATH,
    resolved through symlinks and wrapper scripts; ``/usr/local/cuda``, then the newest
    ``/usr/local/cuda-*``. (torch alone takes the directory above the nvcc on PATH, which for
    a wrapper in /usr/local/bin has no libcudart and the link fails.)
    """
    env = os.environ if env is None else env
    candidates = [env.get("CUDA_HOME"), env.get("CUDA_PATH")]
    nvcc = which("nvcc")
    if nvcc:
        candidates += _homes_named_by(nvcc)
    versioned = sorted(glob.glob("/usr/local/cuda-*"), key=_version_key, reverse=True)
    candidates += ["/usr/local/cuda", *versioned]
    for c in candidates:
        if _is_cuda_home(c):
            return os.path.realpath(c)
    return None


def _version_key(path: str):
    return tuple(int(x) for x in re.findall(r"\d+", os.path.basename(path)))


def nvidia_include_dirs() -> list[str]:
    """Headers of the CUDA libraries that torch's own wheels install under
    ``<site-packages>/nvidia`` (cu13/include, cu12/include, or one include/ per library in
    older wheels): torch's headers include cusparse.h, cublas_v2.h, ... from there."""
    dirs = []
    for site in sys.path:
        base = os.path.join(site, "nvidia")
        if not os.path.isdir(base):
            continue
        for name in sorted(os.listdir(base)):
            inc = os.path.join(base, name, "include")
            if os.path.isdir(inc) and inc not in dirs:
                dirs.append(inc)
    # the CUDA 13 / 12 bundles first: they hold the toolkit's library headers
    return sorted(dirs, key=lambda d: 0 if os.path.basename(os.path.dirname(d)) in ("cu13", "cu12") else 1)


def sources(root: str = ROOT) -> tuple[list[str], list[str], list[str]]:
    """(C++ sources, CUDA sources, headers) under csrc/, relative to ``root``, sorted."""
    def rel(pattern):
        return sorted(os.path.relpath(p, root) for p in glob.glob(os.path.join(root, pattern), recursive=True))

    return rel("csrc/**/*.cpp"), rel("csrc/**/*.cu"), rel("csrc/**/*.h") + rel("csrc/**/*.cuh")


def _notice(msg: str) -> None:
    print(f"fastmae: {msg}", file=sys.stderr)


def plan(env=None):
    """What to build: ``(kind, cuda_home, reason)``, kind ``"cuda"``, ``"cpp"`` or None."""
    env = os.environ if env is None else env
    mode = build_ext_mode(env)
    if mode == "never":
        return None, None, "FASTMAE_BUILD_EXT=0"
    try:
        import torch
    except ImportError as e:
        return None, None, (f"torch does not import ({e}); in pip's isolated build environment it never does: "
                            "pip install --no-build-isolation .")
    cuda_home = find_cuda_home(env) if torch.version.cuda and mode != "cpu" else None
    if torch.version.cuda and cuda_home:
        return "cuda", cuda_home, f"torch {torch.__version__} with CUDA {torch.version.cuda}, toolkit {cuda_home}"
    if shutil.which(env.get("CXX", "c++")) or shutil.which("g++") or shutil.which("clang++"):
        why = ("FASTMAE_BUILD_EXT=cpu" if mode == "cpu" else
               "torch has no CUDA" if not torch.version.cuda else "no CUDA toolkit (nvcc) found")
        return "cpp", None, f"{why}: C++ CPU kernels only"
    return None, None, "no C++ compiler found"


def _openmp_flags() -> list[str]:
    """``-fopenmp`` where torch's CPU parallelism is OpenMP (Linux builds): ATen's
    ``at::parallel_for`` is an inline ``#pragma omp parallel`` in the extension's own code, and
    without the flag it quietly runs every C++ kernel on one thread. The module then uses the
    libgomp torch has loaded (the same soname), so both share one thread pool."""
    if sys.platform.startswith("linux"):
        return ["-fopenmp"]
    return []


def _warning_flags(torch_includes, werror: bool = True):
    """Warnings as errors for fastmae's own sources (unless ``werror`` is False: shown, not fatal);
    torch's headers as system headers (``-isystem`` takes precedence over the ``-I`` torch adds),
    so their warnings do not count."""
    system = [f for d in torch_includes for f in ("-isystem", d)]
    err = ["-Werror"] if werror else []
    cxx = ["-O3", "-Wall", "-Wextra", *err, "-Wno-unused-parameter", *_openmp_flags(), *system]
    nvcc = ["-O3", *(["--Werror", "all-warnings"] if werror else []), "-lineinfo", "--expt-relaxed-constexpr",
            *system, "-Xcompiler", ",".join(["-Wall", "-Wextra", *err, "-Wno-unused-parameter"])]
    return cxx, nvcc


def _werror(env) -> bool:
    value = env.get("FASTMAE_WERROR", "").strip()
    if value not in ("", "0", "1"):
        raise SystemExit(f"FASTMAE_WERROR must be 0 or 1 (or unset), got {value!r}")
    return value != "0"


def ext_modules(env=None):
    env = os.environ if env is None else env
    kind, cuda_home, reason = plan(env)
    if kind is None:
        if build_ext_mode(env) in ("required", "cpu"):
            raise SystemExit(f"fastmae: FASTMAE_BUILD_EXT=1 but fastmae._C cannot be built: {reason}")
        _notice(f"not building the extension fastmae._C ({reason}); backend='ext' will say so")
        return [], {}
    if kind == "cuda":
        os.environ["CUDA_HOME"] = cuda_home  # read when torch.utils.cpp_extension is imported
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
    import torch
    import torch.utils.cpp_extension as cpp

    if kind == "cuda":
        cpp.CUDA_HOME = cuda_home  # in case it was imported before
    cxx_src, cu_src, headers = sources()
    if not cxx_src:
        raise SystemExit("fastmae: csrc/ holds no C++ sources")
    cxx, nvcc = _warning_flags(cpp.include_paths("cuda" if kind == "cuda" else "cpu"), _werror(env))
    macros = [("FASTMAE_WITH_CUDA", "1" if kind == "cuda" else "0")]
    common = dict(include_dirs=[os.path.join(ROOT, "csrc")], define_macros=macros, depends=headers)
    if kind == "cuda":
        include = common.pop("include_dirs") + nvidia_include_dirs()
        ext = cpp.CUDAExtension("fastmae._C", cxx_src + cu_src, include_dirs=include,
                                extra_compile_args={"cxx": cxx, "nvcc": nvcc},
                                extra_link_args=_openmp_flags(), **common)
    else:
        ext = cpp.CppExtension("fastmae._C", cxx_src, extra_compile_args={"cxx": cxx},
                               extra_link_args=_openmp_flags(), **common)
    _notice(f"building fastmae._C ({kind}: {reason}; archs {os.environ['TORCH_CUDA_ARCH_LIST']})"
            if kind == "cuda" else f"building fastmae._C ({kind}: {reason})")

    class BuildExt(cpp.BuildExtension):
        """torch's BuildExtension (ninja), recording the torch it built against next to the module."""

        def _record(self, ext):
            info = {"torch": torch.__version__, "cuda": torch.version.cuda if kind == "cuda" else None,
                    "kind": kind, "archs": os.environ["TORCH_CUDA_ARCH_LIST"] if kind == "cuda" else None}
            path = os.path.join(os.path.dirname(self.get_ext_fullpath(ext.name)), BUILD_INFO)
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(info, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)

        def finalize_options(self):
            # ninja's objects in a directory per kind (build/temp.<platform>-cuda or -cpp): the
            # CUDA build and the C++-only build compile the same .cpp files with different macros,
            # and switching between them would otherwise recompile everything each time
            if self.build_temp is None:
                self.build_temp = f"{self.get_finalized_command('build').build_temp}-{kind}"
            super().finalize_options()

        def build_extension(self, ext):
            super().build_extension(ext)
            self._record(ext)  # in build_lib: what a wheel ships

        def copy_extensions_to_source(self):
            super().copy_extensions_to_source()  # --inplace / editable installs: next to the copied module
            old, self.inplace = self.inplace, 1
            try:
                for ext in self.extensions:
                    self._record(ext)
            finally:
                self.inplace = old

    return [ext], {"build_ext": BuildExt.with_options(use_ninja=True)}


def find_jpeglib(env=None) -> str | None:
    """The include directory holding libjpeg(-turbo)'s ``jpeglib.h``, or None."""
    env = os.environ if env is None else env
    dirs = [d for v in ("CPATH", "C_INCLUDE_PATH", "CPLUS_INCLUDE_PATH") for d in env.get(v, "").split(os.pathsep) if d]
    dirs += [os.path.join(sys.prefix, "include"), "/usr/local/include", "/usr/include"]
    return next((d for d in dirs if os.path.isfile(os.path.join(d, "jpeglib.h"))), None)


def jpeg_ext_modules(cmdclass: dict, env=None) -> list:
    """``fastmae._jpeg`` (csrc/jpeg/crop_decode.cc, linked with -ljpeg: fastmae.data's crop-aware
    JPEG decode) when ``jpeglib.h`` is found and the extensions are built at all; ``cmdclass``
    gets torch's BuildExtension if it has no build_ext yet."""
    env = os.environ if env is None else env
    if build_ext_mode(env) == "never":
        return []
    include = find_jpeglib(env)
    if include is None:
        _notice("not building fastmae._jpeg (no jpeglib.h found: apt install libjpeg62-turbo-dev or "
                "libjpeg-turbo8-dev); fastmae.data decodes with torchvision")
        return []
    try:
        import torch.utils.cpp_extension as cpp
    except ImportError:
        return []  # ext_modules() above has said why
    cxx, _ = _warning_flags(cpp.include_paths("cpu"))
    cmdclass.setdefault("build_ext", cpp.BuildExtension.with_options(use_ninja=True))
    _notice(f"building fastmae._jpeg (libjpeg headers in {include})")
    include_dirs = [] if include == "/usr/include" else [include]  # -I/usr/include would reorder system headers
    return [cpp.CppExtension("fastmae._jpeg", ["csrc/jpeg/crop_decode.cc"], include_dirs=include_dirs,
                             libraries=["jpeg"], extra_compile_args={"cxx": cxx},
                             extra_link_args=_openmp_flags())]


if __name__ == "__main__":
    exts, cmdclass = ext_modules()
    exts += jpeg_ext_modules(cmdclass)
    setup(ext_modules=exts, cmdclass=cmdclass)
