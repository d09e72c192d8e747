"""How the model is spread over the processes of a job, applied apart from the training loop as torchtitan's
`parallelize` is: compiling (the whole model, or each block before sharding), then DistributedDataParallel or FSDP2.

The loop holds the result, a `Parallel`, and asks it for the few things that differ between the modes: mixed precision
for a forward pass, when gradients are exchanged, clipping by the global norm, whether the weights are finite, the
checkpoint's view of the model and optimizer, and the model to sample from. It never branches on the mode itself."""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

from ..errors import notice
from ..plan.run_plan import RunPlan
from ..system import compiling, distributed
from ..system.hardware import autocast
from . import checkpoint


class Parallel:
    """One process: the model as it is (compiled or not) does everything."""

    sharded = False

    def __init__(self, model: torch.nn.Module, plan: RunPlan):
        self.model, self.plan = model, plan
        self.forward: torch.nn.Module = model  # what a training or evaluation forward pass calls
        self.compile_seconds: float | None = None  # how long compiling took, when it did

    def autocast(self):
        """Mixed precision for a forward pass."""
        return autocast(self.plan.device, self.plan.precision)

    def gradient_sync(self, last: bool):
        """Gradients are exchanged once per optimizer step, on its `last` micro-batch."""
        return contextlib.nullcontext()

    def clip_gradients(self, limit: float) -> torch.Tensor:
        """Scale the gradients down to `limit` by their norm over the whole model; returns that norm."""
        return torch.nn.utils.clip_grad_norm_(self.model.parameters(), limit)

    def weights_finite(self) -> torch.Tensor:
        """Whether every weight is finite, as a device bool, the same on every process."""
        return torch.stack([p.isfinite().all() for p in self.model.parameters()]).all()

    def after_forward_only(self) -> None:
        """After forward passes without a backward (an evaluation)."""

    def checkpoint_views(self, optimizer: torch.optim.Optimizer) -> tuple:
        """(model, optimizer) as a checkpoint saves and restores them."""
        return self.model, optimizer

    def model_to_sample(self, build: Callable[[], torch.nn.Module]) -> torch.nn.Module | None:
        """The model text is sampled from, on the main process (None on the others). `build` makes an empty copy."""
        return self.model


class DataParallel(Parallel):
    """Several processes, each holding the whole model: DistributedDataParallel averages the gradients."""

    def gradient_sync(self, last: bool):
        return contextlib.nullcontext() if last else self.forward.no_sync()


class Sharded(Parallel):
    """--parallel fsdp: each process holds a slice of every weight, gradient and optimizer state (FSDP2)."""

    sharded = True

    def autocast(self):
        """FSDP's policy already runs a bf16 run's compute in bf16 (distributed.shard): autocast would only add
        casts."""
        return contextlib.nullcontext()

    def gradient_sync(self, last: bool):
        """Micro-batches before the last accumulate unsharded gradients without a reduce-scatter."""
        self.model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def clip_gradients(self, limit: float) -> torch.Tensor:
        """The norm of the gradients' DTensors is the global one, made whole before clipping (torchtitan's way)."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
        torch.nn.utils.clip_grads_with_norm_(params, limit, norm)
        return norm

    def weights_finite(self) -> torch.Tensor:
        """Each process checks its slices; they agree through a collective."""
        local = torch.stack([p.to_local().isfinite().all() for p in self.model.parameters()]).all()
        return distributed.all_reduce(local.float(), self.plan.world, torch.distributed.ReduceOp.MIN).bool()

    def after_forward_only(self) -> None:
        self.model.reshard()  # FSDP keeps the root's weights whole after a forward without backward: free them

    def checkpoint_views(self, optimizer: torch.optim.Optimizer) -> tuple:
        return checkpoint.FullModel(self.model), checkpoint.FullOptimizer(self.model, optimizer)

    def model_to_sample(self, build: Callable[[], torch.nn.Module]) -> torch.nn.Module | None:
        """Every process helps gather the whole weights; the main process samples from an unsharded copy."""
        state = checkpoint.FullModel(self.model).state_dict()
        if not self.plan.world.is_main:
            return None
        copy = build()
        copy.load_state_dict(state)
        return copy


def parallelize(model: torch.nn.Module, plan: RunPlan) -> Parallel:
    """The model made ready for training on `plan`'s processes. One process: compiled or not. Several: compiled, then
    wrapped in DistributedDataParallel (nanoGPT's order); or with --parallel fsdp each block compiled in place and then
    every block and the root sharded (torchtitan's order: compiling the sharded model whole swapped the root's
    parameters under the optimizer in torch 2.13). Call it before building the optimizer: sharding replaces the
    parameters."""
    world = plan.world
    if plan.cfg.parallel == "fsdp" and not world.active:
        notice("note: --parallel fsdp shards the model across several processes (torchrun); with one process it "
               "trains unsharded, as usual.")
    if world.active and plan.cfg.parallel == "fsdp":  # (fp16 was refused before anything was written)
        parallel = Sharded(model, plan)
        if plan.compile:
            for block in model.blocks:
                block.compile(backend=compiling.BACKEND)
        distributed.shard(model, plan.precision)
        if plan.compile:
            parallel.compile_seconds = compiling.compiled_or_eager(
                lambda: warm_up(parallel, model), lambda: uncompile_blocks(model), plan.device, world.is_main)
        return parallel
    parallel = DataParallel(model, plan) if world.active else Parallel(model, plan)
    if plan.compile:
        compiled = torch.compile(model, backend=compiling.BACKEND)
        parallel.compile_seconds = compiling.compiled_or_eager(
            lambda: warm_up(parallel, compiled), lambda: None, plan.device, world.is_main)
        parallel.forward = compiled if parallel.compile_seconds is not None else model
    if world.active:
        device = plan.device
        parallel.forward = DDP(parallel.forward, device_ids=[device.index] if device.type == "cuda" else None)
    return parallel


def uncompile_blocks(model: torch.nn.Module) -> None:
    for block in model.blocks:
        block._compiled_call_impl = None  # what Module.compile set: the block runs eagerly again


def warm_up(parallel: Parallel, module: torch.nn.Module) -> None:
    """Run `module` as training will: a forward and backward on a micro-batch, and an evaluation forward; then leave
    no gradients behind."""
    plan, model = parallel.plan, parallel.model
    batch = torch.zeros((plan.micro_batch, plan.cfg.block_size + 1), dtype=torch.long, device=plan.device)
    try:
        with parallel.autocast():
            _, loss = module(batch[:, :-1], batch[:, 1:])
        loss.backward()
        model.eval()
        with torch.no_grad(), parallel.autocast():
            module(batch[:, :-1], batch[:, 1:])
    finally:
        parallel.after_forward_only()
        model.zero_grad(set_to_none=True)
        model.train()
