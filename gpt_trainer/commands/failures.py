"""Where failures become sentences, for every command: `run_cli` runs a command's body and turns bad input
(`UsageError`: exit 2), a run that cannot go on (`RunStopped`: exit 1), a failure of the machine (a full disk, a denied
permission, a folder that vanished, memory running out: exit 1) and a second Ctrl-C (exit 130) into one paragraph on
stderr, never a traceback. Anything else is a bug and keeps its traceback."""

from __future__ import annotations

import errno
import os
import sys
import threading
from typing import Callable

from ..errors import RunStopped, UsageError, is_out_of_memory, notice

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
        print(f"error: {e}", file=sys.stderr)
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
