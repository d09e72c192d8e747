"""`python -m gpt_trainer.export`, as in earlier versions: the command lives in gpt_trainer.commands.export."""
import sys

from .commands.export import main

if __name__ == "__main__":
    sys.exit(main())
