"""`python -m gpt_trainer.prepare`, as in earlier versions: the command lives in gpt_trainer.commands.prepare."""
import sys

from .commands.prepare import main

if __name__ == "__main__":
    sys.exit(main())
