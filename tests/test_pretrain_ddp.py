"""``fastmae pretrain`` under torchrun: 2 gloo processes on the CPU.

* ``torchrun --nproc_per_node 2 -m fastmae pretrain ...`` runs (gradient accumulation, so
  DDP's ``no_sync`` is used on the non-final micro-batches), stops at ``--max_steps`` mid-epoch,
  and only rank 0 writes: one checkpoint, one row per log point, per-rank RNG states in it.
* After N steps the parameters are bitwise identical on both ranks (a driver script calls
  :func:`fastmae.pretrain.train` under torchrun and saves each rank's model).
* Resuming that checkpoint under torchrun reaches the uninterrupted 2-process run bitwise
  (gloo's sum of two gradients is order-independent, and every other input is restored).

Not asserted: equality with a single-process run of the same global batch. The batches
hold the same images with the same crops (the sampler interleaves one permutation, and a
crop is a function of (seed, epoch, index)), but each rank draws its masking noise from its
own generator (seed + rank, as the official code seeds), so the masks differ; and the
averaged gradient sums in a different order than one process's mean would.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from _pretrain_helpers import REPO, assert_same_params, make_images, state_of, tiny_flags

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")

DRIVER = """
import os, sys
import torch
torch.set_num_threads(1)
from fastmae.pretrain import parse_args, train
res = train(parse_args(sys.argv[2:]))
assert res.exit_code == 0, res
torch.save(res.model.state_dict(), os.path.join(sys.argv[1], "rank%s.pt" % os.environ["RANK"]))
"""


def _torchrun(args, timeout=300, nproc=2):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    return p.stdout + p.stderr


def _ranks(folder):
    return [torch.load(os.path.join(folder, f"rank{r}.pt"), map_location="cpu") for r in (0, 1)]


def test_torchrun_two_gloo_processes(tmp_path):
    images = make_images(tmp_path / "images", n=16)
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    # 16 images / 2 ranks / batch 2 = 4 batches per rank per epoch; accum 2: 2 optimizer steps per epoch
    common = dict(batch_size=2, epochs=2, warmup_epochs=1, accum_iter=2, log_every=1)

    # the uninterrupted 2-process run: parameters identical across ranks, and trained
    ref = tmp_path / "ref"
    ref.mkdir()
    _torchrun([str(driver), str(ref), *tiny_flags(images, str(ref / "out"), **common)])
    r0, r1 = _ranks(ref)
    assert_same_params(r0, r1)

    # the command itself, stopped mid-epoch (step 3 of 4: epoch 1, batch 2 of 4)
    out = tmp_path / "run"
    log = _torchrun(["-m", "fastmae", "pretrain", *tiny_flags(images, str(out), max_steps=3, **common)])
    assert "2 process(es) (gloo)" in log and log.count("data: 16 images") == 1  # rank 0 alone prints
    last = state_of(out / "checkpoint-last.pth")
    fm = last["fastmae"]
    assert (fm["world_size"], fm["next_epoch"], fm["next_step"], fm["global_step"]) == (2, 1, 2, 3)
    assert len(fm["rng"]) == 2 and not torch.equal(fm["rng"][0]["torch"], fm["rng"][1]["torch"])  # per rank
    assert not torch.equal(last["model"]["blocks.0.attn.qkv.weight"], r0["blocks.0.attn.qkv.weight"])
    steps = [json.loads(line)["step"] for line in open(out / "log_steps.txt")]
    assert steps == [1, 2, 3]  # one row per log point: rank 1 writes nothing
    assert [json.loads(line)["epoch"] for line in open(out / "log.txt")] == [0]

    # resumed under torchrun: bitwise the uninterrupted run, on both ranks
    res = tmp_path / "res"
    res.mkdir()
    _torchrun([str(driver), str(res), *tiny_flags(images, str(out), resume=str(out / "checkpoint-last.pth"),
                                                  **common)])
    s0, s1 = _ranks(res)
    assert_same_params(s0, s1)
    assert_same_params(r0, s0)


@pytest.mark.gpu
def test_torchrun_nccl_on_one_gpu(tmp_path):
    """NCCL and DDP on CUDA (one process: NCCL refuses two processes on one GPU)."""
    out = str(tmp_path / "o")
    log = _torchrun(["-m", "fastmae", "pretrain", "--synthetic", "--synthetic_size", "128", "--model",
                     "mae_vit_tiny_patch8", "--input_size", "64", "--batch_size", "16", "--epochs", "1",
                     "--warmup_epochs", "0", "--max_steps", "4", "--log_every", "2", "--num_workers", "2",
                     "--output_dir", out, "--log_dir", out, "--no_progress"], nproc=1)
    assert "1 process(es) (nccl)" in log
    assert state_of(os.path.join(out, "checkpoint-last.pth"))["fastmae"]["global_step"] == 4
