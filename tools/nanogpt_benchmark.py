"""nanoGPT's row in issue 30's recipe benchmark: karpathy/nanoGPT's own train.py, with its char-level recipe, on the
same text and shape as tools/recipe_benchmark.py, printed as one row of that tool's table.

    .venv/bin/python tools/nanogpt_benchmark.py --nanogpt /tmp/nanoGPT [--data ../shared/data/song_ci.txt]
        [--steps 300] [--target 6.1967] [--out results.json]

--nanogpt is a checkout of karpathy/nanoGPT (train.py, model.py, configurator.py, config/train_shakespeare_char.py);
nothing in it is edited: it is copied to a temporary folder and the corpus is written into that copy's data/ folder.
The corpus is prepared the way nanoGPT's char-level data step does (written fresh here): a vocabulary of the text's
characters, the first 90 % for training and the last 10 % for validation as uint16 ids, and meta.pkl with the vocabulary
size, which nanoGPT's train.py reads (this tool only writes it).

Kept from config/train_shakespeare_char.py: learning rate 1e-3, min_lr 1e-4, beta2 0.99, 100 warm-up iterations,
dropout 0.2, nanoGPT's default weight decay (0.1) and grad clip (1.0), decay to min_lr at max_iters.
Overridden to match our benchmark's shape: n_layer=4 n_head=4 n_embd=128 block_size=128 batch_size=16
gradient_accumulation_steps=1 max_iters=lr_decay_iters=--steps eval_interval=25 eval_iters=20 log_interval=1,
dataset=song_ci_char (the prepared corpus), and to run here: device=cpu compile=False dtype=float32
out_dir=<temporary> always_save_checkpoint=False wandb_log=False. nanoGPT's train.py ran unedited on torch 2.13.

nanoGPT evaluates on random batches (ours: fixed ones), so its validation losses compare with ours only roughly.
tok/s is the median over iterations of batch_size*block_size/time, the first few iterations left out."""

from __future__ import annotations

import argparse
import json
import pickle  # only to write the meta.pkl nanoGPT's train.py expects; nothing here reads a pickle
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from recipe_benchmark import first_reaching  # tools/ is on sys.path when a tool runs

ROOT = Path(__file__).resolve().parent.parent
DATASET = "song_ci_char"
BATCH, BLOCK = 16, 128
WARM_ITERATIONS = 5  # the first iterations are slow (allocation, first eval), so they stay out of tok/s
EVAL_LINE = re.compile(r"^step (\d+): train loss ([\d.]+), val loss ([\d.]+)", re.MULTILINE)
ITER_LINE = re.compile(r"^iter (\d+): loss ([\d.]+), time ([\d.]+)ms", re.MULTILINE)


def prepare(text: str, folder: Path) -> int:
    """Writes train.bin, val.bin and meta.pkl for nanoGPT into folder; returns the vocabulary size."""
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    ids = np.array([index[c] for c in text], dtype=np.uint16)
    split = int(len(ids) * 0.9)
    folder.mkdir(parents=True, exist_ok=True)
    ids[:split].tofile(folder / "train.bin")
    ids[split:].tofile(folder / "val.bin")
    meta = {"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": index}
    with open(folder / "meta.pkl", "wb") as f:
        pickle.dump(meta, f)
    return len(chars)


def overrides(steps: int, out_dir: Path) -> list[str]:
    values = {"dataset": DATASET, "n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": BLOCK,
              "batch_size": BATCH, "gradient_accumulation_steps": 1, "max_iters": steps, "lr_decay_iters": steps,
              "eval_interval": 25, "eval_iters": 20, "log_interval": 1, "device": "cpu", "compile": False,
              "dtype": "float32", "out_dir": str(out_dir), "always_save_checkpoint": False, "wandb_log": False}
    return [f"--{key}={value}" for key, value in values.items()]


def parse(log: str) -> dict:
    """Validation loss by step (step 0 left out) and the median tokens/s from nanoGPT's printed lines."""
    evals = {int(step): float(val) for step, _, val in EVAL_LINE.findall(log) if int(step) > 0}
    times = [float(ms) for step, _, ms in ITER_LINE.findall(log) if int(step) >= WARM_ITERATIONS]
    speeds = [BATCH * BLOCK / (ms / 1000) for ms in times if ms > 0]
    return {"evals": evals, "tokens_per_sec": statistics.median(speeds) if speeds else None}


def row(result: dict, target: float | None) -> str:
    evals = result["evals"]
    if target is None:
        reached = "—"
    else:
        reached = first_reaching(evals, target) or "not reached"
    return ("| nanoGPT (shakespeare_char recipe) | " + " | ".join(f"{evals[s]:.4f}" for s in sorted(evals))
            + f" | {reached} | {result['tokens_per_sec']:,.0f} |")


def run(nanogpt: Path, data: Path, steps: int, work: Path) -> str:
    copy = work / "nanoGPT"
    shutil.copytree(nanogpt, copy, ignore=shutil.ignore_patterns(".git"))
    prepare(data.read_text(encoding="utf-8"), copy / "data" / DATASET)
    command = [sys.executable, "train.py", "config/train_shakespeare_char.py", *overrides(steps, work / "out")]
    print(" ".join(command[1:]), flush=True)
    done = subprocess.run(command, cwd=copy, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"nanoGPT's train.py failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nanogpt", type=Path, required=True, help="a checkout of karpathy/nanoGPT")
    parser.add_argument("--data", type=Path, default=ROOT / ".." / "shared" / "data" / "song_ci.txt")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--target", type=float, help="report the first eval step whose val loss is <= this")
    parser.add_argument("--out", type=Path, help="write the results as JSON here too")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="nanogpt-") as work:
        result = parse(run(args.nanogpt.resolve(), args.data.resolve(), args.steps, Path(work)))
    print(row(result, args.target))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
