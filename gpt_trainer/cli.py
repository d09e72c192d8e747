"""`python -m gpt_trainer.cli`, as in earlier versions: the command lives in gpt_trainer.commands.train."""
import sys

from .commands.train import main

if __name__ == "__main__":
    sys.exit(main())
