"""Prepare and cache a corpus's tokens ahead of training (on a cluster's login node before a job, say):

    python -m gpt_trainer.prepare --data_path ~/corpus/ [--tokenizer sentencepiece --vocab_size 8000] [--cache_dir DIR]

It takes the data flags of train_single_gpu.py, with the same meaning, and prepares exactly the cache a training run
with those flags will find: streamed in bounded memory, encoded on every usable core (--prepare_workers)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from ..config import DATA_FLAGS, TrainConfig, build_parser, parse_args
from ..data.tokens import TokenData, prepare_tokens
from ..errors import notice
from ..model.hf import init_tokenizer
from ..system.rundir import check_writable_folder
from .failures import AGAIN, run_cli


def prepare_command(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    build_parser(DATA_FLAGS, prog="python -m gpt_trainer.prepare", description=__doc__.split("\n")[0]).parse_args(argv)
    cfg = parse_args(argv)
    check_writable_folder(Path(cfg.resolved_cache_dir()), "--cache_dir")
    started = time.perf_counter()
    data = prepare_tokens(cfg, tokenizer=init_tokenizer(cfg))
    seconds = time.perf_counter() - started
    how = f"prepared in {seconds:.1f} s" if data.built else "found complete in the cache"
    print(f"{data.corpus}: {len(data.train):,} train + {len(data.val):,} validation tokens, vocabulary "
          f"{data.tokenizer.vocab_size:,} ({cfg.tokenizer}), {how}: {data.folder}")
    short_for_training(data)
    return 0


def short_for_training(data: TokenData) -> None:
    """A note when a split holds too few tokens for training's default context (prepare takes no --block_size: the
    cache is the same for every block size, and training checks its own)."""
    shortest, default = min(len(data.train), len(data.val)), TrainConfig.block_size
    if shortest > default:
        return
    fits = (f"train with --block_size {shortest - 1} or less, or " if shortest > 1 else "")
    notice(f"note: training needs at least block_size + 1 tokens in each split, and the shorter split here has "
           f"{shortest:,}: too few for train_single_gpu.py's default --block_size {default}. To train on it, "
           f"{fits}use more text or another --train_split (then prepare again).")


def main(argv: list[str] | None = None) -> int:
    return run_cli(prepare_command, argv, AGAIN)


if __name__ == "__main__":
    sys.exit(main())
