"""Data pipeline throughput per CPU core: fastmae.data against the official MAE pipeline, in one run.

    python -m benchmarks.bench_data                       # 64 images, ~500 px, quality 90
    python -m benchmarks.bench_data --long-side 1200      # larger photographs
    python -m benchmarks.bench_data --images 8 --rounds 1 --out /tmp/x   # a smoke run

Both pipelines read the same ImageNet-style folder of JPEGs that this script writes to a
temporary directory: crops and resizes of the photographs shipped in installed packages
(:func:`fastmae.data.embedded_images`), long side ``--long-side`` (default 500, ImageNet's
usual size), aspect ratios from 1:2 to 2:1, Pillow quality ``--quality`` (default 90).

Timed, in one process with one torch thread (what a DataLoader worker does, i.e. per core):

- ``official``: ``torchvision.datasets.ImageFolder`` (PIL open + ``convert("RGB")``) with
  ``main_pretrain.py``'s ``transform_train`` (RandomResizedCrop(224, scale=(0.2, 1.0),
  bicubic), RandomHorizontalFlip, ToTensor, Normalize), batches by ``default_collate``;
- ``fastmae``: :class:`fastmae.data.PretrainDataset` as it runs by default (header-first crop
  draw; the crop-aware libjpeg-turbo decode of ``fastmae._jpeg`` when it is built, at a
  DCT-reduced scale where the crop allows it; uint8 bicubic crop-resize, flip) batched by
  :func:`fastmae.data.collate` (uint8; normalisation happens later, on the device). The
  record's ``jpeg_decoder`` says which decoder that was;
- ``fastmae_torchvision_decode``: the same with ``jpeg_decoder="torchvision"`` (torchvision's
  full-image decode, or Pillow's reduced-scale decode where the crop allows it);
- ``fastmae_full_decode``: every JPEG decoded whole at full scale by torchvision.

Each round times every pipeline over all images (``--batch-size`` items, then the collate),
pipelines interleaved round by round (in a rotating order) so that load from other
processes, and what one pipeline leaves in the caches for the next, hit them alike.
"Per core" is images per CPU-second of this process (``time.process_time``; one thread, so
time spent waiting for a core on a shared machine is not counted); wall-clock figures are
recorded beside them. The figures are medians over rounds and the ratio is taken per round
(its median and range are reported). The files are read once before timing (page cache), so disk speed is not
measured. A JSON record (kind ``data``) is written atomically to ``--out``.

With a GPU (``--device-transfer``, on by default when CUDA is there) it also times a batch's
trip to the device: fastmae's pinned uint8 copy plus the normalisation kernel, against the
official loop's copy of a float32 batch (:func:`device_transfer`).
"""

from __future__ import annotations

import argparse
import os
import random
import shlex
import statistics
import sys
import tempfile
import time

import torch

from fastmae import _timing

__all__ = ["make_images", "pipelines", "run", "main"]


def make_images(out_dir: str, count: int, long_side: int = 500, quality: int = 90, seed: int = 0) -> list[str]:
    """Write ``count`` JPEGs into ``out_dir/train/n0/`` (an ImageNet-style tree); return their paths."""
    from PIL import Image

    from fastmae.data import embedded_images

    rng = random.Random(seed)
    sources = []
    for p in embedded_images():
        with Image.open(p) as im:
            sources.append(im.convert("RGB"))
    folder = os.path.join(out_dir, "train", "n0")
    os.makedirs(folder, exist_ok=True)
    paths = []
    for k in range(count):
        src = sources[k % len(sources)]
        W, H = src.size
        aspect = rng.choice((4 / 3, 3 / 4, 3 / 2, 2 / 3, 1.0, 2.0, 0.5, 5 / 4))
        zoom = rng.uniform(0.6, 1.0)  # fraction of the source's largest box of that aspect
        bw, bh = (W, W / aspect) if W / H < aspect else (H * aspect, H)
        bw, bh = max(16, bw * zoom), max(16, bh * zoom)
        x0, y0 = rng.uniform(0, W - bw), rng.uniform(0, H - bh)
        if aspect >= 1:
            size = (long_side, max(1, round(long_side / aspect)))
        else:
            size = (max(1, round(long_side * aspect)), long_side)
        img = src.resize(size, Image.BICUBIC, box=(x0, y0, x0 + bw, y0 + bh))
        path = os.path.join(folder, f"img_{k:05d}.JPEG")
        img.save(path, quality=quality)
        paths.append(path)
    return paths


def pipelines(root: str, input_size: int = 224, seed: int = 0) -> dict:
    """name -> (dataset, collate_fn) for the pipelines compared."""
    from torchvision import datasets, transforms
    from torchvision.transforms import InterpolationMode

    from fastmae import data

    transform_train = transforms.Compose([  # main_pretrain.py's
        transforms.RandomResizedCrop(input_size, scale=(0.2, 1.0), interpolation=InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
    ])
    official = datasets.ImageFolder(root, transform=transform_train)
    fast = data.PretrainDataset(root, input_size, seed=seed)
    tv = data.PretrainDataset(root, input_size, seed=seed)
    tv.jpeg_decoder = "torchvision"
    full = data.PretrainDataset(root, input_size, seed=seed)
    full.crop_aware = False
    return {
        "official": (official, torch.utils.data.default_collate),
        "fastmae": (fast, data.collate),
        "fastmae_torchvision_decode": (tv, data.collate),
        "fastmae_full_decode": (full, data.collate),
    }


def _time_once(ds, collate, batch_size: int) -> tuple[float, float]:
    """(CPU seconds of this process, wall seconds) to load and collate all of ``ds``."""
    n = len(ds)
    c0, t0 = time.process_time(), time.perf_counter()
    for start in range(0, n, batch_size):
        batch = collate([ds[i] for i in range(start, min(n, start + batch_size))])
        assert batch[0].shape[0] > 0
    return time.process_time() - c0, time.perf_counter() - t0


def run(root: str, *, rounds: int = 5, batch_size: int = 32, input_size: int = 224, seed: int = 0,
        log=print) -> dict:  # fmt: skip
    """Time every pipeline over ``root`` for ``rounds`` interleaved rounds: the results part of a record."""
    pipes = pipelines(root, input_size, seed)
    n = len(next(iter(pipes.values()))[0])
    for ds, collate in pipes.values():  # warm-up: page cache, lazy imports, allocator
        _time_once(ds, collate, batch_size)
    cpu: dict[str, list[float]] = {name: [] for name in pipes}
    wall: dict[str, list[float]] = {name: [] for name in pipes}
    names = list(pipes)
    for r in range(rounds):
        # the order rotates each round: what runs after the official pipeline (which leaves the
        # allocator and caches full of float tensors) measured systematically slower
        for name in names[r % len(names):] + names[: r % len(names)]:
            ds, collate = pipes[name]
            if hasattr(ds, "set_epoch"):
                ds.set_epoch(r + 1)
            c, w = _time_once(ds, collate, batch_size)
            cpu[name].append(n / c)
            wall[name].append(n / w)
        log(f"round {r + 1}/{rounds}: " + ", ".join(f"{k} {v[-1]:,.0f}" for k, v in cpu.items()) + " images/CPU-s")
    from fastmae.data import decode

    out = {"images": n, "rounds": rounds, "batch_size": batch_size, "input_size": input_size,
           "jpeg_decoder": "fastmae._jpeg" if decode.crop_decoder() else "torchvision", "pipelines": {}}  # fmt: skip
    for name in pipes:
        rec = out["pipelines"][name] = {
            "images_per_cpu_s_median": statistics.median(cpu[name]),
            "images_per_cpu_s_rounds": cpu[name],
            "images_per_wall_s_median": statistics.median(wall[name]),
            "images_per_wall_s_rounds": wall[name],
        }
        if name != "official":
            ratios = [a / b for a, b in zip(cpu[name], cpu["official"])]
            rec["speedup_vs_official_median"] = statistics.median(ratios)
            rec["speedup_vs_official_min"] = min(ratios)
            rec["speedup_vs_official_max"] = max(ratios)
            rec["speedup_vs_official_wall_median"] = statistics.median(
                a / b for a, b in zip(wall[name], wall["official"]))
    return out


def device_transfer(device, batch_size: int = 256, input_size: int = 224, iters: int = 20,
                    dtype: torch.dtype = torch.bfloat16) -> dict:  # fmt: skip
    """Device time (ms, median) per batch of getting images onto ``device``: fastmae's uint8
    copy + on-device normalisation (:func:`fastmae.data.to_device`), the normalisation kernel
    alone, and the official loop's copy of a normalised float32 batch
    (``samples.to(device, non_blocking=True)``). Pinned host memory on CUDA, as the loaders use."""
    from fastmae import data, ops

    dev = torch.device(device)
    u8 = torch.randint(0, 256, (batch_size, 3, input_size, input_size), dtype=torch.uint8)
    f32 = ops.normalize_images(u8)  # the official pipeline's float32 batch, normalised on the CPU
    if dev.type == "cuda":
        u8, f32 = u8.pin_memory(), f32.pin_memory()
    u8_dev = u8.to(dev)
    cases = {
        "fastmae_uint8_copy_and_normalize": lambda: data.to_device(u8, dev, dtype=dtype),
        "fastmae_normalize_only": lambda: ops.normalize_images(u8_dev, out_dtype=dtype),
        "official_float32_copy": lambda: f32.to(dev, non_blocking=True),
    }
    out = {"device": _timing.card_name(dev), "batch_size": batch_size, "input_size": input_size,
           "out_dtype": str(dtype).replace("torch.", ""), "iters": iters}  # fmt: skip
    for name, fn in cases.items():
        out[f"{name}_ms_median"] = _timing.median(_timing.time_calls(fn, dev, iters, warmup=3))
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--images", type=int, default=64, help="JPEGs to write and time (default 64)")
    p.add_argument("--long-side", type=int, default=500, help="their long side in pixels (default 500)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality (default 90)")
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: per core)")
    p.add_argument("--out", default="bench-out", help="directory of the JSON record (default bench-out/)")
    p.add_argument("--device-transfer", default="auto", choices=("auto", "off", "cpu", "cuda"),
                   help="also time the batch's trip to the device (auto: on CUDA when there is one)")
    p.add_argument("--transfer-batch", type=int, default=256, help="batch size of --device-transfer (default 256)")
    args = p.parse_args(argv)
    if args.images < 1 or args.rounds < 1 or args.batch_size < 1:
        p.error("--images, --rounds and --batch-size must be >= 1")
    torch.set_num_threads(args.threads)
    command = shlex.join(["python", "-m", "benchmarks.bench_data", *(sys.argv[1:] if argv is None else argv)])
    env = _timing.environment("cpu", command=command)
    with tempfile.TemporaryDirectory(prefix="fastmae-bench-data-") as tmp:
        make_images(tmp, args.images, args.long_side, args.quality, args.seed)
        results = run(os.path.join(tmp, "train"), rounds=args.rounds, batch_size=args.batch_size,
                      input_size=args.input_size, seed=args.seed)  # fmt: skip
    transfer = args.device_transfer
    if transfer == "auto":
        transfer = "cuda" if torch.cuda.is_available() else "off"
    if transfer != "off":
        results["device_transfer"] = device_transfer(transfer, args.transfer_batch, args.input_size)
    record = {"kind": "data", "env": env, "config": {**vars(args), "torch_threads": torch.get_num_threads()},
              "results": results}  # fmt: skip
    path = os.path.join(args.out, f"bench-data-{_timing.slug(env['card'])}-{env['timestamp']}.json")
    _timing.write_json(path, record)
    print(f"\n{env['card']} | torch {env['torch']} | {env['date']} | commit {env['git_commit'][:12]}")
    print(f"{args.images} JPEGs, long side {args.long_side}, quality {args.quality}, {args.input_size} px crops, "
          f"{args.rounds} rounds, {torch.get_num_threads()} torch thread(s), one process; "
          f"fastmae's JPEG decoder: {results['jpeg_decoder']}")
    for name, r in results["pipelines"].items():
        line = f"  {name:26s} {r['images_per_cpu_s_median']:8,.0f} images/s per core"
        if name != "official":
            lo, hi = r["speedup_vs_official_min"], r["speedup_vs_official_max"]
            line += f"  {r['speedup_vs_official_median']:.2f}x official (rounds {lo:.2f}-{hi:.2f})"
        print(line + f"  [wall: {r['images_per_wall_s_median']:,.0f} images/s]")
    if "device_transfer" in results:
        t = results["device_transfer"]
        print(f"to the device ({t['device']}, batch {t['batch_size']}, {t['out_dtype']}): "
              + ", ".join(f"{k[:-10]} {v:.3f} ms" for k, v in t.items() if k.endswith("_ms_median")))
    print(f"record: {path}")
    return record


if __name__ == "__main__":
    main()
