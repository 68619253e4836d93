"""Exact resume on the CPU: a run SIGKILLed mid-epoch and resumed reaches the uninterrupted
run's parameters bitwise; so does one resumed at an epoch boundary, and one stopped with
``--max_steps`` (with gradient accumulation and persistent loader workers). Official
checkpoints load; corrupt, truncated, foreign or mismatched ones are clear errors.

The bitwise comparisons are between runs with the same thread count (subprocesses with
OMP_NUM_THREADS=1, or in-process runs with one torch thread): CPU kernels are deterministic
for a fixed thread count.
"""

import argparse
import json
import os
import pathlib
import signal
import stat
import time

import pytest
import torch
from _pretrain_helpers import assert_same_params, make_images, run_cli, state_of, tiny_flags

from fastmae.pretrain import checkpoint as ck
from fastmae.pretrain import engine as engine_mod
from fastmae.pretrain import main, parse_args, train


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("images"), n=16)


def _final(out):
    return state_of(os.path.join(out, "checkpoint-last.pth"))


def _rows(path):
    return [json.loads(line) for line in open(path)]


# ----------------------------------------------------------------------------- SIGKILL mid-epoch
def test_sigkill_mid_epoch_then_resume_is_bitwise(images, tmp_path):
    # 8 batches of 2 per epoch, 2 epochs; checkpoint-last every 3 steps: steps 3, 6 are mid-epoch
    common = dict(batch_size=2, epochs=2, warmup_epochs=1, ckpt_every_steps=3, log_every=2)
    ref_out, out = str(tmp_path / "ref"), str(tmp_path / "run")
    ref = run_cli(tiny_flags(images, ref_out, **common))
    killed = run_cli(tiny_flags(images, out, **common))
    last = os.path.join(out, "checkpoint-last.pth")
    deadline = time.time() + 240
    while not os.path.exists(last) and killed.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait(timeout=60)
    assert killed.returncode == -signal.SIGKILL, killed.stdout.read()
    at_kill = state_of(last)["fastmae"]
    assert at_kill["next_step"] != 0 and at_kill["global_step"] < 16, at_kill  # killed mid-epoch, mid-run

    resumed = run_cli(tiny_flags(images, out, resume=last, **common))
    out_r = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, out_r
    assert "resumed" in out_r
    out_ref = ref.communicate(timeout=300)[0]
    assert ref.returncode == 0, out_ref
    a, b = _final(ref_out), _final(out)
    assert b["fastmae"]["global_step"] == a["fastmae"]["global_step"] == 16
    assert_same_params(a["model"], b["model"])
    for (ka, sa), (kb, sb) in zip(a["optimizer"]["state"].items(), b["optimizer"]["state"].items()):
        assert ka == kb and all(torch.equal(sa[k], sb[k]) for k in sa)
    # the epoch log of the resumed run is the uninterrupted one's, row for row
    assert _rows(os.path.join(out, "log.txt")) == _rows(os.path.join(ref_out, "log.txt"))
    steps = [r["step"] for r in _rows(os.path.join(out, "log_steps.txt"))]
    assert steps == sorted(set(steps))  # rows after the checkpoint were dropped on resume, none doubled
    assert [r["loss"] for r in _rows(os.path.join(out, "log_steps.txt"))] == \
        [r["loss"] for r in _rows(os.path.join(ref_out, "log_steps.txt"))]


# ----------------------------------------------------------------------------- in-process resumes
def test_resume_at_epoch_boundary_is_bitwise(images, tmp_path):
    common = dict(batch_size=2, epochs=3, warmup_epochs=1, save_every_epochs=1)
    ref = train(parse_args(tiny_flags(images, str(tmp_path / "ref"), **common)))
    out = str(tmp_path / "run")
    first = train(parse_args(tiny_flags(images, out, max_steps=8, **common)))  # 8 steps = epoch 0
    assert (first.status, first.next_epoch, first.next_step) == ("max_steps", 1, 0)
    e0 = state_of(os.path.join(out, "checkpoint-0.pth"))
    assert e0["epoch"] == 0 and e0["fastmae"]["next_epoch"] == 1 and e0["fastmae"]["next_step"] == 0
    res = train(parse_args(tiny_flags(images, out, resume=os.path.join(out, "checkpoint-0.pth"), **common)))
    assert res.global_step == ref.global_step == 24
    assert_same_params(ref.model.state_dict(), res.model.state_dict())


def test_max_steps_mid_epoch_with_accumulation_and_workers_is_bitwise(images, tmp_path):
    # accum 2: 8 batches per epoch = 4 optimizer steps; 2 persistent workers; stop after 3 steps (mid-epoch)
    common = dict(batch_size=2, epochs=2, warmup_epochs=1, accum_iter=2, num_workers=2, log_every=1)
    ref_out, out = str(tmp_path / "ref"), str(tmp_path / "run")
    ref = train(parse_args(tiny_flags(images, ref_out, **common)))
    first = train(parse_args(tiny_flags(images, out, max_steps=3, **common)))
    assert (first.status, first.next_epoch, first.next_step) == ("max_steps", 0, 6)
    last = os.path.join(out, "checkpoint-last.pth")
    assert state_of(last)["fastmae"]["next_step"] == 6
    res = train(parse_args(tiny_flags(images, out, resume=last, **common)))
    assert res.global_step == ref.global_step == 8
    assert_same_params(ref.model.state_dict(), res.model.state_dict())
    assert _rows(os.path.join(out, "log.txt")) == _rows(os.path.join(ref_out, "log.txt"))


def test_resume_of_a_finished_run_does_nothing(images, tmp_path):
    out = str(tmp_path / "o")
    a = train(parse_args(tiny_flags(images, out, epochs=1, warmup_epochs=0)))
    b = train(parse_args(tiny_flags(images, out, epochs=1, warmup_epochs=0,
                                    resume=os.path.join(out, "checkpoint-last.pth"))))
    assert b.global_step == a.global_step and b.exit_code == 0
    assert_same_params(a.model.state_dict(), b.model.state_dict())


def test_mid_epoch_checkpoint_with_other_batches_is_an_error(images, tmp_path, capsys):
    out = str(tmp_path / "o")
    train(parse_args(tiny_flags(images, out, batch_size=2, epochs=1, warmup_epochs=0, max_steps=3)))
    rc = main(tiny_flags(images, out, batch_size=4, epochs=1, warmup_epochs=0,
                         resume=os.path.join(out, "checkpoint-last.pth")))
    assert rc == 2
    err = capsys.readouterr().err
    assert "mid-epoch" in err and "batch_size 2 -> 4" in err


class _Killed(BaseException):
    """A kill at one instant of the run (not an Exception: nothing in the run may catch it)."""


@pytest.mark.parametrize("kill_at", ["log_row", "checkpoint"])
def test_kill_at_the_end_of_an_epoch_keeps_every_log_row_once(images, tmp_path, monkeypatch, kill_at):
    """Killed while the end of epoch 1 is written (at its log.txt row, or at its checkpoint-last.pth
    right after the row), then resumed from checkpoint-last.pth: log.txt is the uninterrupted run's."""
    common = dict(epochs=3, warmup_epochs=1, no_plot=True)
    ref_out, out = str(tmp_path / "ref"), str(tmp_path / "run")
    train(parse_args(tiny_flags(images, ref_out, **common)))
    armed = {"on": True}
    append, save = engine_mod._append_jsonl, ck.atomic_save

    def append_or_die(path, row):
        if armed["on"] and kill_at == "log_row" and path.endswith("log.txt") and row["epoch"] == 1:
            raise _Killed
        append(path, row)

    def save_or_die(obj, path):
        if (armed["on"] and kill_at == "checkpoint" and path.endswith("checkpoint-last.pth")
                and (obj["fastmae"]["next_epoch"], obj["fastmae"]["next_step"]) == (2, 0)):
            assert [r["epoch"] for r in _rows(os.path.join(out, "log.txt"))] == [0, 1]  # the row came first
            raise _Killed
        save(obj, path)

    monkeypatch.setattr(engine_mod, "_append_jsonl", append_or_die)
    monkeypatch.setattr(ck, "atomic_save", save_or_die)
    with pytest.raises(_Killed):
        train(parse_args(tiny_flags(images, out, **common)))
    armed["on"] = False
    last = os.path.join(out, "checkpoint-last.pth")
    assert state_of(last)["fastmae"]["next_epoch"] == 1  # the kill came before epoch 1's checkpoint
    res = train(parse_args(tiny_flags(images, out, resume=last, **common)))
    assert res.exit_code == 0 and res.next_epoch == 3
    rows = _rows(os.path.join(out, "log.txt"))
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    assert rows == _rows(os.path.join(ref_out, "log.txt"))


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_scaler_state_loads_officially_and_resumes(images, tmp_path, precision):
    """The 'scaler' entry loads into an enabled GradScaler (what the official util/misc.py load_model
    does) for every precision; fp16's real scaler state is saved and restored exactly."""
    common = dict(batch_size=2, epochs=2, warmup_epochs=1, precision=precision, log_every=3, no_plot=True)
    ref_out, out = str(tmp_path / "ref"), str(tmp_path / "run")
    ref = train(parse_args(tiny_flags(images, ref_out, **common)))
    train(parse_args(tiny_flags(images, out, max_steps=5, **common)))
    last = os.path.join(out, "checkpoint-last.pth")
    mid = state_of(last)
    res = train(parse_args(tiny_flags(images, out, resume=last, **common)))
    assert res.global_step == ref.global_step == 16
    assert_same_params(ref.model.state_dict(), res.model.state_dict())
    a, b = _final(ref_out), _final(out)
    for state in (mid["scaler"], a["scaler"], b["scaler"]):
        torch.amp.GradScaler("cpu", enabled=True).load_state_dict(state)  # raised on the old {}
    assert b["scaler"] == a["scaler"]
    if precision == "fp16":  # 5 then 16 steps without an overflow: the real scaler's count, carried over
        assert (mid["scaler"]["_growth_tracker"], b["scaler"]["_growth_tracker"]) == (5, 16)
    else:
        assert b["scaler"] == torch.amp.GradScaler("cpu", enabled=True).state_dict()


def test_start_past_the_end_is_an_error(images, tmp_path, capsys):
    out = str(tmp_path / "o")
    assert main(tiny_flags(images, out, epochs=2, warmup_epochs=0, start_epoch=3)) == 2
    assert "--start_epoch 3 is past --epochs 2" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(out, "checkpoint-last.pth"))
    # a complete 2-epoch run resumed with --epochs 1
    train(parse_args(tiny_flags(images, out, epochs=2, warmup_epochs=0, no_plot=True)))
    last = os.path.join(out, "checkpoint-last.pth")
    before = open(last, "rb").read()
    assert main(tiny_flags(images, out, epochs=1, warmup_epochs=0, resume=last)) == 2
    assert "has 2 epochs done, more than --epochs 1" in capsys.readouterr().err
    assert [r["epoch"] for r in _rows(os.path.join(out, "log.txt"))] == [0, 1]  # the logs are left alone
    assert open(last, "rb").read() == before
    # a mid-epoch checkpoint (epoch 1, step 2 of 4) resumed with --epochs lowered to exclude epoch 1
    mid = str(tmp_path / "mid")
    train(parse_args(tiny_flags(images, mid, epochs=3, warmup_epochs=0, max_steps=6, no_plot=True)))
    last = os.path.join(mid, "checkpoint-last.pth")
    assert (state_of(last)["fastmae"]["next_epoch"], state_of(last)["fastmae"]["next_step"]) == (1, 2)
    steps_before = _rows(os.path.join(mid, "log_steps.txt"))
    for epochs in (1, 2):
        rc = main(tiny_flags(images, mid, epochs=epochs, warmup_epochs=0, resume=last))
        err = capsys.readouterr().err
        assert (rc == 2) == (epochs == 1), err
        if epochs == 1:
            assert "continues epoch 1 at step 2/4, but --epochs 1" in err
            assert _rows(os.path.join(mid, "log_steps.txt")) == steps_before


def test_checkpoint_with_pathlib_args_resumes(images, good_ckpt, tmp_path, capsys):
    """The official submitit_pretrain.py sets args.output_dir / log_dir to pathlib paths."""
    ours = state_of(good_ckpt)
    paths = dict(output_dir=pathlib.Path("/checkpoint/u/123"), log_dir=pathlib.PurePosixPath("/checkpoint/u/log"),
                 job_dir=pathlib.PureWindowsPath(r"C:\jobs\7"))
    official = {"model": ours["model"], "optimizer": ours["optimizer"], "epoch": 0, "scaler": {},
                "args": argparse.Namespace(model="mae_vit_tiny_patch8", batch_size=4, distributed=True, **paths)}
    path = str(tmp_path / "submitit.pth")
    torch.save(official, path)
    assert vars(ck.load_checkpoint(path)["args"]) == vars(official["args"])
    out = str(tmp_path / "o")
    assert main(tiny_flags(images, out, epochs=2, warmup_epochs=0, resume=path, no_plot=True)) == 0
    assert "official checkpoint" in capsys.readouterr().out
    assert [r["epoch"] for r in _rows(os.path.join(out, "log.txt"))] == [1]


def test_resume_of_a_capturable_optimizer_state_without_cuda_graph(images, tmp_path):
    """A --cuda_graph run's checkpoint holds capturable=True (and step on the GPU): resumed without
    --cuda_graph, this run's flags apply (a CPU AdamW with capturable=True refuses to step) and the
    run continues exactly as from the same checkpoint saved without the flag."""
    common = dict(batch_size=2, epochs=2, warmup_epochs=1, no_plot=True)
    src = str(tmp_path / "src")
    train(parse_args(tiny_flags(images, src, max_steps=8, **common)))
    graphed = state_of(os.path.join(src, "checkpoint-0.pth"))
    for g in graphed["optimizer"]["param_groups"]:
        g.update(capturable=True, fused=True)
    path = str(tmp_path / "graphed.pth")
    torch.save(graphed, path)
    a = train(parse_args(tiny_flags(images, str(tmp_path / "a"), resume=os.path.join(src, "checkpoint-0.pth"),
                                    **common)))
    b = train(parse_args(tiny_flags(images, str(tmp_path / "b"), resume=path, **common)))
    assert a.exit_code == b.exit_code == 0 and a.global_step == b.global_step == 16
    saved = state_of(str(tmp_path / "b" / "checkpoint-last.pth"))["optimizer"]["param_groups"]
    assert all(g["capturable"] is False and not g["fused"] for g in saved)
    assert_same_params(a.model.state_dict(), b.model.state_dict())


# ----------------------------------------------------------------------------- official checkpoints
def test_official_checkpoint_resumes_at_the_next_epoch(images, tmp_path, capsys):
    src = str(tmp_path / "src")
    train(parse_args(tiny_flags(images, src, epochs=1, warmup_epochs=0)))
    ours = state_of(os.path.join(src, "checkpoint-0.pth"))
    official_args = argparse.Namespace(batch_size=4, epochs=1, model="mae_vit_tiny_patch8", input_size=32,
                                       lr=None, distributed=False, dist_backend="nccl", gpu=0)
    official = {"model": ours["model"], "optimizer": ours["optimizer"], "epoch": 0, "scaler": {},
                "args": official_args}
    path = str(tmp_path / "official.pth")
    torch.save(official, path)
    out = str(tmp_path / "o")
    assert main(tiny_flags(images, out, epochs=3, warmup_epochs=0, resume=path)) == 0
    assert "official checkpoint" in capsys.readouterr().out
    assert [r["epoch"] for r in _rows(os.path.join(out, "log.txt"))] == [1, 2]
    # a released checkpoint with only the model: loaded, trained from --start_epoch with a fresh optimizer
    torch.save({"model": ours["model"]}, path)
    assert main(tiny_flags(images, str(tmp_path / "o2"), epochs=1, warmup_epochs=0, resume=path)) == 0
    assert "no optimizer state" in capsys.readouterr().out


# ----------------------------------------------------------------------------- bad checkpoints
class _Foreign:
    pass


@pytest.fixture(scope="module")
def good_ckpt(images, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("good"))
    train(parse_args(tiny_flags(images, out, epochs=1, warmup_epochs=0, no_plot=True)))
    return os.path.join(out, "checkpoint-0.pth")


def _bad(kind, good_ckpt, path):
    raw = open(good_ckpt, "rb").read()
    if kind == "empty":
        open(path, "wb").close()
    elif kind == "truncated":
        open(path, "wb").write(raw[: len(raw) // 2])
    elif kind == "garbage":
        open(path, "wb").write(os.urandom(4096))
    else:
        obj = state_of(good_ckpt)
        if kind == "not_mae":
            obj = {"state_dict": obj["model"]}
        elif kind == "missing_key":
            del obj["model"]["decoder_pred.bias"]
        elif kind == "wrong_shape":
            obj["model"]["decoder_pred.weight"] = obj["model"]["decoder_pred.weight"][:-1]
        elif kind == "optimizer_shape":
            st = obj["optimizer"]["state"]
            k = next(iter(st))
            st[k]["exp_avg"] = st[k]["exp_avg"].flatten()[:-1]
        elif kind == "format":
            obj["fastmae"]["format"] = 99
        elif kind == "foreign_object":
            obj["extra"] = _Foreign()
        torch.save(obj, path)


@pytest.mark.parametrize("kind, message", [
    ("empty", "empty"),
    ("truncated", "truncated or corrupt"),
    ("garbage", "truncated or corrupt"),
    ("not_mae", "not an MAE checkpoint"),
    ("missing_key", "missing keys: decoder_pred.bias"),
    ("wrong_shape", "shape mismatches: decoder_pred.weight"),
    ("optimizer_shape", "optimizer state does not fit"),
    ("format", "format 99"),
    ("foreign_object", "refuses to unpickle"),
])
def test_bad_checkpoint_is_a_clear_error(images, good_ckpt, tmp_path, capsys, kind, message):
    path = str(tmp_path / f"{kind}.pth")
    _bad(kind, good_ckpt, path)
    out = str(tmp_path / "o")
    assert main(tiny_flags(images, out, epochs=1, warmup_epochs=0, resume=path)) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not os.path.exists(os.path.join(out, "checkpoint-0.pth"))  # nothing ran


def test_missing_checkpoint_is_a_clear_error(images, tmp_path, capsys):
    assert main(tiny_flags(images, str(tmp_path / "o"), resume=str(tmp_path / "nope.pth"))) == 2
    assert "no checkpoint file" in capsys.readouterr().err


def test_mismatched_model_is_never_partially_loaded(good_ckpt):
    from fastmae.models.mae import mae_vit_tiny_patch8

    state = state_of(good_ckpt)["model"]
    state["decoder_pred.weight"] = state["decoder_pred.weight"][:-1]
    model = mae_vit_tiny_patch8(img_size=32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ck.CheckpointError, match="shape mismatches"):
        ck.check_model_state(model, state)
    assert_same_params(before, model.state_dict())


# ----------------------------------------------------------------------------- atomic writes
def test_resume_from_a_url_fetches_into_the_hub_cache(images, good_ckpt, tmp_path, capsys, monkeypatch):
    """--resume URL as the official load_model: fetched into torch.hub's cache, the file name's
    hash prefix checked; then read as a file is (the same safe loader)."""
    import hashlib
    import shutil

    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    digest = hashlib.sha256(open(good_ckpt, "rb").read()).hexdigest()
    served = tmp_path / "served"
    served.mkdir()
    shutil.copy(good_ckpt, served / f"mae-{digest[:8]}.pth")
    shutil.copy(good_ckpt, served / "mae-0badc0de.pth")  # a name whose hash prefix is not the file's
    url = (served / f"mae-{digest[:8]}.pth").as_uri()
    out = str(tmp_path / "o")
    assert main(tiny_flags(images, out, epochs=2, warmup_epochs=0, resume=url, no_plot=True)) == 0
    assert (tmp_path / "hub" / "checkpoints" / f"mae-{digest[:8]}.pth").is_file()
    assert [r["epoch"] for r in _rows(os.path.join(out, "log.txt"))] == [1]
    for bad, msg in (((served / "mae-0badc0de.pth").as_uri(), "cannot download it"),
                     ((served / "missing.pth").as_uri(), "cannot download it")):
        capsys.readouterr()
        assert main(tiny_flags(images, str(tmp_path / "x"), epochs=2, resume=bad, no_plot=True)) == 2
        assert msg in capsys.readouterr().err
    assert not (tmp_path / "hub" / "checkpoints" / "mae-0badc0de.pth").exists()


def test_stale_temp_files_of_a_killed_writer_are_removed(images, tmp_path, capsys):
    """A run killed inside atomic_save leaves its temp file (a whole checkpoint's size): the next
    run in that folder removes those of writers no longer alive, and leaves a live writer's."""
    import subprocess

    out = tmp_path / "o"
    out.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = out / f".checkpoint-last.pth.{dead.pid}.0123abcd.tmp"
    stale.write_bytes(b"half a checkpoint")
    live = out / f".checkpoint-0.pth.{os.getpid()}.89abcdef.tmp"
    live.write_bytes(b"being written")
    other = out / "notes.tmp"
    other.write_bytes(b"not ours")
    assert main(tiny_flags(images, str(out), epochs=1, warmup_epochs=0, no_plot=True)) == 0
    assert not stale.exists() and live.exists() and other.exists()
    assert f"removed 1 temporary file(s) of a run killed while writing a checkpoint: {stale.name}" in (
        capsys.readouterr().out)


def test_atomic_save_keeps_the_old_file_when_a_write_fails(tmp_path):
    path = str(tmp_path / "c.pth")
    ck.atomic_save({"model": {"w": torch.ones(3)}}, path)
    mode = stat.S_IMODE(os.stat(path).st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask  # usual permissions, not a temp file's 0600

    class Boom:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        ck.atomic_save({"model": {"w": torch.zeros(3)}, "x": Boom()}, path)
    assert torch.equal(ck.load_checkpoint(path)["model"]["w"], torch.ones(3))
    assert os.listdir(tmp_path) == ["c.pth"]  # no temp file left behind


def test_rng_state_round_trip():
    import random

    import numpy as np

    dev = torch.device("cpu")
    torch.manual_seed(1)
    np.random.seed(2)  # noqa: NPY002
    random.seed(3)
    st = ck.capture_rng(dev)
    a = (torch.rand(3), np.random.rand(3), random.random())  # noqa: NPY002
    ck.restore_rng(st, dev)
    b = (torch.rand(3), np.random.rand(3), random.random())  # noqa: NPY002
    assert torch.equal(a[0], b[0]) and (a[1] == b[1]).all() and a[2] == b[2]


def test_resume_before_a_partial_accumulation_is_bitwise(images, tmp_path):
    # 8 batches, accum 3: updates after batches 3 and 6; batches 7-8 accumulate and are dropped at the
    # epoch's end (the official loop zeroes the gradients when the next epoch starts)
    common = dict(batch_size=2, epochs=2, warmup_epochs=1, accum_iter=3)
    ref = train(parse_args(tiny_flags(images, str(tmp_path / "ref"), **common)))
    out = str(tmp_path / "run")
    first = train(parse_args(tiny_flags(images, out, max_steps=2, **common)))
    assert (first.next_epoch, first.next_step, first.global_step) == (0, 6, 2)
    res = train(parse_args(tiny_flags(images, out, resume=os.path.join(out, "checkpoint-last.pth"), **common)))
    assert res.global_step == ref.global_step == 4
    assert_same_params(ref.model.state_dict(), res.model.state_dict())
