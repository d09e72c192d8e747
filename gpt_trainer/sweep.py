"""`python -m gpt_trainer.sweep`, as in earlier versions: the command lives in gpt_trainer.commands.sweep."""
import sys

from .commands.sweep import main

if __name__ == "__main__":
    sys.exit(main())
