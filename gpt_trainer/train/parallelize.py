"""How the model is spread over the processes of a job, applied apart from the training loop as torchtitan's
`parallelize` is: compiling (the whole model, or each block before sharding), then DistributedDataParallel or FSDP2.

The model arrives built on the meta device and gets its memory and initial weights here, once it is placed: under FSDP
after sharding, so that each process allocates and initialises only its own slices (torchtitan's order: meta build,
compile, shard, materialise, then the optimizer).

The loop holds the result, a `Parallel`, and asks it for the few things that differ between the modes: mixed precision
for a forward pass, when gradients are exchanged, clipping by the global norm, whether the weights are finite, the
checkpoint's view of the model and optimizer, and who samples text with which model. It never branches on the mode
itself."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

from ..errors import notice
from ..plan.run_plan import RunPlan
from ..system import compiling, distributed
from ..system.hardware import autocast, return_large_blocks_when_freed
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
        """(model, optimizer) as a checkpoint saves and restores them: whole in a .pt, each process's slices in a
        sharded checkpoint (FSDP); restored from either kind."""
        return (checkpoint.ModelState(self.model, self.sharded),
                checkpoint.OptimizerState(self.model, optimizer, self.sharded))

    @property
    def samples_here(self) -> bool:
        """Whether this process generates the samples: the main one, with the whole model."""
        return self.plan.world.is_main

    @contextlib.contextmanager
    def sampling(self) -> Iterator[torch.nn.Module]:
        """The model to generate text with, on a process that `samples_here`."""
        yield self.model

    def any_stop(self, stopped: bool) -> bool:
        """Whether a stop was asked on a process that samples; they are asked together between two samples."""
        return stopped


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

    @property
    def samples_here(self) -> bool:
        """Every process generates, in lockstep with the same seeded draws, so that no process holds the whole model:
        FSDP gathers each block's weights for its forward and frees them after. Only the main process shows the text."""
        return True

    @contextlib.contextmanager
    def sampling(self) -> Iterator[torch.nn.Module]:
        """The sharded model itself, its blocks run eagerly (a compiled block would compile again for every length of
        the key/value cache); the root's gathered weights are freed after, as after an evaluation."""
        compiled = [block._compiled_call_impl for block in self.model.blocks]
        uncompile_blocks(self.model)
        try:
            yield self.model
        finally:
            for block, call in zip(self.model.blocks, compiled):
                block._compiled_call_impl = call
            self.after_forward_only()

    def any_stop(self, stopped: bool) -> bool:
        """A stop asked on any process stops them all at the same sample: one that left the lockstep would leave the
        others waiting for its slices."""
        flag = torch.tensor(float(stopped), device=self.plan.device)
        return bool(distributed.all_reduce(flag, self.plan.world, torch.distributed.ReduceOp.MAX).item())


def parallelize(model: torch.nn.Module, plan: RunPlan) -> Parallel:
    """The model, built on the meta device (gpt.empty_model), made ready for training on `plan`'s processes and given
    its initial weights (GPT.materialise: drawn from the CPU generator, so seed it first). One process: materialised,
    then compiled or not. Several: materialised, compiled, then wrapped in DistributedDataParallel (nanoGPT's order);
    or with --parallel fsdp each block compiled in place, every block and the root sharded, and only then materialised,
    each process allocating and drawing into its own slices (torchtitan's order: compiling the sharded model whole
    swapped the root's parameters under the optimizer in torch 2.13). Call it before building the optimizer: sharding
    replaces the parameters."""
    world = plan.world
    if plan.cfg.parallel == "fsdp" and not world.active:
        notice("note: --parallel fsdp shards the model across several processes (torchrun); with one process it "
               "trains unsharded, as usual.")
    if world.active and plan.cfg.parallel == "fsdp":  # (fp16 was refused before anything was written)
        parallel = Sharded(model, plan)
        if plan.device.type == "cpu":  # before the shards are allocated: theirs go back when freed too
            return_large_blocks_when_freed()
        if plan.compile:
            for block in model.blocks:
                block.compile(backend=compiling.BACKEND)
        distributed.shard(model, plan.precision)
        model.materialise(plan.device)
        if plan.compile:
            parallel.compile_seconds = compiling.compiled_or_eager(
                lambda: warm_up(parallel, model), lambda: uncompile_blocks(model), plan.device, world.is_main)
        return parallel
    model.materialise(plan.device)
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
