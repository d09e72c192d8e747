"""`python -m gpt_trainer.demo`, as in earlier versions: the command lives in gpt_trainer.commands.demo."""
import sys

from .commands.demo import main

if __name__ == "__main__":
    sys.exit(main())
