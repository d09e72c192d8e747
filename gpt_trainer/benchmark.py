"""`python -m gpt_trainer.benchmark`, as in earlier versions: the command lives in gpt_trainer.commands.benchmark."""
import sys

from .commands.benchmark import main

if __name__ == "__main__":
    sys.exit(main())
