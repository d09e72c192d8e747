"""`python -m gpt_trainer.sample`, as in earlier versions: the command lives in gpt_trainer.commands.sample."""
import sys

from .commands.sample import main

if __name__ == "__main__":
    sys.exit(main())
