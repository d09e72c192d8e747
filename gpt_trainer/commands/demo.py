"""`python -m gpt_trainer.demo` (what `./dev.sh demo` runs): a first run that visibly learns in a few minutes on two CPU
cores with no network, and does not memorise.

The corpus is the Chinese default: the Song ci when it can be downloaded or is cached, else the ~200,000 characters
of Tang poems embedded in the package. The model (4 layers of width 128, 1.4 M parameters) and the budget (400 steps
of 32 x 64 tokens, 820 K tokens: 4.6 passes over the embedded poems) are sized to the smaller of the two, so
validation loss still falls at the last evaluation (BENCHMARKS.md has the measured curve). Flags given to the demo are
appended and win, e.g. `python -m gpt_trainer.demo --max_steps 100`."""

from __future__ import annotations

import sys

from . import train as cli

DEMO_FLAGS = [
    "--use_chinese", "--n_layer=4", "--n_head=4", "--n_embd=128", "--block_size=64", "--batch_size=32",
    "--max_steps=400", "--warmup_steps=40", "--eval_interval=50", "--eval_steps=8",
    "--log_interval=25", "--report_to=tensorboard", "--output_dir=./output_demo", "--cache_dir=./output_demo/cache",
    "--overwrite",
]


def main(argv: list[str] | None = None) -> int:
    return cli.main([*DEMO_FLAGS, *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
