"""The one resolve step: the run's configuration from the flags as given, the values a resumed run recorded and the
--init_from folder's shape, with every conflict between flags refused here, before the process group starts or any
text is read. What needs the data (a block longer than the corpus, the vocabulary) is checked once the data is there
(plan/run_plan.py, train/checkpoint.py)."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass

import torch

from ..config import (CORPORA, DATA_FLAGS, EARLIER_ARCH, EARLIER_OPTIMIZER, MUON_FLAGS, TrainConfig, build_parser,
                      validate)
from ..errors import UsageError
from ..model import hf
from ..system.distributed import World
from ..system.hardware import pick_device, resolve_precision
from .autobatch import check_batch_flags

# flags that change the optimisation: on --resume, a changed value takes effect from the resumed step
OPTIMISATION_FLAGS = ("learning_rate", "min_lr", "warmup_steps", "weight_decay", "grad_clip", "batch_size",
                      "gradient_accumulation_steps", "max_steps", "epochs", "dropout", "max_bad_steps",
                      "muon_learning_rate", "muon_momentum", "muon_weight_decay")
# flags that say what the run is, its text and tokens and its model's shape: on --resume, a bare one keeps the run's
RUN_FLAGS = (*DATA_FLAGS, "arch", "model_size", "n_layer", "n_head", "n_embd", "block_size", "optimizer")
# ways of saying one thing: a flag of a group given on --resume replaces what the run recorded for the whole group
SAID_TOGETHER = (("use_chinese", "data_path", "corpus"), ("tokenizer", "init_from"), ("max_steps", "epochs"))
FLAG_TYPES = typing.get_type_hints(TrainConfig)
FLAG_CHOICES = {action.dest: action.choices for action in build_parser()._actions if action.choices}


@dataclass(frozen=True)
class Resolved:
    """The run's configuration and what follows from it and the launcher alone."""
    cfg: TrainConfig  # the flags the run trains with: given, kept from the run it resumes, or --init_from's shape
    kept: frozenset[str]  # the flags that kept the resumed run's value
    world: World  # the processes the launcher started (WORLD_SIZE), their group not joined yet
    device: torch.device  # cuda or cpu; each process's own GPU is chosen when the group starts
    precision: str  # fp32, bf16 or fp16


def resolve(cfg: TrainConfig, given: frozenset[str], world: World, recorded: dict | None = None) -> Resolved:
    """The run's configuration, resolved once: on --resume, the flags not `given` keep the values the run `recorded`
    (its checkpoint's config, or config.json before the first checkpoint: keep_run_values); --init_from's folder sets
    the shape (hf.settle_init_from, which reads no weight); then the flags are checked as a whole, with the number of
    processes and the device's precision (check_flags)."""
    kept = frozenset()
    if cfg.resume is not None:
        check_same_optimizer(cfg, recorded or {}, given)
        cfg, kept = keep_run_values(cfg, recorded or {}, given)
    cfg = hf.settle_init_from(cfg, given | kept)
    device = pick_device(cfg.device)
    precision = resolve_precision(cfg, device)
    check_flags(cfg, world, precision)
    return Resolved(cfg, kept, world, device, precision)


def check_same_optimizer(cfg: TrainConfig, recorded: dict, given: frozenset[str]) -> None:
    """A run goes on with the optimizer it started with: the other one has no state to continue from."""
    if "optimizer" not in given or not recorded:
        return
    ran = recorded_flags(recorded)["optimizer"]
    if cfg.optimizer != ran:
        raise UsageError(f"--resume: the run trained with --optimizer {ran}, and --optimizer {cfg.optimizer} would "
                         f"start without its state. Drop --optimizer to continue with {ran}, or start a new run "
                         f"(another --output_dir, or --overwrite) with {cfg.optimizer}.")


def check_flags(cfg: TrainConfig, world: World, precision: str) -> None:
    """Every conflict between the flags, their values as the run resolved them: those of the flags alone
    (config.validate), the batch flags against the number of processes, and FSDP with fp16."""
    validate(cfg)
    check_batch_flags(cfg, world.size)
    if cfg.parallel == "fsdp" and world.active and precision == "fp16":
        raise UsageError("--parallel fsdp trains in bf16 or fp32; fp16 needs a gradient scaler that does not handle "
                         "sharded gradients. Pass --bf16 or --fp32, or use --parallel ddp.")


def keep_run_values(cfg: TrainConfig, recorded: dict, given: frozenset[str]) -> tuple[TrainConfig, frozenset[str]]:
    """On --resume, every flag not given now that says what the run is (its text, tokenizer and shape: RUN_FLAGS) or
    how it optimises (OPTIMISATION_FLAGS) keeps the value the run used, as `recorded` (its checkpoint's config, or
    config.json before the first checkpoint) says: a bare --resume must not fall back to defaults the run never had,
    nor prepare other text. A choice given one way is not mixed with the run's made another way (SAID_TOGETHER), and
    the layers, heads and width come from a given --model_size's preset, or from the --init_from folder. Returns the
    configuration and the names of the flags that kept the run's value."""
    recorded = recorded_flags(recorded)
    left_open = {*OPTIMISATION_FLAGS, *RUN_FLAGS} - given
    for group in SAID_TOGETHER:
        if given & set(group):
            left_open -= set(group)
    if "global_batch_size" in given:  # it sets the accumulation (and --batch_size auto's micro-batch) anew
        left_open -= {"batch_size", "gradient_accumulation_steps"}
    init_from = recorded.get("init_from") if "init_from" in left_open else cfg.init_from
    if "model_size" in given or init_from:
        left_open -= {"model_size", "n_layer", "n_head", "n_embd"}
    kept = {name: recorded[name] for name in left_open if name in recorded}
    unfit = [f"{name} {value!r}" for name, value in kept.items() if not takes(name, value)]
    if unfit:
        raise UsageError(f"--resume: the run records {', '.join(unfit)}, which no flag of that name takes (was "
                         f"config.json edited?). Give {' '.join(f'--{item.split()[0]}' for item in unfit)} on the "
                         f"command line.")
    resumed = dataclasses.replace(cfg, **kept)
    validate(resumed)  # the kept values must agree with the given ones (a new peak below the kept --min_lr, say)
    return resumed, frozenset(kept)


def recorded_flags(recorded: dict) -> dict:
    """The flags a run recorded (a run from before --arch: gpt2; from before --optimizer: adamw). Its description
    holds two of them resolved: `corpus` is the text's name (for a named corpus the --corpus that gives the same text;
    with --data_path none was given) and `vocab_size` the vocabulary's (--vocab_size's only for sentencepiece, the one
    tokenizer that reads it)."""
    flags = {"arch": EARLIER_ARCH, **recorded}  # a run recorded before --arch existed trained a gpt2
    if recorded:
        flags.setdefault("optimizer", EARLIER_OPTIMIZER)
        for name in MUON_FLAGS:  # nor any Muon setting
            flags.setdefault(name, None)
    if flags.get("data_path") or flags.get("corpus") not in CORPORA:
        flags["corpus"] = None
    if flags.get("tokenizer") != "sentencepiece":
        flags.pop("vocab_size", None)
    return flags


def takes(name: str, value) -> bool:
    """Whether the flag `name` can hold `value` (of its type, one of its choices)."""
    kinds = typing.get_args(FLAG_TYPES[name]) or (FLAG_TYPES[name],)
    if float in kinds:
        kinds = (*kinds, int)
    of_its_kind = isinstance(value, kinds) and (bool in kinds or not isinstance(value, bool))
    return of_its_kind and (value is None or value in FLAG_CHOICES.get(name, (value,)))
