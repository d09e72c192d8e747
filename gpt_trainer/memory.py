"""`python -m gpt_trainer.memory`, as in earlier versions: the command lives in gpt_trainer.plan.memory."""
import sys

from .plan.memory import main

if __name__ == "__main__":
    sys.exit(main())
