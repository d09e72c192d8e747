"""How the commands talk to the user about problems, in one place: a `UsageError` is bad input (one paragraph, exit
code 2, no traceback), a `RunStopped` ends a run that cannot go on (divergence, a full disk: one paragraph, exit
code 1), a notice is a one-line note that is not an error, and `run_cli` turns these, and the failures the machine can
cause (a full disk, a denied permission, a folder that vanished, memory running out, a second Ctrl-C), into sentences
and exit codes. Anything else is a bug and keeps its traceback."""

from __future__ import annotations

import errno
import os
import sys
import threading
from typing import Callable


class UsageError(Exception):
    """Bad input from the user: printed as one paragraph, exit code 2, no traceback."""


class RunStopped(Exception):
    """A run that cannot go on; the message names what happened, what was kept and what to try."""

    exit_code = 1


def notice(message: str) -> None:
    """A one-line note for the user that is not an error (fallbacks, offline mode); stderr keeps stdout clean."""
    print(message, file=sys.stderr, flush=True)


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


def is_out_of_memory(error: BaseException) -> bool:
    """A failed allocation: PyTorch's OutOfMemoryError (GPUs), Python's MemoryError, or the CPU allocator's
    RuntimeError."""
    text = str(error)
    return (isinstance(error, MemoryError) or any(k.__name__ == "OutOfMemoryError" for k in type(error).__mro__)
            or (isinstance(error, RuntimeError) and ("can't allocate memory" in text or "not enough memory" in text)))


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
