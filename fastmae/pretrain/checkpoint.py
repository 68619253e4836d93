"""Checkpoints that lose nothing: atomic writes, a checked load, the state for exact resume.

Layout (the official one, ``util/misc.py`` ``save_model``, plus one key of fastmae's)::

    {'model': state_dict of the unwrapped model (official keys),
     'optimizer': optimizer.state_dict(), 'epoch': last completed epoch,
     'scaler': GradScaler.state_dict() (when no scaler is used: a fresh enabled one's, which the
               official load_model can load), 'args': argparse.Namespace,
     'fastmae': {'format': 1, 'next_epoch', 'next_step' (data iteration within that epoch),
                 'global_step', 'steps_per_epoch', 'world_size', 'batch_size', 'accum_iter',
                 'data_seed', 'dataset_len', 'sampler': {...},
                 'rng': [per rank: {'torch', 'cuda', 'numpy', 'python'}],
                 'meters': [per rank: {'epoch_loss_sum', 'window_loss_sum'}],
                 'host': {'epoch_lr_sum', 'epoch_n', 'window_n'}}}

``'epoch'`` keeps the official meaning (the last *completed* epoch; official code resumes at
``epoch + 1``), so a mid-epoch ``checkpoint-last.pth`` read by official code restarts the
interrupted epoch, and fastmae resumes from ``next_epoch``/``next_step`` exactly.

Writes (:func:`atomic_save`): a temp file in the same folder, flushed and fsynced, then
``os.replace`` onto the name, then the folder fsynced: a reader, or a run killed at any
instant, sees either the old file or the new one, never half of one.

Loads (:func:`load_checkpoint`) use ``torch.load(weights_only=True)``, which unpickles only
tensors and plain containers, with a few classes allowed besides: ``argparse.Namespace``, the
type of the official ``'args'`` entry (its attributes are plain values; fastmae writes only
plain values into it), and the ``pathlib`` paths the official ``submitit_pretrain.py`` puts
into it (``output_dir``, ``log_dir``). A file that needs any other class is refused with a clear error
rather than unpickled with arbitrary code execution. :func:`check_model_state` and
:func:`check_optimizer_state` compare keys and shapes *before* anything is loaded, so a
mismatched checkpoint is an error, never a partial load.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import random
import re
import secrets

import numpy as np
import torch

__all__ = [
    "FORMAT_VERSION",
    "CheckpointError",
    "atomic_save",
    "atomic_write",
    "load_checkpoint",
    "remove_stale_temp_files",
    "check_model_state",
    "check_optimizer_state",
    "capture_rng",
    "restore_rng",
    "plain_args",
]

FORMAT_VERSION = 1
# the classes besides tensors and plain containers that load_checkpoint unpickles (see the module docstring)
SAFE_GLOBALS = [argparse.Namespace, pathlib.Path, pathlib.PurePath, pathlib.PosixPath, pathlib.WindowsPath,
                pathlib.PurePosixPath, pathlib.PureWindowsPath]


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or does not fit the model / optimizer / run."""


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. a platform without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_file(path: str) -> tuple[int, str]:
    """A new file beside ``path`` (same folder, so ``os.replace`` is atomic): ``(fd, name)``.
    Unlike ``tempfile.mkstemp`` it gets the usual permissions (0666 less the umask), not 0600."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    for _ in range(100):
        tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"cannot create a temporary file beside {path}")


_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")


def remove_stale_temp_files(folder: str) -> list[str]:
    """Remove the temp files :func:`temp_file` left in ``folder`` when their writer was killed
    mid-write (a full checkpoint's size each): those of a process no longer running on this
    machine. Returns their names. Files of a live process are left alone."""
    removed = []
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return removed
    for name in names:
        m = _TEMP_NAME.match(name)
        if m is None or _alive(int(m["pid"])):
            continue
        try:
            os.unlink(os.path.join(folder, name))
            removed.append(name)
        except FileNotFoundError:
            pass
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def atomic_write(path: str, write, mode: str = "wb") -> None:
    """``write(f)`` into a temp file beside ``path``, flush, fsync, ``os.replace`` onto ``path``, fsync the folder."""
    fd, tmp = temp_file(path)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def atomic_save(obj, path: str) -> None:
    """``torch.save(obj, path)`` atomically: temp file in the same folder, fsync, ``os.replace``, fsync folder."""
    atomic_write(path, lambda f: torch.save(obj, f))


def is_url(path: str) -> bool:
    return isinstance(path, str) and path.startswith(("https://", "http://", "file://"))


def fetch(url: str) -> str:
    """The local copy of checkpoint ``url``, as the official ``load_model`` gets one
    (``torch.hub.load_state_dict_from_url(..., check_hash=True)``): downloaded once into torch.hub's
    cache (``<torch.hub.get_dir()>/checkpoints``, atomically), with the file name's hash prefix
    (``name-<sha256 prefix>.pth``) checked when it has one. It is then read as any file is."""
    import urllib.error
    import urllib.parse

    name = os.path.basename(urllib.parse.urlparse(url).path)
    if not name:
        raise CheckpointError(f"--resume {url!r}: the URL names no file")
    folder = os.path.join(torch.hub.get_dir(), "checkpoints")
    os.makedirs(folder, exist_ok=True)
    dst = os.path.join(folder, name)
    if not os.path.isfile(dst):
        m = torch.hub.HASH_REGEX.search(name)
        try:
            torch.hub.download_url_to_file(url, dst, hash_prefix=m.group(1) if m else None, progress=False)
        except (urllib.error.URLError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"--resume {url!r}: cannot download it ({type(e).__name__}: {e})") from e
    return dst


def load_checkpoint(path: str) -> dict:
    """Read a checkpoint safely (see the module docstring); clear errors for missing, corrupt or foreign files.
    A URL (``https://``, ``http://``, ``file://``) is first fetched into torch.hub's cache (:func:`fetch`)."""
    if is_url(path):
        path = fetch(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--resume: no checkpoint file at {path!r}")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"checkpoint {path!r} is empty (0 bytes): a truncated or unfinished write")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a bad file
        lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
        detail = [ln for ln in lines if "Unsupported global" in ln or "error" in ln.lower()]
        first = (detail or lines or [type(e).__name__])[-1][:300]
        if "Unsupported global" in str(e):
            raise CheckpointError(
                f"checkpoint {path!r} holds objects other than tensors, plain containers, argparse.Namespace and "
                f"pathlib paths, and fastmae refuses to unpickle them (torch.load(weights_only=True)): {first}. If "
                "you trust the file, load it yourself with weights_only=False and re-save its 'model'/'optimizer' "
                "entries") from e
        raise CheckpointError(f"cannot read checkpoint {path!r}: the file is truncated or corrupt "
                              f"({type(e).__name__}: {first})") from e
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        kind = type(ckpt).__name__ if not isinstance(ckpt, dict) else f"dict with keys {sorted(ckpt)[:8]}"
        raise CheckpointError(f"checkpoint {path!r} is not an MAE checkpoint: expected a dict with a 'model' "
                              f"state_dict (official layout), got a {kind}")
    if not isinstance(ckpt["model"], dict):
        raise CheckpointError(f"checkpoint {path!r}: 'model' is a {type(ckpt['model']).__name__}, not a state_dict")
    fm = ckpt.get("fastmae")
    if fm is not None:
        if not isinstance(fm, dict) or fm.get("format") != FORMAT_VERSION:
            got = fm.get("format") if isinstance(fm, dict) else type(fm).__name__
            raise CheckpointError(f"checkpoint {path!r} has fastmae state format {got!r}; this fastmae reads "
                                  f"format {FORMAT_VERSION}")
    return ckpt


def _listing(items, n: int = 6) -> str:
    items = list(items)
    more = f" ... ({len(items) - n} more)" if len(items) > n else ""
    return ", ".join(map(str, items[:n])) + more


def check_model_state(model: torch.nn.Module, state: dict, path: str = "checkpoint") -> None:
    """Raise :class:`CheckpointError` unless ``state`` has exactly ``model``'s keys and shapes."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and isinstance(state[k], torch.Tensor) and state[k].shape != own[k].shape]
    not_tensors = [k for k in own if k in state and not isinstance(state[k], torch.Tensor)]
    problems = []
    if missing:
        problems.append(f"missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listing(unexpected)}")
    if shapes:
        problems.append(f"shape mismatches: {_listing(shapes, 4)}")
    if not_tensors:
        problems.append(f"entries that are not tensors: {_listing(not_tensors)}")
    if problems:
        raise CheckpointError(f"{path} does not fit the model ({type(model).__name__}): " + "; ".join(problems)
                              + ". Is --model (and --input_size) the one it was trained with?")


def check_optimizer_state(optimizer: torch.optim.Optimizer, state: dict, path: str = "checkpoint") -> None:
    """Raise :class:`CheckpointError` unless ``state`` fits ``optimizer``'s param groups and parameter shapes."""
    if not isinstance(state, dict) or "param_groups" not in state or "state" not in state:
        raise CheckpointError(f"{path}: 'optimizer' is not an optimizer state_dict")
    groups, saved = optimizer.param_groups, state["param_groups"]
    sizes = [len(g["params"]) for g in groups]
    saved_sizes = [len(g["params"]) for g in saved]
    if sizes != saved_sizes:
        raise CheckpointError(f"{path}: the optimizer state has param groups of sizes {saved_sizes}, this run's "
                              f"optimizer {sizes} (a different model, or different weight-decay groups)")
    params = {pid: p for g_own, g in zip(groups, saved) for pid, p in zip(g["params"], g_own["params"])}
    bad = []
    for pid, st in state["state"].items():
        if pid not in params:
            bad.append(f"state for unknown parameter id {pid}")
            continue
        for k, v in st.items():
            if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape != params[pid].shape:
                bad.append(f"param {pid} {k}: {tuple(v.shape)} vs {tuple(params[pid].shape)}")
    if bad:
        raise CheckpointError(f"{path}: the optimizer state does not fit the model: {_listing(bad, 4)}")


# ----------------------------------------------------------------------------- RNG
def capture_rng(device: torch.device) -> dict:
    """This process's RNG states: torch (CPU), CUDA (``device``'s), numpy's global and python's ``random``."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()  # noqa: NPY002 - the global state official code seeds
    state = {
        "torch": torch.get_rng_state(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
        "python": random.getstate(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }
    return state


def restore_rng(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))  # noqa: NPY002
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def plain_args(args: argparse.Namespace) -> argparse.Namespace:
    """A copy of ``args`` with plain values only (what weights_only loading accepts)."""
    def ok(v):
        if v is None or isinstance(v, (bool, int, float, str)):
            return True
        return isinstance(v, (list, tuple)) and all(ok(x) for x in v)
    return argparse.Namespace(**{k: (v if ok(v) else str(v)) for k, v in vars(args).items()})
