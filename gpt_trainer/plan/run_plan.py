"""The run plan: every value a run derives from its configuration (resolved and checked first: plan/resolve.py), the
hardware, the data, the checkpoint it resumes and the processes it runs on, resolved once and frozen. The trainer,
config.json, every tracker's hyper-parameters, the checkpoint's description and --dry_run all read this one plan, so
each value is computed in exactly one place."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import torch

from ..config import TrainConfig
from ..data.batches import windows_in
from ..data.tokens import TokenData
from ..system.compiling import wants_compile
from ..system.distributed import World
from ..system.rundir import RunFolder
from .autobatch import settle_batch
from .memory import MemoryPlan, plan_for_run
from .resolve import OPTIMISATION_FLAGS


@dataclass(frozen=True)
class RunPlan:
    cfg: TrainConfig  # the flags as given; every value below is what they resolve to
    world: World
    device: torch.device
    precision: str  # fp32, bf16 or fp16
    folder: RunFolder
    micro_batch: int  # sequences per micro-batch and process
    accumulation: int  # micro-batches per optimizer step
    total_steps: int
    warmup_steps: int
    compile: bool
    run_name: str
    corpus: str
    corpus_digest: str  # of the text the tokens came from
    vocab_size: int
    train_tokens: int
    val_tokens: int
    sample_prompts: tuple[str, ...] = ()
    batch_choice: str | None = None  # how --batch_size auto / --global_batch_size chose, when they did
    warmup_note: str | None = None  # said when the asked-for warm-up had to be shortened
    resume_from: Path | None = None
    start_step: int = 0
    tags: list[str] = field(default_factory=list)
    memory: MemoryPlan | None = None  # the estimated memory per GPU of this plan's flags (gpt_trainer/memory.py)

    @property
    def global_batch(self) -> int:
        """Sequences per optimizer step over all processes."""
        return self.micro_batch * self.accumulation * self.world.size

    @property
    def tokens_per_step(self) -> int:
        """The whole job's tokens per optimizer step."""
        return self.global_batch * self.cfg.block_size

    def lr_at(self, step: int) -> float:
        """The learning rate of optimizer step `step` (0-based): the schedule is a function of the plan and the step
        alone, so a resumed run (with changed flags or not) needs no saved scheduler state."""
        return self.cfg.learning_rate * self.lr_scale(step)

    def lr_scale(self, step: int) -> float:
        """The schedule's multiplier of every peak learning rate at optimizer step `step` (0-based)."""
        cfg = self.cfg
        return lr_multiplier(step, self.warmup_steps, self.total_steps, cfg.final_lr / cfg.learning_rate)

    def flags(self) -> dict:
        """Every flag with the value that runs: --batch_size auto, --global_batch_size and a shortened warm-up
        resolved, and the run folder after the sweep rule."""
        return {**self.cfg.to_dict(), "batch_size": self.micro_batch, "gradient_accumulation_steps": self.accumulation,
                "warmup_steps": self.warmup_steps, "output_dir": str(self.folder.path)}

    def describe(self) -> dict:
        """The run as config.json, the trackers' hyper-parameters, the checkpoint and --dry_run record it."""
        return {**self.flags(), "compile": self.compile, "batch_size_choice": self.batch_choice,
                "device": str(self.device), "precision": self.precision, "corpus": self.corpus,
                "corpus_digest": self.corpus_digest,
                "vocab_size": self.vocab_size, "train_tokens": self.train_tokens, "val_tokens": self.val_tokens,
                "world_size": self.world.size, "global_batch_size": self.global_batch,
                "resume_from": str(self.resume_from) if self.resume_from else None, "run_name": self.run_name,
                "memory_estimate_gib": round(self.memory.total / 2**30, 1) if self.memory else None}

    def resume_changes(self, saved: dict) -> dict:
        """What differs from the checkpoint among the optimisation flags and the number of processes: {name: [before,
        now]}."""
        before = {**saved["config"], "world_size": saved.get("world_size", 1)}
        now = {**self.flags(), "world_size": self.world.size, "corpus_digest": self.corpus_digest}
        return {name: [before[name], now[name]] for name in (*OPTIMISATION_FLAGS, "world_size", "corpus_digest")
                if name in before and before[name] != now[name]}


def make_plan(cfg: TrainConfig, world: World, device: torch.device, precision: str, data: TokenData,
              folder: RunFolder, saved: dict | None = None, resume_from: Path | None = None) -> RunPlan:
    """Resolve what needs the data and the device: the batch (which may measure the GPU), the step budget and warm-up,
    the run's name. `cfg` is the resolved configuration (plan/resolve.py: a resumed run's holds the values it keeps,
    and its flags were checked against each other there)."""
    batch = settle_batch(cfg, data.tokenizer.vocab_size, device, precision, world)
    windows_per_step = batch.micro_batch * batch.accumulation * world.size
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * windows_in(data.train, cfg.block_size) / windows_per_step))
    warmup, warmup_note = fit_warmup(cfg.warmup_steps, total)
    return RunPlan(
        cfg=cfg, world=world, device=device, precision=precision, folder=folder, micro_batch=batch.micro_batch,
        accumulation=batch.accumulation, total_steps=total, warmup_steps=warmup,
        compile=wants_compile(cfg.compile, device),
        run_name=run_name(cfg, folder, saved, data.corpus, batch.micro_batch), corpus=data.corpus,
        corpus_digest=data.digest,
        vocab_size=data.tokenizer.vocab_size, train_tokens=len(data.train), val_tokens=len(data.val),
        sample_prompts=tuple((cfg.sample_prompts or data.default_prompts).split(",")), batch_choice=batch.how,
        warmup_note=warmup_note, resume_from=resume_from, start_step=saved["trainer"]["step"] if saved else 0,
        tags=tags(cfg, device, precision, world),
        memory=plan_for_run(cfg, data.tokenizer.vocab_size, device, precision, batch.micro_batch, world.size,
                            batch.accumulation),
    )


def lr_multiplier(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up to the peak, then cosine decay to min_ratio of it at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def fit_warmup(warmup_steps: int, total_steps: int) -> tuple[int, str | None]:
    """A warm-up as long as the run never reaches the peak learning rate: shorten it to a tenth of the run (the one
    rule, documented in docs/training.md); returns the warm-up and the note saying so."""
    if warmup_steps < total_steps:
        return warmup_steps, None
    fitted = total_steps // 10
    instead = (f"warming up over {steps(fitted)} (a tenth of the run) instead" if fitted else
               "a tenth of the run is under one step, so it starts at the peak learning rate, with no warm-up")
    return fitted, (f"note: --warmup_steps {warmup_steps} is not shorter than the run ({steps(total_steps)}), so the "
                    f"peak learning rate would never be reached; {instead}.")


def steps(count: int) -> str:
    """`1 step`, `0 steps`, `1,200 steps`."""
    return f"{count:,} step{'' if count == 1 else 's'}"


def run_name(cfg: TrainConfig, folder: RunFolder, saved: dict | None, corpus: str, micro_batch: int) -> str:
    """A resumed run keeps its name; a restart before the first checkpoint continues the name config.json recorded
    (so TensorBoard shows one run); otherwise --wandb_run_name, else size-corpus-lr-bs-time."""
    earlier = folder.previous_config().get("run_name") if not saved and not cfg.overwrite else None
    if saved and saved["tracker"].get("run_name"):
        return saved["tracker"]["run_name"]
    stamp = datetime.now().strftime("%Y%m%d_%H%M%S")
    default = f"{cfg.model_size}-{corpus}-lr{format_lr(cfg.learning_rate)}-bs{micro_batch}-{stamp}"
    return earlier or cfg.wandb_run_name or default


def format_lr(lr: float) -> str:
    mantissa, exponent = f"{lr:e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def tags(cfg: TrainConfig, device: torch.device, precision: str, world: World) -> list[str]:
    """The run's tags for wandb and SwanLab: model size, architecture, precision, what it ran on, then
    --wandb_tags."""
    if device.type == "cuda":
        hardware = "single-gpu" if world.size == 1 else f"{world.size}-gpus"
    else:
        hardware = "cpu" if world.size == 1 else f"cpu-{world.size}-processes"
    return [t for t in (cfg.model_size, cfg.arch, precision, hardware, *(t.strip() for t in cfg.wandb_tags.split(",")))
            if t]

