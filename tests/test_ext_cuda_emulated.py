"""The extension's CUDA kernels, emulated on the CPU (tests/_cuda_emu), through the GPU tests' own bodies.

Each ``test_cuda_*`` test of tests/test_ext_*.py takes a ``device`` (``"cuda"`` when pytest
runs it, on a GPU). Here the same functions run with ``device="cpu"`` while
:func:`_cuda_emu.emulated` routes ``torch.ops.fastmae_ext.<op>`` on CPU tensors to the CUDA
kernel files compiled against a CPU emulation of CUDA (fibers for threads, the scheduler
checking barriers, warp collectives, mma.sync fragments and launch limits): the kernels' index
math, control flow and host-side launch logic, and the GPU tests themselves, are exercised
before any GPU has run them. Shapes are the GPU tests' smaller ones (the emulation runs a
block's threads one after another). It is not a GPU: numerics of the intrinsics, timing and
the memory model are not modelled (tests/_cuda_emu/emu.h), and scripts/gpu_check.sh stays the
judge.

The emulation's own checks are tested on small kernels of tests/_cuda_emu/selftest.cu that
break one rule each. Skips when the extension is not built (fails under FASTMAE_EXT_REQUIRED=1).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _ext import misaligned, require_ext

require_ext(("patchify", "attention_fwd", "add_layer_norm_fwd", "bias_gelu_fwd", "mae_loss", "encoder_input",
             "decoder_unshuffle"))

import _cuda_emu  # noqa: E402
import test_ext_attention as TA  # noqa: E402
import test_ext_bias_gelu as TB  # noqa: E402
import test_ext_layer_norm as TL  # noqa: E402
import test_ext_loss as TLo  # noqa: E402
import test_ext_masking as TM  # noqa: E402
import test_ext_patchify as TP  # noqa: E402
import test_ext_unshuffle as TU  # noqa: E402

from fastmae import ops  # noqa: E402
from fastmae import reference as ref  # noqa: E402

f16, f32, f64, bf16 = torch.float16, torch.float32, torch.float64, torch.bfloat16
CPU = "cpu"
ROOT = Path(__file__).resolve().parent.parent


# The emulation resumes a block's runnable threads, and runs the blocks, in a random order drawn
# for each test (printed: pytest shows it with a failure), so that a result depending on the order
# (a race between two barriers) fails some run; FASTMAE_EMU_ORDER=ascending or descending fixes it.
ORDER = os.environ.get("FASTMAE_EMU_ORDER", "shuffled")


@pytest.fixture(autouse=True)
def emulated(_fresh_seed):
    _cuda_emu.build()
    _cuda_emu.set_order(ORDER, seed=_fresh_seed)
    print(f"emulation: threads resumed in {ORDER} order (seed {_fresh_seed})")
    with _cuda_emu.emulated():
        yield
    _cuda_emu.set_order("ascending")


# ----------------------------------------------------------------------------- data movement
@pytest.mark.parametrize("dtype", TP.DTYPES)
@pytest.mark.parametrize("N,C,H,W,p", TP.SHAPES)
def test_patchify(N, C, H, W, p, dtype):
    TP.test_cuda_matches_reference(N, C, H, W, p, dtype, device=CPU)


def test_patchify_takes_a_float_out_dtype_only():
    TP.test_raw_ops_take_a_float_out_dtype_only(CPU)


@pytest.mark.parametrize("x_dtype,p_dtype", [(bf16, None), (f16, None), (f32, None), (bf16, f32), (f64, None)])
@pytest.mark.parametrize("N,L,D,ratio", [(3, 49, 40, 0.5), (2, 1030, 8, 0.9), (4, 197, 36, 0.0), (2, 196, 768, 0.75)])
def test_masking(x_dtype, p_dtype, N, L, D, ratio):
    TM.test_cuda_matches_reference(x_dtype, p_dtype, N, L, D, ratio, device=CPU)


def test_masking_empty_batch():
    TM.test_empty_batch(CPU)


def test_masking_single_feature_tokens_from_a_strided_view():
    TM.test_single_feature_tokens_from_a_strided_view(CPU)


def test_masking_backward_takes_a_float_dtype_only():
    TM.test_raw_backward_takes_a_float_dtype_only(CPU)


@pytest.mark.parametrize("x_dtype,m_dtype", [(bf16, None), (f16, f32), (f32, None), (f64, None)])
@pytest.mark.parametrize("N,L,D,ratio", [(3, 49, 40, 0.5), (2, 197, 36, 0.0), (2, 196, 512, 0.75)])
def test_unshuffle(x_dtype, m_dtype, N, L, D, ratio):
    TU.test_cuda_matches_reference(x_dtype, m_dtype, N, L, D, ratio, device=CPU)


@pytest.mark.parametrize("x_dtype,m_dtype", [(f32, None), (bf16, f32), (f16, None)])
def test_unshuffle_grad_layouts(x_dtype, m_dtype):
    TU.test_backward_grad_layouts(CPU, x_dtype, m_dtype)


@pytest.mark.parametrize("N,D", [(0, 16), (2, 0)])
def test_unshuffle_empty(N, D):
    TU.test_empty(CPU, N, D)


@pytest.mark.parametrize("N,L,D", [(65535 + 3, 4, 8), (1, 2, (65535 + 1) * 64)])
def test_unshuffle_backward_above_the_grids_y_extent(N, L, D):
    TU.test_backward_above_the_grids_y_extent(CPU, N, L, D)


def test_unshuffle_backward_takes_a_float_x_dtype_only():
    TU.test_raw_op_takes_a_float_x_dtype_only(CPU)


def test_unshuffle_takes_ids_out_of_range_as_removed():
    TU.test_raw_ops_take_ids_out_of_range_as_removed(CPU)


# Random shapes, dtypes and layouts (fresh every run): the kernels' choice between their 16-byte
# and scalar paths, ragged tails and strided inputs, against the reference, exactly.
DT = [f32, f16, bf16, f64]


def _layout(t, kind):
    if kind == "offset":
        return misaligned(t)
    if kind == "strided":  # every other element of a tensor twice as wide
        return torch.stack([t, torch.randn_like(t)], -1).flatten(-2)[..., ::2]
    return t


def _pick(g, xs):
    return xs[int(torch.randint(len(xs), (), generator=g))]


@pytest.mark.parametrize("case", range(6))
def test_fuzz_data_movement(case):
    g = torch.Generator().manual_seed(int(torch.randint(2**31, ())))
    for _ in range(5):
        _fuzz_once(g)


def _fuzz_once(g):
    # patchify / unpatchify
    p, N, C = _pick(g, [1, 2, 3, 4, 7, 8, 14, 16]), _pick(g, [1, 2, 3]), _pick(g, [1, 3, 4])
    h, w = _pick(g, [1, 2, 3, 5]), _pick(g, [1, 2, 4])
    dt, out = _pick(g, DT), _pick(g, [None, *DT])
    imgs = _layout((torch.randn(N, C, h * p, w * p) * 3).to(dt), _pick(g, ["plain", "offset", "strided"]))
    want = ref.patchify(imgs, p).to(out or dt)
    TM.assert_same(TP.E.patchify(imgs, p, out_dtype=out), want)
    x = _layout(torch.randn(N, h * w, p * p * C).to(dt), _pick(g, ["plain", "offset", "strided"]))
    TM.assert_same(TP.E.unpatchify(x, p, (h, w)), ref.unpatchify(x, p, (h, w)))
    # encoder input (random masking, pos-embed add, gather, cls) and its backward
    N, L, D = _pick(g, [1, 2, 5]), _pick(g, [1, 7, 16, 49, 50, 197, 300]), _pick(g, [1, 4, 8, 12, 36, 64, 72])
    ratio = _pick(g, [r for r in (0.0, 0.25, 0.5, 0.75, 0.9) if int(L * (1 - r)) >= 1])  # a token kept
    xd, pd = _pick(g, DT), _pick(g, [None, f32, f16])
    x, pos, cls = TM.inputs(N, L, D, xd, pd)
    x = _layout(x, _pick(g, ["plain", "offset", "strided"]))
    noise = _pick(g, [torch.rand(N, L), TM.tied_noise(N, L)])
    for a, b in zip(ops.encoder_input(x, pos, cls, ratio, noise, backend="ext"),
                    ref.encoder_input(x, pos, cls, ratio, noise)):
        TM.assert_same(a, b)
    gout = torch.randn(N, 1 + ref.num_kept(L, ratio), D).to(torch.promote_types(x.dtype, pos.dtype))
    _, got = TM._grads(lambda *t: ops.encoder_input(*t, ratio, noise, backend="ext"), (x, pos, cls), gout)
    _, want = TM._grads(lambda *t: ref.encoder_input(*t, ratio, noise), (x, pos, cls), gout)
    TM.assert_same(got[0], want[0])
    # decoder unshuffle and grad x
    md = _pick(g, [None, f32])
    x, ids, mt, pos = TU.make(N, L, D, ratio, xd, md, md, ids_dtype=_pick(g, [torch.int64, torch.int32]))
    x = _layout(x, _pick(g, ["plain", "offset", "strided"]))
    TM.assert_same(ops.decoder_unshuffle(x, ids, mt, pos, backend="ext"), ref.decoder_unshuffle(x, ids, mt, pos))
    gout = _layout(torch.randn(N, 1 + L, D).to(torch.promote_types(x.dtype, mt.dtype)),
                   _pick(g, ["plain", "offset", "strided"]))
    _, got = TU._grads(lambda x, mt: ops.decoder_unshuffle(x, ids, mt, pos, backend="ext"), (x, mt), gout)
    _, want = TU._grads(lambda x, mt: ref.decoder_unshuffle(x, ids, mt, pos), (x, mt), gout.contiguous())
    TM.assert_same(got[0], want[0])
    TU.assert_mask_token_grad(got[1], gout, ids, L, ratio)


# ----------------------------------------------------------------------------- loss
@pytest.mark.parametrize("imgs_dtype,pred_dtype", TLo.DTYPES)
@pytest.mark.parametrize("norm", [False, True])
def test_loss(imgs_dtype, pred_dtype, norm):
    TLo.test_cuda_matches_reference(imgs_dtype, pred_dtype, norm, device=CPU)


@pytest.mark.parametrize("norm", [False, True])
def test_loss_patches_that_fill_shared_memory(norm):
    TLo.test_cuda_patches_that_fill_shared_memory(norm, device=CPU)


# ----------------------------------------------------------------------------- LayerNorm, GELU
@pytest.mark.parametrize("dtype", [bf16, f16, f32])
@pytest.mark.parametrize("rows,D", [(1, 8), (3, 40), (197, 100), (50, 1280), (7, 2048), (33, 3000)])
def test_layer_norm(rows, D, dtype):
    TL.test_cuda_matches_reference(rows, D, dtype, device=CPU)


@pytest.mark.parametrize("x_dt,r_dt,w_dt,out_dt,res_dt", TL.DTYPE_CASES)
def test_layer_norm_dtype_combinations(x_dt, r_dt, w_dt, out_dt, res_dt):
    TL.test_cuda_dtype_combinations(x_dt, r_dt, w_dt, out_dt, res_dt, device=CPU)


def test_layer_norm_non_contiguous_and_misaligned():
    TL.test_cuda_non_contiguous_and_misaligned(device=CPU)


def test_layer_norm_deterministic():
    TL.test_cuda_deterministic_and_mae_shapes(400, 768, device=CPU)


def test_layer_norm_backward_up_to_the_cards_shared_memory():
    TL.test_cuda_backward_up_to_the_cards_shared_memory(device=CPU, optin=_cuda_emu.SMEM_OPTIN)


def test_layer_norm_raw_ops_edges():
    TL.test_raw_ops_edges_alike_on_both_devices(CPU)


@pytest.mark.parametrize("x_dtype,bias_dtype", TB.DTYPES)
@pytest.mark.parametrize("M,H", [(1, 8), (3, 40), (197, 100), (1000, 768), (77, 2048)])
def test_bias_gelu(M, H, x_dtype, bias_dtype):
    TB.test_cuda_matches_reference(M, H, x_dtype, bias_dtype, device=CPU)


def test_bias_gelu_misaligned_and_deterministic():
    TB.test_cuda_misaligned_and_deterministic(device=CPU, big=(400, 2048))


# ----------------------------------------------------------------------------- attention
# every head dim on mma.sync (fp16, bf16) and the SIMT path (fp32), N around the strips and the
# pairs-per-block steps (<= 16: 4 pairs a block, <= 32: 2), MAE's 50 and 65, and the limit 256
@pytest.mark.parametrize("dtype", [bf16, f16, f32])
@pytest.mark.parametrize("D", [32, 64, 80, 128])
@pytest.mark.parametrize("N", [1, 5, 17, 33, 50])
def test_attention(N, D, dtype):
    TA.test_cuda_qkvpacked_matches_reference(N, D, dtype, device=CPU)


@pytest.mark.parametrize("dtype", [bf16, f32])
@pytest.mark.parametrize("N,D", [(65, 80), (256, 64), (197, 32)])
def test_attention_long(N, D, dtype):
    # one (batch, head) pair or two: the fp32 SIMT path is slow to emulate (a warp shuffle a logit)
    if dtype == f32:
        TA.check_packed(TA._randn(1, N, 3, 1, D, dtype=dtype), TA._randn(1, N, 1, D, dtype=dtype))
    else:
        TA.test_cuda_mae_shapes_and_deterministic(1, N, 2, D, dtype, device=CPU)


@pytest.mark.parametrize("dtype", [bf16, f16, f32])
def test_attention_non_contiguous_and_scale(dtype):
    TA.test_cuda_non_contiguous_and_scale(dtype, device=CPU)


@pytest.mark.parametrize("dtype", [f32, bf16])
def test_attention_softmax_underflow(dtype):
    TA.test_cuda_softmax_underflow(dtype, device=CPU)


@pytest.mark.parametrize("dtype", [f16, f32])
def test_attention_empty_sequences_and_lse_shape(dtype):
    TA.test_raw_ops_empty_sequences_and_lse_shape(CPU, dtype)


# ----------------------------------------------------------------------------- the emulation itself
# Kernels of tests/_cuda_emu/selftest.cu that use each emulated feature right, or break one rule.
def _emu():
    return torch.ops.fastmae_emu


@pytest.mark.parametrize("dtype", [f16, bf16])
def test_emulated_mma_is_the_product(dtype):
    # fragments loaded as PTX lays them out give A B (a transposed or shifted layout would not)
    A, B = torch.randn(16, 16).to(dtype), torch.randn(16, 8).to(dtype)
    C = _emu()._selftest_mma(A, B)
    torch.testing.assert_close(C.double(), A.double() @ B.double(), rtol=1e-6, atol=1e-6)


def test_emulated_shuffles_and_their_rules():
    x = torch.randn(4 * 64)
    torch.testing.assert_close(_emu()._selftest_warp_sum(x, 64, -1, False), x.view(-1, 32).sum(1))
    with pytest.raises(RuntimeError, match="__shfl_xor_sync in warp 0 .*: lane 31 returned before it"):
        _emu()._selftest_warp_sum(x, 64, 31, False)
    with pytest.raises(RuntimeError, match="waits at __syncthreads instead"):
        _emu()._selftest_warp_sum(x, 64, -1, True)
    with pytest.raises(RuntimeError, match="a warp with 16 threads"):
        _emu()._selftest_warp_sum(torch.randn(4 * 48), 48, -1, False)


def test_emulated_race_shows_as_a_difference_between_orders():
    # thread 0 writes shared memory the others read: with a barrier between, every order reads
    # 1; without, threads that run first read the poison (NaN) in one order and 1 in another
    for order in ("ascending", "descending", "shuffled"):
        _cuda_emu.set_order(order, seed=3)
        assert torch.equal(_emu()._selftest_race(64, True), torch.ones(64))
    _cuda_emu.set_order("ascending")
    first = _emu()._selftest_race(64, False)
    _cuda_emu.set_order("descending")
    last = _emu()._selftest_race(64, False)
    assert torch.equal(first, torch.ones(64))
    assert last[0] == 1 and bool(last[1:].isnan().all())


def test_emulated_launch_limits():
    launch = _emu()._selftest_launch  # (grid x, grid y, block, dynamic smem, opt-in, floats written)
    with pytest.raises(RuntimeError, match="empty grid"):
        launch(0, 1, 32, 0, 0, 0)
    with pytest.raises(RuntimeError, match=r"grid \(1, 65536, 1\) above CUDA's limits"):
        launch(1, 65536, 32, 0, 0, 0)
    with pytest.raises(RuntimeError, match=r"block \(1025, 1, 1\) above CUDA's limits"):
        launch(1, 1, 1025, 0, 0, 0)
    with pytest.raises(RuntimeError, match="above 48 KB needs cudaFuncSetAttribute"):
        launch(1, 1, 32, 64 * 1024, 0, 0)
    with pytest.raises(RuntimeError, match="above the card's opt-in limit"):
        launch(1, 1, 32, 0, _cuda_emu.SMEM_OPTIN + 1, 0)
    assert launch(2, 1, 32, 64 * 1024, 64 * 1024, 16 * 1024) == 0  # exactly 64 KB
    with pytest.raises(RuntimeError, match="a write 0 bytes past the end of its 65536 bytes of dynamic shared memory"):
        launch(1, 1, 32, 64 * 1024, 64 * 1024, 16 * 1024 + 1)
    # static arrays count against the same 48 KB: 40 KB static + 8 KB dynamic fits, + 16 KB does not
    for _ in range(2):  # and a static array starts as 0xff (NaN) in every block, not with old values
        out = _emu()._selftest_static_smem(8 * 1024)
        assert torch.equal(out[:32], torch.full((32,), 3.0)) and out[32].isnan()
    with pytest.raises(RuntimeError, match="40960 bytes of static and 16384 of dynamic shared memory are above "
                                           "the 49152 a block may have without the opt-in"):
        _emu()._selftest_static_smem(16 * 1024)


def test_emulated_misaligned_vector_load_is_an_error():
    # the build's -fsanitize=alignment stops the process (in a subprocess here) at a 16-byte load
    # from an address that is 4 bytes past a 16-byte boundary, as the GPU would fault
    code = ("import sys; sys.path.insert(0, 'tests'); import torch, _cuda_emu; _cuda_emu.build(); "
            "x = torch.arange(16.); print(float(torch.ops.fastmae_emu._selftest_vector_load(x, 4)), flush=True); "
            "torch.ops.fastmae_emu._selftest_vector_load(x, 1)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.stdout.split() == ["22.0"] and r.returncode != 0, (r.stdout, r.stderr[-3000:])
    assert "misaligned address" in r.stderr and "16 byte alignment" in r.stderr, r.stderr[-3000:]


# ----------------------------------------------------------------------------- memcheck
def _asan(code_or_args):
    lib = subprocess.run([os.environ.get("CXX", "c++"), "-print-file-name=libasan.so"], capture_output=True,
                         text=True).stdout.strip()
    assert os.path.isfile(lib), f"the C++ compiler has no AddressSanitizer runtime ({lib!r})"
    env = dict(os.environ, LD_PRELOAD=lib, FASTMAE_EMU_ASAN="1",
               ASAN_OPTIONS="detect_leaks=0:detect_stack_use_after_return=0")
    return subprocess.run([sys.executable, *code_or_args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)


def test_emulated_kernels_under_addresssanitizer():
    # scripts/emu_memcheck.sh's run: every ext_sanitize case clean under ASan, after a probe that
    # reads one float past a tensor's end and must be reported (the check can fail)
    probe = ("import sys; sys.path.insert(0, 'tests'); import torch, _cuda_emu; _cuda_emu.build(); "
             "x = torch.randn(1000); assert torch.equal(torch.ops.fastmae_emu._selftest_shifted_copy(x, 0), x); "
             "print('in bounds', flush=True); torch.ops.fastmae_emu._selftest_shifted_copy(x, 1)")
    r = _asan(["-c", probe])
    assert r.returncode != 0 and "in bounds" in r.stdout, (r.stdout, r.stderr[-3000:])
    assert "AddressSanitizer: heap-buffer-overflow" in r.stderr
    assert "0 bytes to the right of 4000-byte region" in r.stderr
    r = _asan(["scripts/ext_sanitize.py", "--device", "emu"])
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-5000:])
    assert "AddressSanitizer" not in r.stderr and r.stdout.splitlines()[-1] == "ext_sanitize: 39 cases on emu"
