#!/usr/bin/env python3
"""Train a small GPT on one GPU or the CPU. `python train_single_gpu.py --help` lists every flag."""
import sys

from gpt_trainer.commands.train import main

if __name__ == "__main__":
    sys.exit(main())
