"""The kinds of failure every layer raises: a `UsageError` is bad input (one paragraph, exit code 2, no traceback), a
`RunStopped` ends a run that cannot go on (exit code 1); a notice is a one-line note that is not an error. The commands
turn these, and the failures the machine causes, into sentences and exit codes in one place
(gpt_trainer/commands/failures.py)."""

from __future__ import annotations

import sys


class UsageError(Exception):
    """Bad input from the user: printed as one paragraph, exit code 2, no traceback."""


class RunStopped(Exception):
    """A run that cannot go on; the message names what happened, what was kept and what to try."""

    exit_code = 1


def notice(message: str) -> None:
    """A one-line note for the user that is not an error (fallbacks, offline mode); stderr keeps stdout clean."""
    print(message, file=sys.stderr, flush=True)


def is_out_of_memory(error: BaseException) -> bool:
    """A failed allocation: PyTorch's OutOfMemoryError (GPUs), Python's MemoryError, or the CPU allocator's
    RuntimeError."""
    text = str(error)
    return (isinstance(error, MemoryError) or any(k.__name__ == "OutOfMemoryError" for k in type(error).__mro__)
            or (isinstance(error, RuntimeError) and ("can't allocate memory" in text or "not enough memory" in text)))
