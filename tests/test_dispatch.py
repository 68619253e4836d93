"""Backend selection: defaults, environment, clear errors, and import without optional parts."""

import os
import subprocess
import sys

import pytest
import torch

import fastmae
from fastmae import ops
from fastmae import reference as ref
from fastmae.backend import BackendUnavailableError, get_backend, resolve


@pytest.fixture(autouse=True)
def _reset_backend():
    fastmae.set_backend(None)
    yield
    fastmae.set_backend(None)


def test_default_is_auto_and_auto_is_reference_on_cpu(monkeypatch):
    monkeypatch.delenv("FASTMAE_BACKEND", raising=False)
    assert get_backend() == "auto"
    assert resolve(None, torch.device("cpu")) == "torch"
    assert resolve("auto", torch.device("cpu"), attention=True) == "torch"


def test_env_and_set_backend(monkeypatch):
    monkeypatch.setenv("FASTMAE_BACKEND", "torch")
    assert get_backend() == "torch"
    fastmae.set_backend("sdpa")
    assert get_backend() == "sdpa"
    # a process default meant for attention leaves the other ops on auto
    assert resolve(None, torch.device("cpu")) == "torch"
    assert resolve(None, torch.device("cpu"), attention=True) == "sdpa"
    with fastmae.use_backend("torch"):
        assert get_backend() == "torch"
    assert get_backend() == "sdpa"
    monkeypatch.setenv("FASTMAE_BACKEND", "bogus")
    fastmae.set_backend(None)
    with pytest.raises(ValueError, match="FASTMAE_BACKEND"):
        get_backend()


def test_unknown_backend_names():
    with pytest.raises(ValueError, match="backend"):
        fastmae.set_backend("cudnn")
    with pytest.raises(ValueError, match="backend"):
        ops.patchify(torch.randn(1, 3, 8, 8), 4, backend="fast")
    with pytest.raises(ValueError, match="attention only"):
        ops.patchify(torch.randn(1, 3, 8, 8), 4, backend="sdpa")


def test_old_cuda_backend_name_says_it_is_now_ext(monkeypatch):
    # the compiled extension serves CPU and CUDA tensors, so it is "ext"; "cuda" is refused with
    # the new name wherever a backend name is accepted
    with pytest.raises(ValueError, match="'cuda' is now called 'ext'"):
        ops.patchify(torch.randn(1, 3, 8, 8), 4, backend="cuda")
    with pytest.raises(ValueError, match="'cuda' is now called 'ext'"):
        ops.attention(*(torch.randn(1, 4, 2, 8) for _ in range(3)), backend="cuda")
    with pytest.raises(ValueError, match="'cuda' is now called 'ext'"):
        fastmae.set_backend("cuda")
    monkeypatch.setenv("FASTMAE_BACKEND", "cuda")
    with pytest.raises(ValueError, match="FASTMAE_BACKEND 'cuda' is now called 'ext'"):
        get_backend()
    with pytest.raises(ValueError, match="'cuda' is now called 'ext'"):
        fastmae.MaskedAutoencoderViT(img_size=8, patch_size=4, embed_dim=16, depth=1, num_heads=2,
                                     decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2, backend="cuda")


def test_ext_backend_on_cpu_is_the_extension_or_says_why_not():
    from fastmae import ext

    imgs = torch.randn(1, 3, 8, 8)
    if ext.problem() is None:  # built: the C++ kernel runs on CPU tensors
        assert torch.equal(ops.patchify(imgs, 4, backend="ext"), ref.patchify(imgs, 4))
        assert resolve("ext", torch.device("cpu")) == "ext"
    else:
        with pytest.raises(BackendUnavailableError, match="fastmae._C"):
            ops.patchify(imgs, 4, backend="ext")


def test_auto_on_cpu_takes_the_extension_only_where_measured_faster(monkeypatch):
    # under TRITON_INTERPRET=1 too: "auto" never takes the interpreter on CPU
    from fastmae import ext
    from fastmae import ops as ops_mod

    monkeypatch.delenv("FASTMAE_BACKEND", raising=False)
    built = ext.problem() is None
    cpu = torch.device("cpu")
    for op in ops_mod._IMPLS:
        want = "ext" if built and op in ops_mod.EXT_CPU_AUTO and "ext" in ops_mod._IMPLS[op] else "torch"
        assert ops_mod._backend(op, None, cpu, attention=op.startswith("attention")) == want, op
    assert resolve("auto", cpu, auto_cpu=("ext",)) == ("ext" if built else "torch")
    assert resolve("auto", cpu, implemented={"torch", "triton"}, auto_cpu=("ext",)) == "torch"
    monkeypatch.setattr(ext, "problem", lambda: "not built (simulated)")
    assert resolve("auto", cpu, auto_cpu=("ext",)) == "torch"


def test_xformers_backend_is_a_clear_error_on_cpu():
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(BackendUnavailableError, match="xformers"):
        ops.attention(q, q, q, backend="xformers")


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET|triton"):
        ops.patchify(torch.randn(1, 3, 8, 8), 4, backend="triton")


def test_torch_and_sdpa_backends_agree_with_reference():
    imgs = torch.randn(2, 3, 8, 8)
    assert torch.equal(ops.patchify(imgs, 4, backend="torch"), ref.patchify(imgs, 4))
    q, k, v = (torch.randn(2, 5, 3, 8) for _ in range(3))
    torch.testing.assert_close(ops.attention(q, k, v, backend="sdpa"), ref.attention(q, k, v), rtol=1e-5, atol=1e-6)
    qkv = torch.randn(2, 5, 3, 3, 8)
    torch.testing.assert_close(ops.attention_qkvpacked(qkv, backend="sdpa", scale=0.2),
                               ref.attention_qkvpacked(qkv, 0.2), rtol=1e-5, atol=1e-6)


def test_ops_validate_before_dispatch():
    with pytest.raises(ValueError, match="scale"):
        ops.attention_qkvpacked(torch.randn(1, 4, 3, 2, 8), scale=-1.0)
    with pytest.raises(ValueError, match="mask_ratio"):
        ops.encoder_input(torch.randn(1, 4, 8), torch.randn(1, 5, 8), torch.randn(1, 1, 8), 1.0, backend="ext")
    with pytest.raises(ValueError, match="pos_embed"):
        ops.encoder_input(torch.randn(1, 4, 8), torch.randn(1, 4, 8), torch.randn(1, 1, 8), 0.5)


def test_import_without_triton_xformers_or_extension():
    code = (
        "import sys\n"
        "sys.modules['triton'] = None\n"  # makes 'import triton' raise ImportError
        "sys.modules['xformers'] = None\n"
        "import torch, fastmae\n"
        "from fastmae import ops\n"
        "x = ops.patchify(torch.randn(1, 3, 8, 8), 4)\n"
        "m = fastmae.MaskedAutoencoderViT(img_size=8, patch_size=4, embed_dim=16, depth=1, num_heads=2,\n"
        "    decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)\n"
        "m(torch.randn(2, 3, 8, 8))\n"
        "try:\n"
        "    ops.patchify(torch.randn(1, 3, 8, 8), 4, backend='triton')\n"
        "except fastmae.BackendUnavailableError as e:\n"
        "    print('ERR', e)\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ERR" in out.stdout and "'triton' package" in out.stdout


def test_available_backends_on_cpu():
    names = fastmae.available_backends("cpu", attention=True)
    assert "torch" in names and "sdpa" in names and "cuda" not in names and "xformers" not in names
    from fastmae import ext

    assert ("ext" in names) == (ext.problem() is None)


def test_attention_head_dims_above_the_triton_limit(monkeypatch):
    # backend="triton" names the limit; "auto" takes SDPA there (and Triton up to it)
    import fastmae.ops as ops_mod

    limit = ops_mod.TRITON_ATTENTION_MAX_HEAD_DIM
    q, k, v = (torch.randn(2, 5, 2, limit + 32) for _ in range(3))
    with pytest.raises(ValueError, match=f"head dim D={limit + 32}.*limit of {limit}"):
        ops.attention(q, k, v, backend="triton")
    with pytest.raises(ValueError, match="head dim"):
        ops.attention_qkvpacked(torch.stack((q, k, v), 2), backend="triton")

    called = []
    monkeypatch.setattr(ops_mod, "_backend", lambda *a, **kw: "triton")  # as auto on a GPU
    monkeypatch.setattr(ops_mod, "_impl", lambda op, b: lambda *a: called.append((op, b)))
    torch.testing.assert_close(ops.attention(q, k, v), ref.attention(q, k, v))
    torch.testing.assert_close(ops.attention_qkvpacked(torch.stack((q, k, v), 2), backend="auto"),
                               ref.attention(q, k, v))
    assert called == []
    small = [t[..., :limit] for t in (q, k, v)]
    ops.attention(*small)
    assert called == [("attention", "triton")]
    fastmae.set_backend("triton")
    try:
        with pytest.raises(ValueError, match="head dim"):
            ops.attention(q, k, v)
    finally:
        fastmae.set_backend("auto")


def test_ops_on_ext_compile_fullgraph_before_their_module_is_imported():
    # ops.<op>(backend="ext") imports fastmae.ext.<op> on first use; under torch.compile that first
    # use is traced, and dynamo refuses importlib (fullgraph: an error). A fresh process, so that
    # nothing has imported the ext modules yet.
    from _ext import require_ext

    require_ext()  # skips (fails under FASTMAE_EXT_REQUIRED=1) when the extension is unusable
    code = (
        "import sys, torch\n"
        "from fastmae import ops\n"
        "assert not any(m.startswith('fastmae.ext.') for m in sys.modules), sorted(sys.modules)\n"
        "x = torch.randn(2, 3, 8, 8)\n"
        "f = torch.compile(lambda t: ops.patchify(t, 4, backend='ext') * 2, fullgraph=True, backend='eager')\n"
        "assert torch.equal(f(x), ops.patchify(x, 4) * 2)\n"
        "t = [torch.randn(5, 8, requires_grad=True) for _ in range(2)] + [torch.randn(8) for _ in range(2)]\n"
        "def g(x, r, w, b):\n"
        "    y, s = ops.add_layer_norm(x, r, w, b, 1e-6, backend='ext')\n"
        "    return y * 2, s\n"
        "y, s = torch.compile(g, fullgraph=True, backend='eager')(*t)\n"
        "y0, s0 = g(*t)\n"
        "assert torch.equal(s, s0) and torch.allclose(y, y0)\n"
        "print('OK')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]


@pytest.mark.parametrize("default", ["sdpa", "xformers"])
def test_attention_only_default_is_auto_for_the_fallbacks(default):
    """A process default of sdpa / xformers means auto for the other ops, their fallbacks too:
    float64 bias + GELU takes the reference there, as on auto (it raised as if 'ext' were named)."""
    x, b = torch.randn(3, 8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    fastmae.set_backend(default)
    assert torch.equal(ops.bias_gelu(x, b), ref.bias_gelu(x, b))
    assert ops._auto(None) and not ops._auto("ext") and ops._auto("auto")


def _loss_inputs():
    imgs = torch.randn(2, 3, 8, 8)
    pred = torch.randn(2, 4, 48)
    mask = torch.zeros(2, 4)
    mask[:, torch.randperm(4)[:3]] = 1.0
    return imgs, pred, mask


@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("which", ["imgs", "mask"])
def test_mae_loss_differentiates_imgs_and_mask_as_the_official_loss(norm, which):
    """The kernels differentiate pred only; when imgs or mask requires grad, auto takes the
    reference (the official forward_loss's gradients) and a named kernel backend says so."""
    from fastmae import ext

    imgs, pred, mask = _loss_inputs()
    leaves = {"imgs": imgs, "mask": mask}
    leaves[which].requires_grad_(True)
    want = torch.autograd.grad(ref.mae_loss(imgs, pred, mask, 4, norm), leaves[which])[0]
    assert want.abs().sum() > 0
    # auto picks a kernel for this op on CPU when the extension is built (EXT_CPU_AUTO)
    got = torch.autograd.grad(ops.mae_loss(imgs, pred, mask, 4, norm, backend="auto"), leaves[which])[0]
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    if ext.problem() is None:
        with pytest.raises(ValueError, match=f"{which} no gradient"):
            ops.mae_loss(imgs, pred, mask, 4, norm, backend="ext")
        with torch.no_grad():  # nothing to differentiate: the kernel runs
            ops.mae_loss(imgs, pred, mask, 4, norm, backend="ext")
        leaves[which].requires_grad_(False)
        pred.requires_grad_(True)
        g = torch.autograd.grad(ops.mae_loss(imgs, pred, mask, 4, norm, backend="ext"), pred)[0]
        torch.testing.assert_close(g, torch.autograd.grad(ref.mae_loss(imgs, pred, mask, 4, norm), pred)[0])


def test_triton_ops_on_cpu_tensors_outside_the_interpreter_are_the_reference():
    """Outside the interpreter the Triton ops' CPU kernels are the reference (fastmae._library's
    register_cpu_fallback), forward and backward: the backward fallbacks used torch.autograd.grad,
    which records nothing inside an op's kernel (below the autograd key), and raised."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="0")
    script = os.path.join(os.path.dirname(__file__), "_triton_cpu_fallbacks.py")
    out = subprocess.run([sys.executable, script], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("ok ") == 12, out.stdout
