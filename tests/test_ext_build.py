"""The extension's build logic (setup.py, imported, never run) and its loader's diagnosis (fastmae.ext).

Nothing here compiles: setup.py's helpers are pure functions of the environment, tested on
fake toolkit directories; the loader is tested on the module `make ext` built (when there is
one) and on simulated missing / mismatched builds.
"""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def setup_py():
    spec = importlib.util.spec_from_file_location("fastmae_setup", os.path.join(ROOT, "setup.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # __name__ != "__main__": setup() does not run
    return mod


def test_build_ext_env_parsing(setup_py):
    mode = setup_py.build_ext_mode
    assert mode({}) == "auto" and mode({"FASTMAE_BUILD_EXT": ""}) == "auto"
    assert mode({"FASTMAE_BUILD_EXT": "0"}) == "never" and mode({"FASTMAE_BUILD_EXT": "off"}) == "never"
    assert mode({"FASTMAE_BUILD_EXT": "1"}) == "required" and mode({"FASTMAE_BUILD_EXT": " 1 "}) == "required"
    with pytest.raises(SystemExit, match="FASTMAE_BUILD_EXT must be 0 or 1"):
        mode({"FASTMAE_BUILD_EXT": "maybe"})
    assert setup_py.plan({"FASTMAE_BUILD_EXT": "0"}) == (None, None, "FASTMAE_BUILD_EXT=0")


def test_required_build_that_cannot_build_fails_loudly(setup_py, monkeypatch, capsys):
    monkeypatch.setattr(setup_py, "plan", lambda env=None: (None, None, "no C++ compiler found"))
    with pytest.raises(SystemExit, match="FASTMAE_BUILD_EXT=1 but fastmae._C cannot be built: no C"):
        setup_py.ext_modules({"FASTMAE_BUILD_EXT": "1"})
    assert setup_py.ext_modules({}) == ([], {})  # auto: a one-line notice, nothing built
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not building the extension fastmae._C (no C++ compiler found)" in err[0]


def _toolkit(root, name="cuda-12.9", lib="lib64"):
    home = root / name
    (home / "bin").mkdir(parents=True)
    (home / "bin" / "nvcc").write_text("#!/bin/sh\n")
    (home / lib).mkdir(parents=True)
    (home / lib / "libcudart.so").write_text("")
    return home


def test_cuda_home_through_a_wrapper_script(setup_py, tmp_path):
    home = _toolkit(tmp_path)
    wrapper_bin = tmp_path / "usr-local-bin"
    wrapper_bin.mkdir()
    wrapper = wrapper_bin / "nvcc"
    wrapper.write_text(f'#!/bin/sh\nexec {home}/bin/nvcc "$@"\n')
    # the directory above the wrapper is no toolkit (what torch alone would take)
    assert not setup_py._is_cuda_home(str(tmp_path))
    found = setup_py.find_cuda_home({}, which=lambda name: str(wrapper))
    assert found == os.path.realpath(home)


def test_cuda_home_through_a_symlink_and_env(setup_py, tmp_path):
    home = _toolkit(tmp_path, "cuda-13.0", lib="targets/x86_64-linux/lib")
    link_dir = tmp_path / "bin"
    link_dir.mkdir()
    os.symlink(home / "bin" / "nvcc", link_dir / "nvcc")
    assert setup_py.find_cuda_home({}, which=lambda n: str(link_dir / "nvcc")) == os.path.realpath(home)
    other = _toolkit(tmp_path, "cuda-11.8")
    # CUDA_HOME wins when it names a toolkit; a CUDA_HOME that is none is passed over
    assert setup_py.find_cuda_home({"CUDA_HOME": str(other)}, which=lambda n: str(link_dir / "nvcc")) == \
        os.path.realpath(other)
    assert setup_py.find_cuda_home({"CUDA_HOME": str(tmp_path)}, which=lambda n: str(link_dir / "nvcc")) == \
        os.path.realpath(home)


def test_no_toolkit_anywhere(setup_py, monkeypatch):
    monkeypatch.setattr(setup_py, "_is_cuda_home", lambda path: False)
    assert setup_py.find_cuda_home({}, which=lambda n: None) is None


def test_this_machine(setup_py):
    # the project's machines: nvcc 13.0 behind a wrapper in /usr/local/bin, CUDA headers in site-packages
    if not os.path.isdir("/usr/local/cuda-13.0"):
        pytest.skip("not the project's build machine")
    assert setup_py.find_cuda_home({}) == "/usr/local/cuda-13.0"
    if torch.version.cuda and torch.version.cuda.startswith("13"):
        incs = setup_py.nvidia_include_dirs()
        assert incs and incs[0].endswith(os.path.join("nvidia", "cu13", "include"))
        assert os.path.isfile(os.path.join(incs[0], "cusparse.h"))


def test_sources_are_globbed(setup_py):
    cxx, cu, headers = setup_py.sources()
    assert "csrc/fastmae_ext.cpp" in cxx and "csrc/ops/patchify.cpp" in cxx
    assert "csrc/ops/cpu/patchify_kernel.cpp" in cxx and "csrc/ops/cuda/patchify_kernel.cu" in cu
    assert "csrc/common.h" in headers and "csrc/ops/patchify.h" in headers
    on_disk = {os.path.relpath(os.path.join(d, f), ROOT) for d, _, fs in os.walk(os.path.join(ROOT, "csrc"))
               for f in fs if f.endswith((".cpp", ".cu"))}
    assert set(cxx) | set(cu) == on_disk


def test_warnings_are_errors_for_fastmae_sources_only(setup_py):
    cxx, nvcc = setup_py._warning_flags(["/torch/include"])
    assert "-Werror" in cxx and ["-isystem", "/torch/include"] == cxx[cxx.index("-isystem"):][:2]
    assert "--Werror" in nvcc and "all-warnings" in nvcc and any("-Werror" in f for f in nvcc if f.startswith("-W"))
    # FASTMAE_WERROR=0 (gpu_check.sh, on a compiler CI never saw): the same warnings, none fatal
    cxx, nvcc = setup_py._warning_flags(["/torch/include"], setup_py._werror({"FASTMAE_WERROR": "0"}))
    assert "-Wall" in cxx and not any("Werror" in f for f in cxx + nvcc)
    assert "-Wall,-Wextra,-Wno-unused-parameter" in nvcc
    assert setup_py._werror({}) and setup_py._werror({"FASTMAE_WERROR": "1"})
    with pytest.raises(SystemExit, match="FASTMAE_WERROR"):
        setup_py._werror({"FASTMAE_WERROR": "no"})


# ------------------------------------------------------------------------------ loader
def _run(code):
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, TRITON_INTERPRET="1"))
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_import_fastmae_never_loads_the_extension():
    out = _run("import sys, fastmae, fastmae.ops, fastmae.ext\nprint('fastmae._C' in sys.modules)")
    assert out.strip() == "False"


def test_missing_build_is_a_clear_error_only_when_asked_for():
    out = _run(
        "import sys\n"
        "sys.modules['fastmae._C'] = None\n"  # as if never built
        "import torch, fastmae\n"
        "from fastmae import ops\n"
        "assert ops.patchify(torch.randn(1, 3, 8, 8), 4).shape == (1, 4, 48)\n"
        "assert 'ext' not in fastmae.available_backends('cpu')\n"
        "try:\n"
        "    ops.patchify(torch.randn(1, 3, 8, 8), 4, backend='ext')\n"
        "except fastmae.BackendUnavailableError as e:\n"
        "    print('ERR', e)\n"
    )
    assert "ERR backend='ext'" in out and "fastmae._C is not built" in out and "--no-build-isolation" in out


def test_build_for_another_torch_names_both_versions(monkeypatch):
    from fastmae import backend, ext

    ext._load.cache_clear()
    monkeypatch.setattr(ext, "build_info", lambda: {"torch": "2.0.0+cu118", "cuda": "11.8"})
    try:
        why = ext.problem()
        assert why is not None and "built for torch 2.0.0+cu118" in why and torch.__version__ in why
        with pytest.raises(backend.BackendUnavailableError, match="built for torch 2.0.0"):
            backend.resolve("ext", torch.device("cpu"))
    finally:
        monkeypatch.undo()
        ext._load.cache_clear()


def test_built_module_records_its_torch():
    from fastmae import ext

    if ext.problem() is not None:
        if os.environ.get("FASTMAE_EXT_REQUIRED") == "1":
            pytest.fail(ext.problem())
        pytest.skip(ext.problem())
    mod = ext.load()
    assert mod.torch_version == torch.__version__.split("+")[0]
    info = ext.build_info()
    assert info is not None and info["torch"] == torch.__version__
    assert bool(mod.with_cuda) == (info["kind"] == "cuda")
    if torch.version.cuda and os.environ.get("FASTMAE_EXT_REQUIRED") == "1":
        # make test with the CUDA torch: the CUDA kernels are compiled in, for TORCH_CUDA_ARCH_LIST
        # (sm_80 and sm_90 by default, as make test builds them)
        assert mod.with_cuda and info["archs"] == os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0")


def test_cpu_isa_cap_op():
    # the private op behind the cpu_isa fixture (conftest.py): it returns the CPU's own best
    # level whatever the cap, refuses levels outside 0..2, and cap 2 lifts the cap
    from _ext import require_ext

    require_ext(("_cpu_isa_cap",))
    cap = torch.ops.fastmae_ext._cpu_isa_cap
    best = cap(2)
    assert best in (0, 1, 2)
    try:
        assert cap(0) == best and cap(1) == best
        for bad in (-1, 3):
            with pytest.raises(RuntimeError, match=f"cap must be 0, 1 or 2, got {bad}"):
                cap(bad)
    finally:
        assert cap(2) == best


def test_cpu_isa_cap_reaches_the_kernels():
    # the baseline build has no FMA, so where a kernel multiplies and adds, its bits differ from
    # the AVX2 + FMA build's somewhere among thousands of elements: the cap switched the build
    from _ext import require_ext

    from fastmae import ops

    require_ext(("_cpu_isa_cap",))
    cap = torch.ops.fastmae_ext._cpu_isa_cap
    if cap(2) < 1:
        pytest.skip("this CPU has no AVX2 + FMA build")
    x, b = torch.randn(64, 3072), torch.randn(3072)
    xl, rl, w, bl = torch.randn(64, 768), torch.randn(64, 768), torch.randn(768), torch.randn(768)
    qkv = torch.randn(2, 50, 3, 4, 64)
    runs = {}
    try:
        for level in (1, 0):
            cap(level)
            runs[level] = dict(bias_gelu=ops.bias_gelu(x, b, backend="ext"),
                               add_layer_norm=ops.add_layer_norm(xl, rl, w, bl, 1e-6, backend="ext")[0],
                               attention=ops.attention_qkvpacked(qkv, backend="ext"))
    finally:
        cap(2)
    for name, avx2 in runs[1].items():
        assert not torch.equal(avx2, runs[0][name]), f"{name}: the same bits with the cap at baseline"
