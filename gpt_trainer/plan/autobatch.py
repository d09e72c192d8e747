"""The batch per optimizer step: `--batch_size auto` finds the largest micro-batch whose training step fits in GPU
memory, and `--global_batch_size` sets the gradient accumulation that reaches a target batch over all processes."""

from __future__ import annotations

import gc
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from ..config import CPU_AUTO_BATCH_SIZE, TrainConfig
from ..errors import UsageError, is_out_of_memory
from ..model.gpt import build_model
from ..system.distributed import World, all_reduce
from ..system.hardware import MEMORY_MARGIN, autocast, usable_gpu_memory
from .memory import plan_for_flags

LARGEST_TRIED = 1024


def largest_that_fits(peak_bytes_of: Callable[[int], int], memory_limit: int, largest: int = LARGEST_TRIED) -> int:
    """The largest power of two b <= largest whose training step, `peak_bytes_of(b)`, stays under memory_limit and
    does not run out of memory (PyTorch's allocator, or a GPU library such as cuBLAS or cuDNN that could not get its
    workspace: errors.is_out_of_memory); 0 when not even 1 does."""
    fits, batch = 0, 1
    while batch <= largest:
        try:
            if peak_bytes_of(batch) > memory_limit:
                break
        except (torch.OutOfMemoryError, RuntimeError, MemoryError) as error:
            if not is_out_of_memory(error):
                raise
            break
        fits, batch = batch, batch * 2
    return fits


def step_peak_bytes(cfg: TrainConfig, vocab_size: int, device: torch.device,
                    precision: str) -> tuple[Callable[[int], int], int]:
    """(a function of the micro-batch size: the memory the allocator reserved at the peak of one real training step
    of this model - forward, backward, the run's optimizer step -, the model's parameter bytes). Eager steps are
    measured: compiled ones need less, so the answer errs on the safe side."""
    model = build_model(cfg.to_dict(), vocab_size, device)
    optimizers = trial_optimizers(model, cfg)

    def peak_bytes_of(batch_size: int) -> int:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        try:
            tokens = torch.randint(vocab_size, (batch_size, cfg.block_size + 1), device=device)
            with autocast(device, precision):
                _, loss = model(tokens[:, :-1], tokens[:, 1:])
            loss.backward()
            for optimizer in optimizers:
                optimizer.step()
            return torch.cuda.max_memory_reserved(device)
        finally:
            model.zero_grad(set_to_none=True)
    return peak_bytes_of, sum(p.numel() * p.element_size() for p in model.parameters())


def trial_optimizers(model: torch.nn.Module, cfg: TrainConfig) -> list[torch.optim.Optimizer]:
    """torch's own optimizers keeping the state the run's keeps: fused AdamW's two moments for every parameter, or under
    --optimizer muon Muon's one momentum buffer for each block matrix (train/optimizers.MuonAdamW's update makes a few
    temporaries of one matrix at a time besides: the margin covers them) and AdamW's for the rest."""
    if cfg.optimizer != "muon":
        return [torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, fused=True)]
    matrices = model.block_matrices()
    rest = [p for p in model.parameters() if all(p is not m for m in matrices)]
    return [torch.optim.Muon(matrices, weight_decay=0.0), torch.optim.AdamW(rest, lr=cfg.learning_rate, fused=True)]


def search(cfg: TrainConfig, vocab_size: int, device: torch.device, precision: str, world: World) -> tuple[int, str]:
    """(the largest micro-batch that fits on every process's GPU, how it was found)."""
    limit = usable_gpu_memory(device)  # the memory plan's figure too (plan/memory.py device_memory)
    if world.active and cfg.parallel == "fsdp":
        # A trial step here would run an unsharded replica, whose weights, gradients and AdamW state are N times
        # what each process holds under FSDP (and may not fit at all): take the memory plan's estimate instead.
        fits = largest_that_fits(lambda b: plan_for_flags(cfg, vocab_size, precision, b, world.size).total, limit)
        how = "whose FSDP training step by the memory plan's estimate fits"
    else:
        measure, parameter_bytes = step_peak_bytes(cfg, vocab_size, device, precision)
        if world.active:  # DistributedDataParallel keeps a second copy of the gradients in its buckets
            limit -= parameter_bytes
        fits = largest_that_fits(measure, limit)
        how = "whose training step fits"
        del measure
        gc.collect()  # the trial model, its optimizer and the tensors of an out-of-memory trial
        torch.cuda.empty_cache()
    if world.active:  # every process must use the same micro-batch: the smallest GPU decides
        fits = int(all_reduce(torch.tensor(fits, device=device), world, dist.ReduceOp.MIN).item())
    if fits == 0:
        raise UsageError(f"--batch_size auto: not even one sequence of --block_size {cfg.block_size} fits in "
                         f"{limit / 2**30:.1f} GiB of GPU memory with model {cfg.model_label()}. Use a smaller "
                         f"--model_size or --block_size.")
    return fits, (f"the largest power of two {how} in {limit / 2**30:.1f} GiB, "
                  f"{1 - MEMORY_MARGIN:.0%} of the free GPU memory")


@dataclass(frozen=True)
class BatchChoice:
    micro_batch: int
    accumulation: int
    how: str | None  # what was chosen and why, for the log and config.json; None when the flags were plain numbers


def check_batch_flags(cfg: TrainConfig, processes: int) -> None:
    """The batch flags against each other and the number of processes, which is all they need: a --global_batch_size
    that the processes, or a given --batch_size times them, cannot share evenly is refused before the process group
    starts or any text is read (plan/resolve.py; config.validate refuses it beside --gradient_accumulation_steps)."""
    if cfg.global_batch_size is None:
        return
    if cfg.global_batch_size % processes:
        raise UsageError(f"--global_batch_size {cfg.global_batch_size} does not divide among {processes} processes: "
                         f"use a multiple of {processes}.")
    if cfg.batch_size is not None and cfg.global_batch_size % (cfg.batch_size * processes):
        raise UsageError(f"--global_batch_size {cfg.global_batch_size} is not a multiple of --batch_size "
                         f"{cfg.batch_size} x {processes} process(es): use a multiple of "
                         f"{cfg.batch_size * processes}, or --batch_size auto to pick a micro-batch that divides it.")


def settle_batch(cfg: TrainConfig, vocab_size: int, device: torch.device, precision: str,
                 world: World) -> BatchChoice:
    """The micro-batch and accumulation that --batch_size (a number or auto) and --global_batch_size ask for (their
    conflicts are refused first, here too for a caller that did not resolve the run: the benchmark)."""
    check_batch_flags(cfg, world.size)
    if cfg.batch_size is not None and cfg.global_batch_size is None:
        return BatchChoice(cfg.batch_size, cfg.gradient_accumulation_steps, None)
    how = "given"
    largest = cfg.batch_size
    if cfg.batch_size is None:
        if device.type == "cpu":
            largest, how = CPU_AUTO_BATCH_SIZE, "the CPU default"
        else:
            largest, how = search(cfg, vocab_size, device, precision, world)
    if cfg.global_batch_size is None:
        return BatchChoice(largest, cfg.gradient_accumulation_steps, f"micro-batch {largest} ({how})")
    per_process = cfg.global_batch_size // world.size
    micro = max(b for b in range(1, min(largest, per_process) + 1) if per_process % b == 0)  # a given one divides it
    accumulation = per_process // micro
    lowered = "" if micro == largest else f"; {largest} lowered to divide the global batch"
    return BatchChoice(micro, accumulation, f"micro-batch {micro} ({how}{lowered}) x {accumulation} accumulation "
                                            f"steps x {world.size} process(es) = global batch {cfg.global_batch_size}")
