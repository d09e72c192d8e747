"""`python -m gpt_trainer` (and `gpt-train`): the training command, or another command named first, so that
`python -m gpt_trainer sample CHECKPOINT` works as `python -m gpt_trainer.sample CHECKPOINT` does."""

import importlib
import sys

from .commands import train

COMMANDS = ("sample", "sweep", "doctor", "benchmark", "demo", "prepare", "export")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in COMMANDS:
        return importlib.import_module(f"gpt_trainer.commands.{argv[0]}").main(argv[1:])
    return train.main(argv)


if __name__ == "__main__":
    sys.exit(main())
