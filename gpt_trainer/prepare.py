"""Prepare and cache a corpus's tokens ahead of training (on a cluster's login node before a job, say):

    python -m gpt_trainer.prepare --data_path ~/corpus/ [--tokenizer sentencepiece --vocab_size 8000] [--cache_dir DIR]

It takes the data flags of train_single_gpu.py, with the same meaning, and prepares exactly the cache a training run
with those flags will find: streamed in bounded memory, encoded on every usable core (--prepare_workers)."""

from __future__ import annotations

import sys
import time

from .config import DATA_FLAGS, build_parser, parse_args
from .data import prepare_data
from .errors import AGAIN, run_cli


def prepare_command(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    build_parser(DATA_FLAGS, prog="python -m gpt_trainer.prepare", description=__doc__.split("\n")[0]).parse_args(argv)
    cfg = parse_args(argv)
    started = time.perf_counter()
    data = prepare_data(cfg)
    seconds = time.perf_counter() - started
    how = f"prepared in {seconds:.1f} s" if data.built else "found complete in the cache"
    print(f"{data.corpus}: {len(data.train):,} train + {len(data.val):,} validation tokens, vocabulary "
          f"{data.tokenizer.vocab_size:,} ({cfg.tokenizer}), {how}: {data.folder}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(prepare_command, argv, AGAIN)


if __name__ == "__main__":
    sys.exit(main())
