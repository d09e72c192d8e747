"""The training command: parse flags, check every input before anything is written, train, sample.

Bad input ends with one paragraph on stderr and exit code 2; SIGTERM (docker stop) and Ctrl-C save a checkpoint and
exit with 128 + the signal number."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shlex
import shutil
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import tracking
from ..config import TrainConfig, given_flags, parse_args
from ..data.tokens import TokenData, prepare_data
from ..errors import RunStopped, TrainingFailure, notice
from ..model import hf
from ..plan.resolve import Resolved, resolve
from ..plan.run_plan import RunPlan, make_plan, steps
from ..system import distributed
from ..system.hardware import device_name
from ..system.rundir import RunFolder, check_writable_folder
from ..tracking import RunSummary, Tracker, start_tracking
from ..train import checkpoint
from ..train.trainer import Trainer, TrainResult, perplexity
from .failures import lost_process, run_cli, training_failure


def run(cfg: TrainConfig, given: frozenset[str] = frozenset()) -> int:
    """Train as one process of the job (one process unless torchrun or accelerate launched several): every process
    checks the inputs and resolves the run before it joins the others, then trains its share; only the main one
    writes files, logs and prints. `given`: the flags written on the command line (on --resume, the others keep the
    run's values)."""
    inputs = check_inputs(cfg, given, distributed.launched_world())
    world, finished = inputs.resolved.world, False
    try:
        world, device = distributed.start(world, inputs.resolved.device, inputs.cfg.dist_timeout)
        exit_code = run_in(world, device, inputs)
        finished = True
        return exit_code
    except BaseException as error:  # the other processes end at once, naming this one, instead of waiting for it
        distributed.report_failure(world, error)
        raise
    finally:
        distributed.stop(world, finished)


def run_in(world: distributed.World, device: torch.device, inputs: Inputs) -> int:
    """The run, once this process joined the others (`world`, holding the job's roll call) on `device`."""
    plan, data = plan_run(world, device, inputs)
    saved = inputs.saved
    if plan.cfg.dry_run:
        if world.is_main:
            print(json.dumps(plan.describe(), indent=2, ensure_ascii=False))
            # the memory plan in words, on stderr: stdout stays one JSON document (`--dry_run | jq` works)
            if plan.memory:
                print("\n".join(plan.memory.describe()), file=sys.stderr)
        return 0
    if saved and plan.start_step >= plan.total_steps:  # resuming a finished run changes nothing
        if world.is_main:
            print(f"the run in {plan.folder.path} is complete: step {plan.start_step} of {plan.total_steps}. Nothing "
                  f"was changed; to train further, resume with a larger --max_steps or --epochs.")
        return 0
    lock = take_folder(plan, saved) if world.is_main else None  # noqa: F841  (held until the process ends)
    tracker = start_tracking(plan, saved["tracker"] if saved else None)
    trainer = Trainer(plan, data, tracker, inputs.start_weights)
    inputs.start_weights = None  # the model holds them now: no second copy for the whole run
    if saved:
        trainer.restore(saved)
    if world.is_main:
        announce(plan, trainer)
    return train_to_end(trainer, tracker)


# ---- the phases of a run, in order ---------------------------------------------------------------------------------
@dataclass
class Inputs:
    """Every input of a run, checked before the hardware, the other processes or the data are touched."""
    resolved: Resolved  # the run's configuration, its processes, device and precision (plan/resolve.py)
    folder: RunFolder
    saved: dict | None  # the checkpoint to resume (None: there is none)
    resume_from: Path | None  # its path
    start_weights: dict | None  # a fresh run from --init_from: the folder's weights, read and checked once

    @property
    def cfg(self) -> TrainConfig:
        return self.resolved.cfg


def check_inputs(cfg: TrainConfig, given: frozenset[str], world: distributed.World) -> Inputs:
    """Everything that can be refused before the process group starts or any text is read: the folders, the
    checkpoint to resume, the run's configuration resolved from the flags, the checkpoint's values (on --resume the
    flags not `given` keep the run's, so a bare --resume prepares the run's text) and --init_from's shape, with every
    conflict between flags (plan/resolve.py); the trackers; and --init_from's weights (for a run that does not resume
    from a checkpoint read, checked and kept to start from; else only their names and shapes)."""
    folder = RunFolder(Path(sweep_output_dir(cfg)))
    folder.check_writable(resuming=cfg.resume is not None, overwrite=cfg.overwrite,
                          ignore=(Path(cfg.resolved_cache_dir()),))
    resume_from = checkpoint.find_resume_checkpoint(cfg.resume, folder)
    saved, resume_from = checkpoint.load_for_resume(resume_from) if resume_from else (None, None)
    # before the first checkpoint, config.json records the run
    recorded = (saved["config"] if saved else folder.previous_config()) if cfg.resume is not None else None
    resolved = resolve(cfg, given, world, recorded)
    check_writable_folder(Path(resolved.cfg.resolved_cache_dir()), "--cache_dir")
    tracking.check(resolved.cfg)
    start_weights = hf.init_weights(resolved.cfg, load=saved is None) if resolved.cfg.init_from else None
    return Inputs(resolved, folder, saved, resume_from, start_weights)


def sweep_output_dir(cfg: TrainConfig) -> str:
    """Under a wandb agent every run would share the default folder (and the second be refused): give each its own."""
    sweep_id, run_id = os.environ.get("WANDB_SWEEP_ID"), os.environ.get("WANDB_RUN_ID")
    if sweep_id and run_id and cfg.output_dir == TrainConfig.output_dir:
        return os.path.join("output_sweeps", sweep_id.replace("/", "_"), run_id)
    return cfg.output_dir


def plan_run(world: distributed.World, device: torch.device, inputs: Inputs) -> tuple[RunPlan, TokenData]:
    """The token data, and the plan resolved from it, the configuration and the checkpoint to resume (nothing written
    yet)."""
    cfg, saved, resume_from = inputs.cfg, inputs.saved, inputs.resume_from
    distributed.check_same_checkpoint(world, (str(resume_from) if saved else None,
                                              saved["trainer"]["step"] if saved else None))
    # on each node the first process to take the cache's lock prepares, the others then read its work; nodes that
    # find the cache ready wait for those still preparing, however long that takes
    data = distributed.everyone_does(world, "preparing the token data",
                                     lambda: prepare_data(cfg, tokenizer=hf.init_tokenizer(cfg)), cfg.dist_timeout)
    if saved:
        checkpoint.check_same_shape(saved, cfg, data.tokenizer, resume_from)
        checkpoint.check_same_text(saved, data.digest, cfg.allow_new_data, resume_from)
    plan = make_plan(cfg, world, device, inputs.resolved.precision, data, inputs.folder, saved, resume_from)
    if plan.warmup_note and world.is_main:
        notice(plan.warmup_note)
    return plan, data


def take_folder(plan: RunPlan, saved: dict | None):
    """Everything is checked: from here on files change, and only while this process holds the folder's lock (which
    it returns). The marker first, then config.json, before any tracker writes."""
    lock = plan.folder.hold()
    plan.folder.mark()
    if plan.cfg.overwrite:
        removed, kept = plan.folder.clear()
        if removed:
            notice(f"--overwrite: removed the earlier run's {hf.listed(removed, shown=12)} from {plan.folder.path}"
                   + (f"; kept what no run wrote: {hf.listed(kept)}" if kept else ""))
    for name in checkpoint.remove_interrupted_saves(plan.folder):
        notice(f"note: removed {name}, left by a save that was interrupted")
    changes = plan.resume_changes(saved) if saved else {}
    if changes:
        notice(f"--resume: {', '.join(f'{k} {a} -> {b}' for k, (a, b) in changes.items())}; the new values take "
               f"effect from step {plan.start_step} (config.json lists the changes of every resumed segment).")
    plan.folder.write_config(plan.describe(), plan.start_step, changes)
    return lock


def announce(plan: RunPlan, trainer: Trainer) -> None:
    cfg = plan.cfg
    if plan.resume_from:
        print(f"resumed from {plan.resume_from} at step {trainer.step}")
    elif cfg.resume:
        print(f"--resume: no checkpoint in {plan.folder.path} yet, starting fresh")
    if plan.batch_choice:
        print(f"batch: {plan.batch_choice}")
    if trainer.compile_seconds is not None:
        print(f"torch.compile: {trainer.compile_seconds:.1f} s before the first step (not counted in tokens/s)")
    processes = f" x {plan.world.size} processes" if plan.world.active else ""
    print(f"model {cfg.model_label()}: {trainer.model.num_params():,} parameters | {device_name(plan.device)} "
          f"({plan.precision}){processes} | {text_source(cfg, plan.corpus)}: {plan.train_tokens:,} train / "
          f"{plan.val_tokens:,} val tokens, vocab {plan.vocab_size:,} ({cfg.tokenizer}) | {plan.total_steps:,} "
          f"steps of {plan.tokens_per_step:,} tokens (global batch {plan.global_batch}) | run {plan.run_name}")
    if plan.memory:
        print("\n".join(plan.memory.describe()))
    sys.stdout.flush()


def text_source(cfg, corpus: str) -> str:
    """`corpus builtin`, or `--data_path NAME` for the user's own text: its name may be anything (`corpus corpus`)."""
    return f"--data_path {corpus}" if cfg.data_path else f"corpus {corpus}"


def train_to_end(trainer: Trainer, tracker: Tracker) -> int:
    """Train, then sample; whatever happens, flush every tracker and close the wandb run, so no logged row is lost."""
    plan, exit_code, main = trainer.plan, 1, trainer.world.is_main
    try:
        with stop_on_signals(trainer):
            result = trainer.train()
            if result.interrupted_by is None and trainer.parallel.samples_here:
                write_samples(trainer, plan.folder.samples)  # a stop request skips the prompts left
        stopped = result.interrupted_by or trainer.stop_signal
        if stopped is not None:
            exit_code = 128 + stopped
            if main:
                saved_to = trainer.checkpointer.where(plan.folder.latest)
                print(f"stopped at step {result.steps}; checkpoint saved to {saved_to}. Continue with the same "
                      f"command plus --resume.", file=sys.stderr)
            return exit_code
        if main:
            print("\n".join(what_happened(result, plan)))
        exit_code = 0
        return exit_code
    except TrainingFailure as failure:
        raise RunStopped(training_failure(failure, trainer)) from None
    except RuntimeError as error:
        if trainer.world.active:  # torchrun stops the survivors of a lost process with SIGTERM: say why first
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        lost = distributed.missing_peers(trainer.world, error)
        if lost is None:
            raise
        raise RunStopped(lost_process(lost, *last_checkpoint(trainer))) from None
    finally:
        kept = [checkpoint.newest(plan.folder, name) for name in ("best", "latest")]
        summary = RunSummary(checkpoints=[path for path in kept if path], exit_code=exit_code)
        if exit_code == 0:
            summary.final = {"final/best_perplexity": perplexity(trainer.best_val_loss),
                             "final/total_steps": trainer.step, "final/total_epochs": trainer.batches.epochs_done}
            summary.step = trainer.step
        tracker.close(summary)


@contextlib.contextmanager
def stop_on_signals(trainer: Trainer):
    """The first SIGTERM/SIGINT asks the loop to save and stop after the current step; a second Ctrl-C stops at once."""
    def request_stop(signum, frame):
        trainer.stop_signal = signum
        signal.signal(signal.SIGINT, signal.default_int_handler)
        print(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step ...", file=sys.stderr, flush=True)

    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


# ---- what the user reads at the end --------------------------------------------------------------------------------
def last_checkpoint(trainer: Trainer) -> tuple[tuple[Path, int] | None, bool]:
    """The checkpoint a run that lost one of its processes continues from (its path and step; None: none yet), and
    whether this attempt saved it (else it is the one the run resumed from)."""
    plan, saved_at = trainer.plan, distributed.last_saved(trainer.world, trainer.checkpointer.saved_at)
    if saved_at is not None:
        return (trainer.checkpointer.where(plan.folder.latest), saved_at), True
    if plan.resume_from:
        return (plan.resume_from, plan.start_step), False
    return None, False


def what_happened(result: TrainResult, plan: RunPlan) -> list[str]:
    """The end of a run in two lines (three when validation loss rose at the end: memorising, said plainly)."""
    minutes, seconds = divmod(round(result.seconds), 60)
    losses = []
    if result.history:
        losses.append(f"train loss {result.history[0]['train/loss']:.4f} -> {result.history[-1]['train/loss']:.4f}")
    if result.evals:
        (first_step, first), (last_step, last) = result.evals[0], result.evals[-1]
        losses.append(f"val loss {first:.4f} (step {first_step}) -> {last:.4f} (step {last_step}), best val loss "
                      f"{result.best_val_loss:.4f} (guessing uniformly among the {plan.vocab_size:,} tokens scores "
                      f"{math.log(plan.vocab_size):.4f})")
    if result.best_step == 0:  # best.pt is written only for a trained model that beats --init_from's weights
        losses.append(f"no step beat the starting weights of {plan.cfg.init_from} (step 0), so no best.pt was "
                      f"written")
    took = f"{steps(result.steps - plan.start_step)} in {minutes}m {seconds:02d}s{segment(result.steps, plan)}"
    lines = [f"done: {took}; {'; '.join(losses)}."]
    where = [f"samples in {plan.folder.samples}", f"checkpoints in {plan.folder.checkpoints}"]
    if "tensorboard" in tracking.chosen(plan.cfg.report_to):
        where.append(f"curves: {tensorboard_command()} --logdir {shlex.quote(str(plan.folder.logs))}")
    lines.append("; ".join(where))
    rose = result.evals and result.evals[-1][1] > result.best_val_loss * 1.02  # 2 %: more than evaluation noise
    if rose and result.best_step == 0:
        lines.append(f"warning: validation loss rose from the starting weights' {result.best_val_loss:.4f} to "
                     f"{result.evals[-1][1]:.4f}: training made the model worse. Try a lower --learning_rate (now "
                     f"{plan.cfg.learning_rate:g}); the weights in {plan.cfg.init_from} are still the best.")
    elif rose:
        lines.append(f"warning: validation loss rose from its best, {result.best_val_loss:.4f}, to "
                     f"{result.evals[-1][1]:.4f}: the model is memorising its training text. Train on more text, for "
                     f"fewer steps or with more --dropout; best.pt holds the weights with the best validation loss.")
    return lines


def segment(last: int, plan: RunPlan) -> str:
    """After a resume, which of the run's steps this process ran (the time is theirs alone)."""
    if not plan.start_step:  # a run already complete is answered before it starts (run)
        return ""
    return f" (steps {plan.start_step + 1:,}-{last:,} of {plan.total_steps:,}, resumed at step {plan.start_step:,})"


def tensorboard_command() -> str:
    """`tensorboard` when it is on PATH, else the one beside this Python (a virtual environment not activated)."""
    beside = Path(sys.executable).parent / "tensorboard"
    if shutil.which("tensorboard") or not beside.exists():
        return "tensorboard"
    with contextlib.suppress(ValueError):  # relative to here: shorter, and what ./dev.sh users can paste as it is
        return shlex.quote(str(beside.relative_to(Path.cwd())))
    return shlex.quote(str(beside))


def write_samples(trainer: Trainer, path: Path) -> None:
    """The end-of-run samples, printed and appended to samples.txt by the main process. Under FSDP every process
    generates them with it (each holds only a slice of the weights)."""
    samples = trainer.samples()
    if not trainer.world.is_main:
        for _ in samples:
            pass
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write(f"=== step {trainer.step} ===\n")
        for prompt, text in samples:
            print(f"--- sample ({prompt!r}) ---\n{text}\n")
            f.write(f"--- {prompt!r} ---\n{text}\n\n")


def main(argv: list[str] | None = None) -> int:
    return run_cli(lambda args: run(parse_args(args), given_flags(sys.argv[1:] if args is None else args)), argv)


if __name__ == "__main__":
    sys.exit(main())
