"""``fastmae pretrain`` on the CPU: the official flags and recipe, a few steps, no host sync per
step, a non-finite loss keeps the last good checkpoint, the embedded demo.

Runs are in-process (:func:`fastmae.pretrain.train`) on a folder of 16 small generated
images with the tiny model at 32 px, one thread (the machine is shared), fp32.
"""

import json
import os
import sys

import pytest
import torch
from _pretrain_helpers import make_images, state_of, tiny_flags

import fastmae.data
from fastmae.pretrain import DEMO, get_args_parser, main, parse_args, train
from fastmae.pretrain import engine as engine_mod
from fastmae.pretrain.lr_sched import absolute_lr, adjust_learning_rate, lr_at
from fastmae.pretrain.sampler import ResumableDistributedSampler

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("images"), n=16)


# ----------------------------------------------------------------------------- the command line
# The defaults of facebookresearch/mae main_pretrain.py get_args_parser(), read from its source.
OFFICIAL_DEFAULTS = dict(
    batch_size=64, epochs=400, accum_iter=1, model="mae_vit_large_patch16", input_size=224, mask_ratio=0.75,
    norm_pix_loss=False, weight_decay=0.05, lr=None, blr=1e-3, min_lr=0.0, warmup_epochs=40,
    output_dir="./output_dir", log_dir="./output_dir", seed=0, resume="", start_epoch=0, num_workers=10,
    pin_mem=True, world_size=1, local_rank=-1, dist_on_itp=False, dist_url="env://",
)


def test_official_flags_and_defaults():
    args = get_args_parser().parse_args([])
    for k, v in OFFICIAL_DEFAULTS.items():
        assert getattr(args, k) == v, k
    assert args.data_path is None and args.device is None  # the two documented differences
    # an official launch command parses unchanged
    cmd = ("--batch_size 64 --model mae_vit_base_patch16 --norm_pix_loss --mask_ratio 0.75 --epochs 800 "
           "--warmup_epochs 40 --blr 1.5e-4 --weight_decay 0.05 --data_path /x --no_pin_mem --accum_iter 2 "
           "--world_size 8 --local_rank 0 --dist_url env:// --dist_on_itp").split()
    a = parse_args(cmd)
    assert (a.model, a.norm_pix_loss, a.epochs, a.blr, a.pin_mem, a.accum_iter, a.demo) == \
        ("mae_vit_base_patch16", True, 800, 1.5e-4, False, 2, False)


def test_no_arguments_is_the_demo():
    a = parse_args([])
    assert a.demo and all(getattr(a, k) == v for k, v in DEMO.items())
    b = parse_args(["--demo", "--epochs", "2"])
    assert b.demo and b.epochs == 2 and b.model == DEMO["model"]


def test_no_data_path_is_a_clear_error(tmp_path, capsys):
    assert main(["--epochs", "1", "--output_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--data_path is required" in err and "--demo" in err


@pytest.mark.parametrize("flags, message", [
    (["--cuda_graph"], "--cuda_graph"),
    (["--model", "mae_vit_nope"], "unknown --model"),
    (["--backend", "nope"], "--backend"),
    (["--batch_size", "64"], "fewer than one batch"),
])
def test_configuration_errors(images, tmp_path, capsys, flags, message):
    argv = tiny_flags(images, str(tmp_path / "o")) + flags
    assert main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--mask_ratio", "0"], "--mask_ratio must be in (0, 1)"),  # nothing masked: the loss would be 0/0
    (["--mask_ratio", "1e-18"], "--mask_ratio 1e-18 on the 16 patches"),  # in (0, 1), yet keeps all 16
    (["--mask_ratio", "0.95"], "--mask_ratio 0.95 on the 16 patches"),  # int(16 * 0.05) = 0 visible
    (["--input_size", "30"], "--input_size 30 is not a multiple of the patch size 8"),
    (["--input_size", "4"], "--input_size 4 is not a multiple of the patch size 8"),
])
def test_geometry_errors_are_clear_and_up_front(images, tmp_path, capsys, monkeypatch, flags, message):
    def no_data(*a, **k):
        raise AssertionError("the flags should have been refused before the data is read")

    monkeypatch.setattr(fastmae.data, "find_train_root", no_data)
    out = tmp_path / "o"
    assert main(tiny_flags(images, str(out)) + flags) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_check_geometry_matches_the_official_len_keep():
    rng = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    for r in torch.rand(40, generator=rng, dtype=torch.float64).tolist() + [0.9, 0.9375, 0.0625, 0.05]:
        len_keep = int(16 * (1 - r))  # official random_masking; 16 patches of 8 px at 32 px
        if 1 <= len_keep < 16:
            assert engine_mod.check_geometry("mae_vit_tiny_patch8", 32, r) == 16, r
        else:
            with pytest.raises(engine_mod.PretrainError, match="--mask_ratio"):
                engine_mod.check_geometry("mae_vit_tiny_patch8", 32, r)
    assert engine_mod.check_geometry("mae_vit_base_patch16", 224, 0.75) == 196
    assert engine_mod.check_geometry("mae_vit_huge_patch14", 224, 0.75) == 256
    with pytest.raises(engine_mod.PretrainError, match="--input_size 32 is not a multiple of the patch size 14"):
        engine_mod.check_geometry("mae_vit_huge_patch14", 32, 0.75)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a CUDA device")
def test_device_cuda_without_gpu(images, tmp_path, capsys):
    assert main(tiny_flags(images, str(tmp_path / "o"), device="cuda")) == 2
    assert "no CUDA device" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the recipe
def test_lr_rule_and_schedule():
    assert absolute_lr(None, 1.5e-4, 4096) == pytest.approx(1.5e-4 * 16)
    assert absolute_lr(3e-4, 1.5e-4, 4096) == 3e-4
    lr, lo, wu, ep = 2.0, 0.1, 4, 10
    assert lr_at(0, lr, lo, wu, ep) == 0.0
    assert lr_at(2, lr, lo, wu, ep) == pytest.approx(1.0)  # linear warmup
    assert lr_at(wu, lr, lo, wu, ep) == pytest.approx(lr)  # peak at the end of warmup
    assert lr_at(7, lr, lo, wu, ep) == pytest.approx(lo + (lr - lo) * 0.5)  # half-way down the cosine
    assert lr_at(ep, lr, lo, wu, ep) == pytest.approx(lo)
    xs = [wu + i * 0.5 for i in range(13)]
    ys = [lr_at(x, lr, lo, wu, ep) for x in xs]
    assert all(a >= b for a, b in zip(ys, ys[1:]))
    opt = torch.optim.SGD([{"params": [torch.zeros(1, requires_grad=True)]},
                           {"params": [torch.zeros(1, requires_grad=True)], "lr_scale": 0.5}], lr=1)
    ns = type("A", (), dict(lr=lr, min_lr=lo, warmup_epochs=wu, epochs=ep))
    assert adjust_learning_rate(opt, 2, ns) == pytest.approx(1.0)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1.0, 0.5])


def test_param_groups_are_the_official_ones():
    timm_optim = pytest.importorskip("timm.optim")
    from fastmae.models.mae import mae_vit_tiny_patch8

    model = mae_vit_tiny_patch8()
    ours = engine_mod.param_groups_weight_decay(model, 0.05)
    theirs = timm_optim.param_groups_weight_decay(model, 0.05)  # timm's successor of add_weight_decay
    assert [g["weight_decay"] for g in ours] == [g["weight_decay"] for g in theirs] == [0.0, 0.05]
    for a, b in zip(ours, theirs):
        assert [id(p) for p in a["params"]] == [id(p) for p in b["params"]]
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for p in ours[0]["params"]}
    assert "blocks.0.norm1.weight" in no_decay and "blocks.0.attn.qkv.bias" in no_decay
    decay = {names[id(p)] for p in ours[1]["params"]}
    assert {"cls_token", "mask_token", "blocks.0.attn.qkv.weight"} <= decay  # official decays the tokens
    assert "pos_embed" not in no_decay | decay  # frozen sin-cos


@pytest.mark.parametrize("n, replicas, drop_last", [(10, 1, False), (10, 3, False), (11, 4, True), (5, 2, False)])
def test_sampler_is_distributed_sampler_and_resumes(n, replicas, drop_last):
    ds = list(range(n))
    for epoch in (0, 3):
        for rank in range(replicas):
            ref = torch.utils.data.DistributedSampler(ds, num_replicas=replicas, rank=rank, shuffle=True, seed=7,
                                                      drop_last=drop_last)
            ref.set_epoch(epoch)
            ours = ResumableDistributedSampler(n, replicas, rank, shuffle=True, seed=7, drop_last=drop_last)
            ours.set_epoch(epoch)
            full = list(ref)
            assert list(ours) == full and len(ours) == len(ref)
            ours.set_start(2)
            assert list(ours) == full[2:] and len(ours) == len(full) - 2
            ours.set_epoch(epoch + 1)  # a new epoch starts at its beginning
            assert len(ours) == len(ref)
    with pytest.raises(ValueError, match="start"):
        ResumableDistributedSampler(n, 1, 0).set_start(n + 1)


# ----------------------------------------------------------------------------- training
def test_a_few_steps_single_process(images, tmp_path):
    out = str(tmp_path / "out")
    before = None

    orig = engine_mod.build_model

    def spy(*a, **k):
        nonlocal before
        m = orig(*a, **k)
        before = {k: v.clone() for k, v in m.state_dict().items()}
        return m

    engine_mod.build_model, saved = spy, engine_mod.build_model
    try:
        res = train(parse_args(tiny_flags(images, out, epochs=2, ckpt_every_steps=3, accum_iter=2)))
    finally:
        engine_mod.build_model = saved
    assert res.exit_code == 0 and res.status == "done"
    assert res.global_step == 2 * 2 and (res.next_epoch, res.next_step) == (2, 0)  # 4 batches / epoch, accum 2
    after = res.model.state_dict()
    assert not torch.equal(after["blocks.0.attn.qkv.weight"], before["blocks.0.attn.qkv.weight"])
    assert torch.equal(after["pos_embed"], before["pos_embed"])  # frozen

    files = sorted(os.listdir(out))
    assert {"checkpoint-0.pth", "checkpoint-1.pth", "checkpoint-last.pth", "log.txt", "log_steps.txt",
            "loss.png"} <= set(files)
    assert not [f for f in files if f.endswith(".tmp")]
    ck = state_of(os.path.join(out, "checkpoint-1.pth"))
    assert set(ck) == {"model", "optimizer", "epoch", "scaler", "args", "fastmae"}
    assert ck["epoch"] == 1 and ck["fastmae"]["next_epoch"] == 2 and ck["fastmae"]["next_step"] == 0
    assert ck["args"].lr == pytest.approx(1.5e-3 * 4 * 2 / 256)  # blr * eff_batch / 256, official args
    for k, v in after.items():
        assert torch.equal(ck["model"][k], v), k
    assert len(ck["optimizer"]["param_groups"]) == 2
    assert [g["weight_decay"] for g in ck["optimizer"]["param_groups"]] == [0.0, 0.05]
    assert [g["betas"] for g in ck["optimizer"]["param_groups"]] == [(0.9, 0.95)] * 2
    epochs = [json.loads(line) for line in open(os.path.join(out, "log.txt"))]
    assert [r["epoch"] for r in epochs] == [0, 1]
    assert all(set(r) == {"train_lr", "train_loss", "epoch"} for r in epochs)
    steps = [json.loads(line) for line in open(os.path.join(out, "log_steps.txt"))]
    assert [r["step"] for r in steps] == [2, 4]
    for r in steps:
        assert r["loss"] > 0 and r["images_per_s"] > 0 and r["step_ms"] > 0
    # per-iteration warmup (1 epoch) then cosine: the logged lr at step 2 is the lr set at batch 2 of epoch 0
    assert steps[0]["lr"] == pytest.approx(lr_at(2 / 4, ck["args"].lr, 0.0, 1, 2))
    assert open(os.path.join(out, "loss.png"), "rb").read(8) == PNG_MAGIC


# ----------------------------------------------------------------------------- no host sync per step
_SYNCS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")
_PKG = os.path.dirname(os.path.abspath(engine_mod.__file__)).rsplit(os.sep, 1)[0]


def _count_syncs(monkeypatch):
    """Count host reads of tensor values made from fastmae's own code (the caller's frame)."""
    counts = {"n": 0, "where": []}

    def wrap(name):
        orig = getattr(torch.Tensor, name)

        def f(self, *a, **k):
            fn = sys._getframe(1).f_code.co_filename
            if fn.startswith(_PKG):
                counts["n"] += 1
                counts["where"].append(f"{name} {os.path.relpath(fn, _PKG)}:{sys._getframe(1).f_lineno}")
            return orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, f)

    for name in _SYNCS:
        wrap(name)
    return counts


def test_no_host_sync_per_step(images, tmp_path, monkeypatch):
    """The number of host reads must not grow with the number of steps between log points."""
    counts = _count_syncs(monkeypatch)
    found = {}
    for steps in (2, 3):  # one epoch of 16 batches of 1: the runs differ only by steps between log points
        counts["n"], counts["where"] = 0, []
        out = str(tmp_path / f"o{steps}")
        res = train(parse_args(tiny_flags(images, out, batch_size=1, epochs=1, warmup_epochs=0, log_every=100,
                                          max_steps=steps, no_plot=True)))
        assert res.exit_code == 0 and res.global_step == steps
        found[steps] = (counts["n"], list(counts["where"]))
    assert found[2][0] == found[3][0], f"host reads grew with the steps: {found[2]} vs {found[3]}"
    assert found[2][0] > 0  # the counter sees the log point's read (it would otherwise prove nothing)


def test_logging_reads_once_per_log_point(images, tmp_path, monkeypatch):
    counts = _count_syncs(monkeypatch)
    res = {}
    for log_every in (1, 2):
        counts["n"] = 0
        out = str(tmp_path / f"l{log_every}")
        train(parse_args(tiny_flags(images, out, batch_size=1, epochs=1, warmup_epochs=0, log_every=log_every,
                                    max_steps=4, no_plot=True, output_dir="")))
        res[log_every] = counts["n"]
    assert res[1] - res[2] == 2  # 4 vs 2 log points: exactly one read each


# ----------------------------------------------------------------------------- non-finite loss
@pytest.mark.parametrize("log_every, ckpt_every, bad_from, last_good_step", [
    (3, 2, 5, 4),   # step 5 goes bad; the log point at step 6 stops the run, checkpoint-last stays at step 4
    (10, 3, 4, 3),  # no log point before the checkpoint at step 6: the check before it refuses to write
])
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(images, tmp_path, capsys, monkeypatch, log_every,
                                                                  ckpt_every, bad_from, last_good_step):
    orig = engine_mod.build_model
    calls = {"n": 0}

    def poisoned(*a, **k):
        m = orig(*a, **k)
        forward = m.forward

        def fwd(imgs, mask_ratio=0.75, noise=None):
            calls["n"] += 1
            loss, pred, mask = forward(imgs, mask_ratio, noise)
            return (loss * float("nan") if calls["n"] >= bad_from else loss), pred, mask

        m.forward = fwd
        return m

    monkeypatch.setattr(engine_mod, "build_model", poisoned)
    out = str(tmp_path / "out")
    rc = main(tiny_flags(images, out, batch_size=1, epochs=1, warmup_epochs=0, log_every=log_every,
                         ckpt_every_steps=ckpt_every))
    assert rc == 1
    msg = capsys.readouterr().out
    assert "not finite" in msg and "stopping" in msg and "checkpoint-last.pth" in msg
    ck = state_of(os.path.join(out, "checkpoint-last.pth"))
    assert ck["fastmae"]["global_step"] == last_good_step
    assert all(torch.isfinite(v).all() for v in ck["model"].values())
    assert not os.path.exists(os.path.join(out, "checkpoint-0.pth"))  # the epoch never finished


# ----------------------------------------------------------------------------- the embedded demo
def test_embedded_demo_no_arguments(tmp_path, monkeypatch, capsys):
    """``fastmae pretrain`` with no arguments: finishes and writes its files (a plain test, not timed)."""
    monkeypatch.chdir(tmp_path)
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "demo" in out and "output_dir" in out
    d = tmp_path / "output_dir"
    last = DEMO["epochs"] - 1
    for name in (f"checkpoint-{last}.pth", "checkpoint-last.pth", "log.txt", "log_steps.txt", "loss.png",
                 "reconstruction.png"):
        assert (d / name).is_file(), name
    for png in ("loss.png", "reconstruction.png"):
        assert (d / png).read_bytes()[:8] == PNG_MAGIC
    ck = state_of(d / f"checkpoint-{last}.pth")
    assert ck["epoch"] == last and ck["args"].model == DEMO["model"]
    rows = [json.loads(line) for line in open(d / "log.txt")]
    assert [r["epoch"] for r in rows] == list(range(DEMO["epochs"]))
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]  # it learns something


# ----------------------------------------------------------------------------- synthetic data (the step measurement)
def test_synthetic_run(tmp_path):
    out = str(tmp_path / "o")
    res = train(parse_args(["--synthetic", "--synthetic_size", "12", "--model", "mae_vit_tiny_patch8",
                            "--input_size", "32", "--batch_size", "4", "--epochs", "2", "--warmup_epochs", "0",
                            "--num_workers", "0", "--log_every", "1", "--device", "cpu", "--output_dir", out,
                            "--log_dir", out, "--no_progress", "--no_plot"]))
    assert res.exit_code == 0 and res.global_step == 6
    rows = [json.loads(line) for line in open(os.path.join(out, "log_steps.txt"))]
    assert len(rows) == 6 and all(r["images_per_s"] > 0 and r["step_ms"] > 0 for r in rows)


def test_demo_with_synthetic_data(tmp_path, capsys):
    """``--demo --synthetic``: trains, writes its checkpoints and says why there is no reconstruction
    (random noise has nothing to show) instead of failing on the synthetic dataset."""
    out = tmp_path / "o"
    assert main(["--demo", "--synthetic", "--synthetic_size", "16", "--input_size", "32", "--batch_size", "4",
                 "--epochs", "1", "--warmup_epochs", "0", "--num_workers", "0", "--output_dir", str(out),
                 "--log_dir", str(out), "--device", "cpu", "--no_progress", "--no_plot"]) == 0
    msg = capsys.readouterr().out
    assert "reconstruction skipped: --synthetic" in msg
    assert (out / "checkpoint-last.pth").is_file() and not (out / "reconstruction.png").exists()
    assert [json.loads(line)["epoch"] for line in open(out / "log.txt")] == [0]


# ----------------------------------------------------------------------------- on a GPU
def _gpu_flags(out, *extra):
    return ["--synthetic", "--synthetic_size", "256", "--model", "mae_vit_tiny_patch8", "--input_size", "64",
            "--batch_size", "16", "--epochs", "2", "--warmup_epochs", "1", "--num_workers", "2", "--log_every", "2",
            "--max_steps", "12", "--output_dir", out, "--log_dir", out, "--no_progress", "--no_plot", *extra]


@pytest.mark.gpu
@pytest.mark.parametrize("extra", [[], ["--precision", "fp16"], ["--cuda_graph"]], ids=["bf16", "fp16", "graph"])
def test_gpu_steps_never_sync_the_host(tmp_path, extra):
    """On CUDA, torch.cuda.set_sync_debug_mode('error') between log points: any host sync in a step raises."""
    out = str(tmp_path / "o")
    res = train(parse_args(_gpu_flags(out, "--sync_debug", "error", *extra)))
    assert res.exit_code == 0 and res.global_step == 12
    ck = state_of(os.path.join(out, "checkpoint-last.pth"))
    assert ck["args"].precision == (extra[1] if extra[:1] == ["--precision"] else "bf16")
    assert ck["args"].device.startswith("cuda")
    if extra[:1] == ["--precision"]:
        assert ck["scaler"]  # the GradScaler's state is saved
    rows = [json.loads(line) for line in open(os.path.join(out, "log_steps.txt"))]
    assert len(rows) == 6 and all(r["loss"] > 0 for r in rows)
    if extra == ["--cuda_graph"]:  # the graph's gradients stay in .grad across epochs (not set to None)
        assert all(p.grad is not None for p in res.model.parameters() if p.requires_grad)


@pytest.mark.gpu
def test_gpu_resume_continues(tmp_path):
    out = str(tmp_path / "o")
    first = train(parse_args(_gpu_flags(out) + ["--max_steps", "5"]))
    assert first.status == "max_steps" and first.global_step == 5
    res = train(parse_args(_gpu_flags(out, "--resume", os.path.join(out, "checkpoint-last.pth"))))
    assert res.exit_code == 0 and res.global_step == 12


def test_measure_against_bench_record(tmp_path, capsys):
    from fastmae.pretrain import measure

    record = {"env": {"card": "test"}, "results": [
        {"model": "vit_b16", "batch_size": 256, "mask_ratio": 0.75, "backend": "triton", "mode": "eager",
         "encoder": "visible", "status": "ok", "reason": "", "ms_per_step": 50.0},
        {"model": "vit_b16", "batch_size": 256, "mask_ratio": 0.75, "backend": "triton", "mode": "eager",
         "encoder": "mask_tokens", "status": "ok", "reason": "", "ms_per_step": 90.0},
    ]}
    rows = [{"step": 10, "step_ms": 400.0}, {"step": 20, "step_ms": 51.0}, {"step": 30, "step_ms": 51.2},
            {"step": 40, "step_ms": 50.9}]
    res = measure.compare(record, rows, "mae_vit_base_patch16", 256, "triton")
    assert res["pretrain_ms_per_step"] == 51.0 and res["bench_ms_per_step"] == 50.0  # first window skipped
    assert res["overhead"] == pytest.approx(0.02) and res["within_target"]
    bench, log = tmp_path / "bench-x.json", tmp_path / "log_steps.txt"
    bench.write_text(json.dumps(record))
    log.write_text("".join(json.dumps(r) + "\n" for r in rows[:1] + [{"step": 20, "step_ms": 60.0}]))
    assert measure.main(["--bench", str(tmp_path / "bench-*.json"), "--log", str(log), "--out",
                         str(tmp_path / "cmp.json")]) == 1  # 20% over: not within 3%
    assert "NOT within 3%" in capsys.readouterr().out
    assert json.load(open(tmp_path / "cmp.json"))["overhead"] == pytest.approx(0.2)
    with pytest.raises(ValueError, match="no bench row"):
        measure.bench_step_ms(record, "mae_vit_large_patch16", 256, "triton")
