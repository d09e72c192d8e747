"""`python -m gpt_trainer.doctor`, as in earlier versions: the command lives in gpt_trainer.commands.doctor."""
import sys

from .commands.doctor import main

if __name__ == "__main__":
    sys.exit(main())
