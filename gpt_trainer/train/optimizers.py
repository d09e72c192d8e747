"""The optimizer a run trains with (--optimizer): AdamW for every parameter, or Muon for the 2-D weights inside the
transformer blocks and AdamW for the rest (embeddings, head, norms and biases). Either one skips a bad step on the
device (train/health.step_unless hands it a found_inf tensor), and each parameter group has its own peak learning rate
and weight decay, all on the run's one warm-up/cosine schedule.

Muon here is torch.optim.Muon's math (torch 2.13: Nesterov momentum, orthogonalised by torch's own Newton-Schulz
iteration, the default learning rate adjustment), applied so that a step marked bad changes nothing. torch's Muon takes
no found_inf, so our step computes each matrix's new momentum and weight out of place and keeps the old ones where the
step is bad (torch.where). That costs the temporaries of one batch of same-shaped matrices at a time (at most
MUON_BATCH_BYTES of them); the other way, a copy of every weight and momentum buffer kept for a select after the step,
costs a whole extra copy of both, so we took this one."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor, Shard
# torch's Muon internals, so that ours is its math: the same coefficients, iteration and learning rate adjustment
from torch.optim._muon import DEFAULT_A, DEFAULT_B, DEFAULT_C, DEFAULT_NS_STEPS, EPS, _adjust_lr
from torch.optim.adamw import adamw

from ..config import TrainConfig

ADAMW_BETAS = (0.9, 0.95)
NS_COEFFICIENTS, NS_STEPS, NS_EPS = (DEFAULT_A, DEFAULT_B, DEFAULT_C), DEFAULT_NS_STEPS, EPS  # torch.optim.Muon's


@dataclass(frozen=True)
class GroupSetting:
    """What the flags set for one parameter group: its peak learning rate and its weight decay."""
    peak_lr: float
    weight_decay: float


# the kinds of parameter group: Muon's block matrices, AdamW's decayed matrices, AdamW's undecayed rest
MUON, DECAY, REST = "muon", "decay", "rest"
ADAMW_ROLES = (DECAY, REST)  # torch.optim.AdamW's groups (--optimizer adamw) carry no role: theirs by position


def group_settings(cfg: TrainConfig) -> dict[str, GroupSetting]:
    """The flags' settings for each kind of parameter group (under muon --learning_rate and --weight_decay are the
    AdamW groups')."""
    return {MUON: GroupSetting(cfg.muon_learning_rate, cfg.muon_weight_decay),
            DECAY: GroupSetting(cfg.learning_rate, cfg.weight_decay), REST: GroupSetting(cfg.learning_rate, 0.0)}


def roles(optimizer: torch.optim.Optimizer) -> list[str]:
    return [group["role"] if "role" in group else ADAMW_ROLES[i] for i, group in enumerate(optimizer.param_groups)]


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The run's optimizer over `model`'s parameters (after sharding, which replaces them), at learning rate 0 until
    set_learning_rates gives each group its step's."""
    if cfg.optimizer == "adamw":
        groups = model.optimizer_groups(cfg.weight_decay)
        # fused: one kernel for the whole update instead of several per parameter, and one that skips a bad step on
        # the device (found_inf): so on the CPU too, where the tests prove that no step waits
        return torch.optim.AdamW(groups, lr=0.0, betas=ADAMW_BETAS, fused=True)
    matrices = {id(p) for p in model.block_matrices()}
    groups = [{"params": model.block_matrices(), "role": MUON, "momentum": cfg.muon_momentum}]
    for group, role in zip(model.optimizer_groups(cfg.weight_decay), ADAMW_ROLES):
        params = [p for p in group["params"] if id(p) not in matrices]
        if params:  # no empty group: torch's sharded optimizer state maps one to the wrong group (torch 2.13)
            groups.append({"params": params, "role": role})
    settings = group_settings(cfg)
    for group in groups:
        group["weight_decay"] = settings[group["role"]].weight_decay
    return MuonAdamW(groups)


def set_learning_rates(optimizer: torch.optim.Optimizer, cfg: TrainConfig, multiplier: float) -> None:
    """Each group's learning rate for the next step: its peak times the schedule's `multiplier`."""
    settings = group_settings(cfg)
    for group, role in zip(optimizer.param_groups, roles(optimizer)):
        group["lr"] = settings[role].peak_lr * multiplier


def apply_flags(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> None:
    """After a restore: this start's flags rule the weight decay and the momentum (a restored optimizer carries the
    saved ones), and every AdamW group is fused again, to skip on the device whichever AdamW wrote the checkpoint."""
    settings = group_settings(cfg)
    for group, role in zip(optimizer.param_groups, roles(optimizer)):
        group["weight_decay"] = settings[role].weight_decay
        if role == MUON:
            group["momentum"] = cfg.muon_momentum
        else:
            group["fused"] = True


class MuonAdamW(torch.optim.Optimizer):
    """Muon for the group whose role is MUON, fused AdamW for the others, as one optimizer: one state_dict for every
    checkpoint layout, one set of groups for the schedule. It skips a bad step on the device like torch's fused
    optimizers: the `found_inf` attribute step_unless sets, a 0-dim float tensor, 1 to skip."""

    skips_on_device = True  # step_unless: a found_inf is honoured although not every group is fused

    def __init__(self, groups: list[dict]):
        for group in groups:
            group["fused"] = group["role"] != MUON
        super().__init__(groups, {"lr": 0.0, "weight_decay": 0.0, "momentum": 0.95, "nesterov": True,
                                  "betas": ADAMW_BETAS, "eps": 1e-8})

    @torch.no_grad()
    def step(self, closure=None):
        found_inf = getattr(self, "found_inf", None)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if group["role"] == MUON:
                for batch in same_shape_batches(params):
                    self.muon_update(batch, group, found_inf)
            elif params:
                self.adamw_update(params, group, found_inf)

    def muon_update(self, params: list[torch.Tensor], group: dict, found_inf: torch.Tensor | None) -> None:
        """torch.optim.Muon's step (see _single_tensor_muon) for matrices of one shape, orthogonalised together,
        computed out of place and kept only where the step is good."""
        momentum, lr = group["momentum"], group["lr"]
        new_bufs, updates = [], []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            new_bufs.append(state["momentum_buffer"].lerp(p.grad, 1 - momentum))
            updates.append(p.grad.lerp(new_bufs[-1], momentum) if group["nesterov"] else new_bufs[-1])
        skip = None if found_inf is None else found_inf.bool()
        for p, new_buf, update in zip(params, new_bufs, orthogonalised(updates)):
            buf = self.state[p]["momentum_buffer"]
            new_p = torch.add(p * (1 - lr * group["weight_decay"]), update, alpha=-_adjust_lr(lr, None, p.shape))
            buf.copy_(new_buf if skip is None else torch.where(skip, buf, new_buf))
            p.copy_(new_p if skip is None else torch.where(skip, p, new_p))

    def adamw_update(self, params: list[torch.Tensor], group: dict, found_inf: torch.Tensor | None) -> None:
        """torch.optim.AdamW's fused step (its kernel leaves weights, moments and step count as they were where
        found_inf is 1)."""
        for p in params:
            if not self.state[p]:  # as torch.optim.AdamW makes it for fused=True
                self.state[p] = {"step": torch.zeros((), dtype=torch.float32, device=p.device),
                                 "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                                 "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
        states = [self.state[p] for p in params]
        beta1, beta2 = group["betas"]
        adamw(
            params, [p.grad for p in params], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], [],
            [s["step"] for s in states], fused=True, found_inf=found_inf, amsgrad=False, beta1=beta1, beta2=beta2,
            lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)


MUON_BATCH_BYTES = 16 * 2**20  # the most matrix bytes orthogonalised in one batch: a small model's all at once


def same_shape_batches(params: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """The matrices grouped by shape, in batches of at most MUON_BATCH_BYTES per process (at least one matrix each;
    under FSDP each process orthogonalises a share of a batch). One batched Newton-Schulz iteration instead of one per
    matrix: on a small model the optimizer's step takes half the time (tools/recipe_benchmark.py's shape on the CPU:
    5.4 instead of 12.8 ms), and on the CPU the bits are the same."""
    by_shape: dict[tuple, list[list[torch.Tensor]]] = {}
    for p in params:
        batch_bytes = MUON_BATCH_BYTES * (p.device_mesh.size() if isinstance(p, DTensor) else 1)
        batches = by_shape.setdefault(tuple(p.shape), [[]])
        if batches[-1] and (len(batches[-1]) + 1) * p.numel() * p.element_size() > batch_bytes:
            batches.append([])
        batches[-1].append(p)
    return [batch for batches in by_shape.values() for batch in batches]


def orthogonalised(updates: list[torch.Tensor]) -> list[torch.Tensor]:
    """torch's Newton-Schulz orthogonalisation of momentum-updated gradients of one shape, as one batch. Under FSDP a
    matrix is sharded by rows and the iteration needs all of it: one all-to-all gives each process a share of the
    batch's matrices whole, each process orthogonalises only its share, and a second all-to-all gives every process
    its rows of every result: the communication of gathering every matrix on every process, 1/N of the work and of
    the gathered matrices."""
    stacked = torch.stack(updates)
    if not isinstance(stacked, DTensor):
        return list(newton_schulz(stacked).unbind())
    mesh, rows = stacked.device_mesh, stacked.placements  # (batch, rows, columns), the rows sharded: Shard(1)
    share = stacked.redistribute(mesh, [Shard(0)]).to_local()  # whole matrices, this process's share of them
    results = DTensor.from_local(newton_schulz(share), mesh, [Shard(0)], shape=stacked.shape,
                                 stride=stacked.stride())
    return list(results.redistribute(mesh, rows).unbind())


def newton_schulz(matrices: torch.Tensor) -> torch.Tensor:
    """torch.optim._muon._zeropower_via_newtonschulz for a batch (batch, rows, columns) of matrices: the same
    coefficients, bfloat16 iteration and per-matrix scaling, each matrix's result bit for bit what torch's gives it
    (tests/test_optimizers.py holds our step to torch.optim.Muon's)."""
    a, b, c = NS_COEFFICIENTS
    x = matrices.bfloat16()
    tall = matrices.size(-2) > matrices.size(-1)
    if tall:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=NS_EPS)  # a spectral norm of at most 1
    for _ in range(NS_STEPS):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x
