"""Where failures become sentences, for every command: `run_cli` runs a command's body and turns bad input
(`UsageError`: exit 2), a run that cannot go on (`RunStopped`: exit 1), a failure of the machine (a full disk, a denied
permission, a folder that vanished, memory running out: exit 1) and a second Ctrl-C (exit 130) into one paragraph on
stderr, never a traceback. Anything else is a bug and keeps its traceback. The lower layers raise the typed errors of
gpt_trainer/errors.py with the facts; their sentences are written here (run_stopped, training_failure, lost_process).
This module imports no torch: doctor and sweep use it on machines where torch may be missing or broken."""

from __future__ import annotations

import errno
import os
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ..errors import (CheckpointNotFinished, CheckpointNotWritten, Diverged, OutOfMemory, RunStopped, TrainingFailure,
                      UsageError, WeightsNotFinite, is_out_of_memory, notice)

if TYPE_CHECKING:
    from ..train.trainer import Trainer

RESUME = "continue with the same command plus --resume"  # what a training run does after a failure is fixed
AGAIN = "run the same command again"  # what a command that keeps no state (prepare, export, sample) does
# errno -> what it means for the user and what to do; {path} is the file the system named, {again} how to go on
OS_FAILURES = {
    errno.ENOSPC: "the disk is full ({path} could not be written). Free some space, then {again}.",
    errno.EDQUOT: "the disk quota is used up ({path} could not be written). Free some space, then {again}.",
    errno.EACCES: "permission denied on {path} (this process runs as uid {uid}). Fix its permissions, or choose "
                  "another folder, then {again}.",
    errno.EPERM: "the system refused an operation on {path} (this process runs as uid {uid}). Fix its permissions, "
                 "or choose another folder, then {again}.",
    errno.EROFS: "{path} is on a read-only file system. Choose a writable folder, then {again}.",
    errno.ENOENT: "{path} is gone: it vanished while the command used it (deleted, moved or unmounted). Restore it "
                  "and {again}.",
    errno.EIO: "an input/output error on {path}: the disk or the network file system is failing. Check it, then "
               "{again}.",
}


def environment_failure(error: BaseException, again: str = RESUME) -> str | None:
    """The sentence for a failure the machine caused (found anywhere in the error's chain), or None for a bug;
    `again` says how to go on once it is fixed."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in OS_FAILURES:
            path = error.filename or "a file of this run"
            return OS_FAILURES[error.errno].format(path=path, uid=os.getuid(), again=again)
        if is_out_of_memory(error):
            return ("out of memory: the machine could not give this process the memory it asked for. Use a smaller "
                    "--model_size, --batch_size (or --batch_size auto on a GPU) or --block_size.")
        error = error.__cause__ or error.__context__
    return None


def quiet_thread_failures(args) -> None:
    """A background thread (TensorBoard's event writer) that meets a failure of the machine says it in one line; the
    run itself then stops, or goes on without that writer, with its own sentence. A bug keeps its traceback."""
    message = environment_failure(args.exc_value)
    if message is None:
        threading.__excepthook__(args)
    else:
        notice(f"note: a background writer ({args.thread.name if args.thread else 'thread'}) stopped: {message}")


def run_cli(command: Callable[[list[str] | None], int], argv: list[str] | None = None, again: str = RESUME) -> int:
    """Run a command's main body: bad input exits 2, a stopped run or a failure of the machine 1, a second Ctrl-C 130;
    each with one paragraph on stderr and no traceback. `again`: how to go on once a failure of the machine is fixed
    (a training run resumes; prepare, export and sample are simply run again)."""
    threading.excepthook = quiet_thread_failures
    try:
        return command(argv)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RunStopped as e:
        print(f"error: {run_stopped(e, again)}", file=sys.stderr)
        return RunStopped.exit_code
    except KeyboardInterrupt:
        if again != RESUME:  # a command that keeps no state (prepare, export, ...): one Ctrl-C stops it
            print(f"\nerror: stopped by Ctrl-C. To finish the job, {again}.", file=sys.stderr)
            return 130
        print("\nerror: stopped at once (a second Ctrl-C; the first asks for a checkpoint after the current step). "
              "The checkpoints saved before are kept: " + RESUME + ".", file=sys.stderr)
        return 130
    except Exception as e:
        message = environment_failure(e, again)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 1


# ---- a run that cannot go on: the facts of a typed error in words ---------------------------------------------------
def run_stopped(error: RunStopped, again: str = RESUME) -> str:
    """The sentences of a run that cannot go on: a typed error's facts in words, else the sentence it was raised with;
    `again` says how to go on once it is fixed."""
    if isinstance(error, CheckpointNotWritten):
        kept = "The previous one is kept" if error.earlier_kept else "There was no earlier one"
        return (f"could not write the checkpoint {error.path} ({error.reason}). {kept}. Free some space or fix the "
                f"folder, then {again}.")
    if isinstance(error, CheckpointNotFinished):
        return (f"the checkpoint {error.path} was not finished: the main process could not write its last files (its "
                f"own message says why). {again[0].upper()}{again[1:]} once that is fixed.")
    return str(error)


def training_failure(failure: TrainingFailure, trainer: Trainer) -> str:
    """The sentences a training run that could not go on ends with: what happened, what was kept, what to change."""
    plan, cfg = trainer.plan, trainer.cfg
    resume = "continue from the latest with the same command plus --resume and the changed flags"
    if isinstance(failure, Diverged):
        where = (f"{failure.last_good[1]:.4f} at step {failure.last_good[0]}" if failure.last_good
                 else "never seen (it was not finite from the start)")
        fp16 = " or use --bf16 / --fp32 instead of fp16 (its range is small)" if plan.precision == "fp16" else ""
        clip = f"tighten --grad_clip (now {cfg.grad_clip:g})" if cfg.grad_clip else "enable --grad_clip (e.g. 1.0)"
        what = (f"{failure.bad_in_a_row} optimizer steps in a row up to step {failure.step} had a non-finite loss or "
                f"gradient norm (each was skipped, none applied)" if failure.bad_in_a_row >= cfg.max_bad_steps else
                f"the validation loss at step {failure.step} is not finite ({failure.bad_in_a_row} step(s) before it "
                f"had a non-finite loss or gradient and were skipped)")
        return (f"training diverged: {what}. The last finite training loss "
                f"was {where}. Try a lower --learning_rate (now {cfg.learning_rate:g}, {failure.lr:.2g} at this "
                f"step), {clip}{fp16}. The checkpoints saved so far are untouched: {resume}.")
    if isinstance(failure, OutOfMemory):
        kept = (f"The state after step {failure.failed_step - 1} was saved to {failure.saved_to}" if failure.saved_to
                else f"Nothing was saved; the checkpoints in {plan.folder.checkpoints} are untouched")
        return (f"out of memory in training step {failure.failed_step}: model {cfg.model_label()}, "
                f"{trainer.model.num_params() / 1e6:.1f}M parameters in {plan.precision}; micro-batch "
                f"{plan.micro_batch} x block {cfg.block_size} tokens, {plan.accumulation} accumulation step(s); "
                f"{failure.memory}. Fixes: --batch_size auto (the largest micro-batch that fits), or the "
                f"same batch per step in smaller pieces (--batch_size {max(1, plan.micro_batch // 2)} "
                f"--gradient_accumulation_steps {plan.accumulation * 2}), a shorter --block_size, or a smaller "
                f"--model_size. {kept}: continue with the same command plus --resume and the changed flags.")
    if isinstance(failure, WeightsNotFinite):
        return (f"the model's weights are no longer finite at step {failure.step}, so nothing was saved over the "
                f"checkpoints in {plan.folder.checkpoints}. Continue from the latest with --resume and a lower "
                f"--learning_rate or a tighter --grad_clip.")
    raise failure


def lost_process(lost: str, checkpoint: tuple[Path, int] | None, saved_this_attempt: bool) -> str:
    """The sentences of a run that lost one of its processes: what happened (`lost`: distributed.missing_peers), then
    the checkpoint to continue from (`checkpoint`: its path and step; saved by this attempt, or the one it resumed
    from) and how."""
    if checkpoint is None:
        return f"{lost} No checkpoint was saved yet: {RESUME} to start again."
    path, step = checkpoint
    as_before = "" if saved_this_attempt else ", as at the start"
    return f"{lost} The last checkpoint is {path} (step {step}){as_before}: {RESUME}."
