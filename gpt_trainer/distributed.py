"""Several processes (torchrun, accelerate launch): PyTorch's own process group, NCCL on CUDA (RCCL on ROCm goes by
the same name) and gloo on the CPU. Without a launcher's environment everything here is a no-op for one process."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1


def launched_world() -> World:
    """What torchrun / accelerate launch set (RANK, LOCAL_RANK, WORLD_SIZE); one process without them."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    return World(int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")), size)


def start(world: World, device: torch.device, timeout_s: float) -> torch.device:
    """Join the process group; returns this process's device (cuda:LOCAL_RANK on GPUs). A rank that stops answering
    makes the others fail after `timeout_s` instead of waiting forever."""
    if not world.active:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s),
                                **({"device_id": device} if device.type == "cuda" else {}))
    return device


def stop(world: World, finished: bool) -> None:
    """Leave the process group. Processes that finished wait for each other first: gloo can abort a process that
    tears its group down while another still uses it (the main process samples after training). One that failed
    leaves at once; the launcher stops the others."""
    if world.active and dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def barrier(world: World) -> None:
    if world.active:
        dist.barrier()


def all_reduce(tensor: torch.Tensor, world: World, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if world.active:
        dist.all_reduce(tensor, op=op)
    return tensor
