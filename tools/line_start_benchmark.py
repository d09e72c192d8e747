"""Issue 30's question: do training windows that start at a line (or a document) boundary help? Trains the default
recipe at tools/recipe_benchmark.py's shape with each epoch's window starts moved to the next line start (`line`) or
the next document start, after a blank line (`document`), and prints the validation losses. The validation windows
stay the product's. An experiment: it patches batches.EpochSampler in this process only; the product keeps its
random offsets (BENCHMARKS.md has the result).

    .venv/bin/python tools/line_start_benchmark.py line|document --data ../shared/data/song_ci.txt --out DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from recipe_benchmark import shape_flags  # tools/ is on sys.path when a tool runs

from gpt_trainer.commands.train import main
from gpt_trainer.data import batches
from gpt_trainer.train import trainer


def starts_after(tokens: np.ndarray, newline: int, block_size: int, blank_line: bool) -> np.ndarray:
    """The positions that follow a newline (two newlines: a blank line), with room for a whole window."""
    is_newline = tokens == newline
    if blank_line:
        starts = np.flatnonzero(is_newline[:-2] & is_newline[1:-1]) + 2
    else:
        starts = np.flatnonzero(is_newline[:-1]) + 1
    return starts[starts <= len(tokens) - 1 - block_size]


def snap_windows(mode: str) -> None:
    """Each window of an epoch starts at the first boundary at or after the product's own random offset."""
    own_order, own_init = batches.EpochSampler._epoch_order, trainer.Trainer.__init__

    def order(self, epoch):
        starts = self.boundaries
        return starts[np.minimum(np.searchsorted(starts, own_order(self, epoch)), len(starts) - 1)]

    def init(self, plan, data, *args, **kwargs):
        newline = data.tokenizer.encode("\n")[0]
        batches.EpochSampler.boundaries = starts_after(np.asarray(data.train), newline, plan.cfg.block_size,
                                                       mode == "document")
        own_init(self, plan, data, *args, **kwargs)

    batches.EpochSampler._epoch_order, trainer.Trainer.__init__ = order, init


if __name__ == "__main__":
    mode = sys.argv[1]
    data, out = (Path(sys.argv[sys.argv.index(flag) + 1]) for flag in ("--data", "--out"))
    snap_windows(mode)
    main([*shape_flags(data, 300, out), "--arch", "llama", "--optimizer", "muon"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    print(mode, {row["step"]: round(row["eval/loss"], 4) for row in rows if "eval/loss" in row})
