"""How the commands talk to the user about problems: a `UsageError` is bad input (one paragraph, exit code 2, no
traceback), a `RunStopped` ends a run that cannot go on (divergence, a full disk: one paragraph, exit code 1), a
notice is a one-line note that is not an error, and `run_cli` turns the exceptions into messages and exit codes."""

from __future__ import annotations

import sys
from typing import Callable


class UsageError(Exception):
    """Bad input from the user: printed as one paragraph, exit code 2, no traceback."""


class RunStopped(Exception):
    """A run that cannot go on; the message names what happened, what was kept and what to try."""

    exit_code = 1


def notice(message: str) -> None:
    """A one-line note for the user that is not an error (fallbacks, offline mode); stderr keeps stdout clean."""
    print(message, file=sys.stderr, flush=True)


def run_cli(command: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run a command's main body; bad input becomes `error: ...` on stderr and exit code 2, a stopped run exit 1."""
    try:
        return command(argv)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RunStopped as e:
        print(f"error: {e}", file=sys.stderr)
        return RunStopped.exit_code
