"""Distributed set-up from torchrun's environment: no launcher of fastmae's own.

``torchrun --nproc_per_node N [--nnodes M --node_rank R --master_addr A --master_port P]
-m fastmae pretrain ...`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``; :func:`init_distributed` reads them (or the OpenMPI ones with the official
``--dist_on_itp``) and starts the process group: NCCL when training on CUDA, gloo on the
CPU (``--dist_backend`` overrides). Without those variables it is a single process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "init_distributed", "cleanup", "all_gather_objects", "barrier"]


@dataclass
class DistInfo:
    distributed: bool = False
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str) -> int:
    try:
        return int(os.environ[name])
    except ValueError:
        raise ValueError(f"environment variable {name}={os.environ[name]!r} is not an integer") from None


def init_distributed(args, device_type: str) -> DistInfo:
    """Start the process group when launched by torchrun (or OpenMPI with ``--dist_on_itp``)."""
    if getattr(args, "dist_on_itp", False):
        for name in ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
                     "MASTER_ADDR", "MASTER_PORT"):
            if name not in os.environ:
                raise ValueError(f"--dist_on_itp needs the environment variable {name}")
        os.environ["RANK"] = os.environ["OMPI_COMM_WORLD_RANK"]
        os.environ["WORLD_SIZE"] = os.environ["OMPI_COMM_WORLD_SIZE"]
        os.environ["LOCAL_RANK"] = os.environ["OMPI_COMM_WORLD_LOCAL_RANK"]
        args.dist_url = f"tcp://{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistInfo()
    rank, world = _env_int("RANK"), _env_int("WORLD_SIZE")
    local = _env_int("LOCAL_RANK") if "LOCAL_RANK" in os.environ else 0
    if world == 1 and not dist.is_available():
        return DistInfo()
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    backend = args.dist_backend
    if backend == "auto":
        backend = "nccl" if device_type == "cuda" else "gloo"
    if backend == "nccl" and device_type != "cuda":
        raise ValueError("--dist_backend nccl needs --device cuda; use gloo on the CPU")
    if device_type == "cuda":
        if local >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK={local} but this node has {torch.cuda.device_count()} CUDA device(s)")
        torch.cuda.set_device(local)
    init = args.dist_url if args.dist_url and args.dist_url != "env://" else "env://"
    kwargs = {"device_id": torch.device("cuda", local)} if backend == "nccl" else {}
    dist.init_process_group(backend=backend, init_method=init, world_size=world, rank=rank, **kwargs)
    return DistInfo(True, rank, world, local, backend)


def cleanup(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def all_gather_objects(info: DistInfo, obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` (``[obj]`` in a single process). A host sync: not per step."""
    if not info.distributed:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out
