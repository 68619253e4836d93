"""Shared by the pretraining tests: a small image folder and the CPU-fast flags."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_images(folder, n: int = 16, seed: int = 0) -> str:
    """``n`` small RGB images in two class folders (JPEG and PNG, sizes 40..63 px): smooth
    gradients plus noise, so the crops differ and the loss has something to learn."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(n):
        h, w = int(rng.integers(40, 64)), int(rng.integers(40, 64))
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([(xx * rng.uniform(2, 6)) % 256, (yy * rng.uniform(2, 6)) % 256,
                         ((xx + yy) * rng.uniform(1, 3)) % 256], -1)
        img = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
        d = os.path.join(str(folder), "train", f"class{i % 2}")
        os.makedirs(d, exist_ok=True)
        Image.fromarray(img).save(os.path.join(d, f"img{i:03d}." + ("png" if i % 3 == 0 else "jpg")))
    return str(folder)


def tiny_flags(data_path, out, **over) -> list[str]:
    """Flags of a CPU-fast run: the tiny model at 32 px (16 patches), batch 4, fp32."""
    flags = dict(data_path=data_path, output_dir=out, log_dir=out, model="mae_vit_tiny_patch8", input_size=32,
                 batch_size=4, epochs=3, warmup_epochs=1, blr=1.5e-3, num_workers=0, log_every=2,
                 ckpt_every_steps=0, device="cpu", precision="fp32")
    flags.update(over)
    argv = []
    for k, v in flags.items():
        if v is True:
            argv.append(f"--{k}")
        elif v is not None and v is not False:
            argv += [f"--{k}", str(v)]
    return argv + ["--norm_pix_loss", "--no_progress"]


def state_of(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def run_cli(argv, timeout=300, env_extra=None, **kw) -> subprocess.Popen:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    env.update(env_extra or {})
    return subprocess.Popen([sys.executable, "-m", "fastmae", "pretrain", *argv], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def assert_same_params(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs (max abs diff {(a[k] - b[k]).abs().max().item()})"
