"""The training command: parse flags, check every input before anything is written, train, sample.

Bad input ends with one paragraph on stderr and exit code 2; SIGTERM (docker stop) and Ctrl-C save a checkpoint and
exit with 128 + the signal number."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import sys
from pathlib import Path

from . import checkpoint, distributed, outdir
from .autobatch import settle_batch
from .compiling import wants_compile
from .config import TrainConfig, parse_args
from .errors import notice, run_cli
from .data import prepare_data, steps_for, windows_in
from .hardware import device_name, pick_device, resolve_precision
from .tracking import RunSummary, Tracker, default_run_name, start_tracking
from .trainer import Trainer, TrainResult, fit_warmup, perplexity


def use_sweep_output_dir(cfg: TrainConfig) -> None:
    """Under a wandb agent every run would share the default folder (and the second be refused): give each its own."""
    sweep_id, run_id = os.environ.get("WANDB_SWEEP_ID"), os.environ.get("WANDB_RUN_ID")
    if sweep_id and run_id and cfg.output_dir == TrainConfig.output_dir:
        cfg.output_dir = os.path.join("output_sweeps", sweep_id.replace("/", "_"), run_id)


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


def run(cfg: TrainConfig) -> int:
    world, finished = distributed.launched_world(), False
    try:
        exit_code = run_in(world, cfg)
        finished = True
        return exit_code
    finally:
        distributed.stop(world, finished)


def run_in(world: distributed.World, cfg: TrainConfig) -> int:
    """Train as one process of `world` (one process unless torchrun or accelerate launched several): every process
    checks the inputs and trains its share; only the main one writes files, logs and prints."""
    use_sweep_output_dir(cfg)
    outdir.check_writable(cfg)
    device = pick_device(cfg.device)
    precision = resolve_precision(cfg, device)
    resume_from = checkpoint.find_resume_checkpoint(cfg)
    saved = checkpoint.load(resume_from) if resume_from else None
    device = distributed.start(world, device, cfg.dist_timeout)
    if not world.is_main:
        distributed.barrier(world)  # the main process builds the token cache, the others then read it
    data = prepare_data(cfg)
    if world.is_main:
        distributed.barrier(world)
    if saved:
        checkpoint.check_same_shape(saved, cfg, data.tokenizer, resume_from)
    batch_choice = settle_batch(cfg, data.tokenizer.vocab_size, device, precision, world)
    warmup_note = fit_warmup(cfg, steps_for(cfg, windows_in(data.train, cfg.block_size), world.size))
    if warmup_note and world.is_main:
        notice(warmup_note)
    resolved = {**cfg.to_dict(), "compile": wants_compile(cfg.compile, device), "batch_size_choice": batch_choice,
                "device": str(device), "precision": precision, "corpus": data.corpus,
                "vocab_size": data.tokenizer.vocab_size, "train_tokens": len(data.train), "val_tokens": len(data.val),
                "world_size": world.size, "global_batch_size": cfg.batch_size * cfg.gradient_accumulation_steps
                * world.size, "resume_from": str(resume_from) if resume_from else None}
    if cfg.dry_run:
        if world.is_main:
            print(json.dumps(resolved, indent=2, ensure_ascii=False))
        return 0

    start_step = saved["trainer"]["step"] if saved else 0
    prompts = (cfg.sample_prompts or data.default_prompts).split(",") if world.is_main else []
    if world.is_main:  # everything is checked: from here on files change, and only while this process holds the folder
        out = Path(cfg.output_dir)
        lock = outdir.hold(out)  # noqa: F841  (held until the process ends)
        outdir.remove_leftovers(out)
        changes = outdir.resume_changes(saved, cfg, world.size) if saved else {}
        if changes:
            notice(f"--resume: {', '.join(f'{k} {a} -> {b}' for k, (a, b) in changes.items())}; the new values take "
                   f"effect from step {start_step} (config.json lists the changes of every resumed segment).")
        # a restart before the first checkpoint continues the same TensorBoard run, from an empty record
        earlier = outdir.previous_config(out) if not saved and not cfg.overwrite else {}
        run_name = (saved["tracker"]["run_name"] if saved else earlier.get("run_name")) or cfg.wandb_run_name \
            or default_run_name(cfg, data.corpus)
        outdir.write_config(out, {**resolved, "run_name": run_name}, start_step, changes)  # before a tracker writes
        tracker = start_tracking(cfg, resolved, run_name, saved["tracker"] if saved else None, start_step)
    else:
        tracker = Tracker(resumed=saved["tracker"] if saved else None)
    trainer = Trainer(cfg, data, device, precision, tracker, sample_prompts=prompts, world=world)
    if saved:
        trainer.restore(saved)
    if world.is_main:
        if saved:
            print(f"resumed from {resume_from} at step {trainer.step}")
        elif cfg.resume:
            print(f"--resume: no checkpoint in {cfg.output_dir} yet, starting fresh")
        if batch_choice:
            print(f"batch: {batch_choice}")
        if trainer.compile_seconds is not None:
            print(f"torch.compile: {trainer.compile_seconds:.1f} s before the first step (not counted in tokens/s)")
        processes = f" x {world.size} processes" if world.active else ""
        print(f"model {cfg.model_label()}: {trainer.model.num_params():,} parameters | {device_name(device)} "
              f"({precision}){processes} | corpus {data.corpus}: {len(data.train):,} train / {len(data.val):,} val "
              f"tokens, vocab {data.tokenizer.vocab_size:,} ({cfg.tokenizer}) | {trainer.total_steps:,} steps of "
              f"{trainer.tokens_per_step:,} tokens (global batch {resolved['global_batch_size']}) | run "
              f"{tracker.run_name}", flush=True)
    return train_to_end(trainer, tracker, prompts)


def train_to_end(trainer: Trainer, tracker: Tracker, prompts: list[str]) -> int:
    """Train, then sample; whatever happens, flush every tracker and close the wandb run, so no logged row is lost."""
    cfg, exit_code, main = trainer.cfg, 1, trainer.world.is_main
    try:
        with stop_on_signals(trainer):
            result = trainer.train()
        if result.interrupted_by is not None:
            exit_code = 128 + result.interrupted_by
            if main:
                print(f"stopped at step {result.steps}; checkpoint saved to {checkpoint.latest_path(cfg.output_dir)}. "
                      f"Continue with the same command plus --resume.", file=sys.stderr)
            return exit_code
        if main:
            write_samples(trainer, prompts, Path(cfg.output_dir) / "samples.txt")
            print("\n".join(what_happened(result, cfg, trainer.data.tokenizer.vocab_size)))
        exit_code = 0
        return exit_code
    finally:
        summary = RunSummary(checkpoints=[checkpoint.best_path(cfg.output_dir), checkpoint.latest_path(cfg.output_dir)],
                             exit_code=exit_code)
        if exit_code == 0:
            summary.final = {"final/best_perplexity": perplexity(trainer.best_val_loss),
                             "final/total_steps": trainer.step, "final/total_epochs": trainer.sampler.epochs_done}
            summary.step = trainer.step
        tracker.close(summary)


def what_happened(result: TrainResult, cfg: TrainConfig, vocab_size: int) -> list[str]:
    """The end of a run in two lines (three when validation loss rose at the end: memorising, said plainly)."""
    minutes, seconds = divmod(round(result.seconds), 60)
    losses = []
    if result.history:
        losses.append(f"train loss {result.history[0]['train/loss']:.4f} -> {result.history[-1]['train/loss']:.4f}")
    if result.evals:
        (first_step, first), (last_step, last) = result.evals[0], result.evals[-1]
        losses.append(f"val loss {first:.4f} (step {first_step}) -> {last:.4f} (step {last_step}), best val loss "
                      f"{result.best_val_loss:.4f} (guessing uniformly among the {vocab_size:,} tokens scores "
                      f"{math.log(vocab_size):.4f})")
    lines = [f"done: {result.steps} steps in {minutes}m {seconds:02d}s; {'; '.join(losses)}."]
    out = Path(cfg.output_dir)
    where = [f"samples in {out / 'samples.txt'}", f"checkpoints in {checkpoint.checkpoint_dir(out)}"]
    if "tensorboard" in cfg.trackers():
        where.append(f"curves: {tensorboard_command()} --logdir {out / 'logs'}")
    lines.append("; ".join(where))
    if result.evals and result.evals[-1][1] > result.best_val_loss * 1.02:  # 2 %: more than evaluation noise
        lines.append(f"warning: validation loss rose from its best, {result.best_val_loss:.4f}, to "
                     f"{result.evals[-1][1]:.4f}: the model is memorising its training text. Train on more text, for "
                     f"fewer steps or with more --dropout; best.pt holds the weights with the best validation loss.")
    return lines


def tensorboard_command() -> str:
    """`tensorboard` when it is on PATH, else the one beside this Python (a virtual environment not activated)."""
    beside = Path(sys.executable).parent / "tensorboard"
    if shutil.which("tensorboard") or not beside.exists():
        return "tensorboard"
    with contextlib.suppress(ValueError):  # relative to here: shorter, and what ./dev.sh users can paste as it is
        return str(beside.relative_to(Path.cwd()))
    return str(beside)


def write_samples(trainer: Trainer, prompts: list[str], path: Path) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(f"=== step {trainer.step} ===\n")
        for prompt in prompts:
            text = trainer.sample(prompt)
            print(f"--- sample ({prompt!r}) ---\n{text}\n")
            f.write(f"--- {prompt!r} ---\n{text}\n\n")


def main(argv: list[str] | None = None) -> int:
    return run_cli(lambda args: run(parse_args(args)), argv)


if __name__ == "__main__":
    sys.exit(main())
