"""What each part of the recipe buys: validation loss every 25 steps and tokens/s for gpt2+adamw, llama+adamw,
gpt2+muon and llama+muon, trained by the product itself on the same text and shape (issue 30's benchmark).

    .venv/bin/python tools/recipe_benchmark.py --data ../shared/data/song_ci.txt [--steps 300] [--out results.json]

Shape: 4 layers x 128 wide, 4 heads, block 128, batch 16, fp32, no dropout, 30 warm-up steps then cosine to a
tenth; 20 fixed validation batches every 25 steps. Each recipe's learning rates are the product's defaults for it,
except AdamW's for the GPT-2 recipe, which is set to 1e-3: its default (3e-4) is a weaker baseline on 300 steps.
Prints a Markdown table, and the step at which each recipe first reaches gpt2+adamw's last validation loss."""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPES = {  # name: the flags that make it
    "gpt2+adamw": ["--arch", "gpt2", "--optimizer", "adamw", "--learning_rate", "1e-3"],
    "llama+adamw": ["--arch", "llama", "--optimizer", "adamw", "--learning_rate", "1e-3"],
    "gpt2+muon": ["--arch", "gpt2", "--optimizer", "muon"],
    "llama+muon": ["--arch", "llama", "--optimizer", "muon"],
}


def shape_flags(data: Path, steps: int, output_dir: Path) -> list[str]:
    return ["--data_path", str(data), "--n_layer", "4", "--n_head", "4", "--n_embd", "128", "--block_size", "128",
            "--batch_size", "16", "--max_steps", str(steps), "--warmup_steps", "30", "--dropout", "0",
            "--eval_interval", "25", "--eval_steps", "20", "--log_interval", "25", "--sample_tokens", "0",
            "--report_to", "none", "--compile", "false", "--seed", "1337", "--output_dir", str(output_dir)]


def run(name: str, flags: list[str], data: Path, steps: int, work: Path) -> dict:
    folder = work / name.replace("+", "-")
    command = [sys.executable, str(ROOT / "train_single_gpu.py"), *shape_flags(data, steps, folder), *flags]
    print(f"{name}: {' '.join(command[1:])}", flush=True)
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    evals = {row["step"]: row["eval/loss"] for row in rows if "eval/loss" in row}
    speeds = [row["train/tokens_per_sec"] for row in rows if "train/tokens_per_sec" in row]
    return {"evals": evals, "tokens_per_sec": statistics.median(speeds)}


def first_reaching(evals: dict[int, float], target: float) -> int | None:
    return next((step for step, loss in sorted(evals.items()) if loss <= target), None)


def table(results: dict[str, dict]) -> str:
    steps = sorted(next(iter(results.values()))["evals"])
    baseline = results["gpt2+adamw"]
    target = baseline["evals"][steps[-1]]
    lines = ["| recipe | " + " | ".join(f"val@{s}" for s in steps) + f" | first eval <= {target:.4f} | tok/s |",
             "|---|" + "---|" * (len(steps) + 2)]
    for name, result in results.items():
        reached = first_reaching(result["evals"], target)
        speed = result["tokens_per_sec"] / baseline["tokens_per_sec"]
        lines.append(f"| {name} | " + " | ".join(f"{result['evals'][s]:.4f}" for s in steps)
                     + f" | {reached if reached is not None else 'not reached'} | "
                     + f"{result['tokens_per_sec']:,.0f} ({speed:.2f}x) |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--recipes", default=",".join(RECIPES),
                        help="comma-separated names from: " + ", ".join(RECIPES))
    parser.add_argument("--extra", default="", help="flags added to every recipe (one string)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here too")
    args = parser.parse_args()
    names = args.recipes.split(",")
    unknown = [n for n in names if n not in RECIPES]
    if unknown or "gpt2+adamw" not in names:
        sys.exit(f"--recipes: unknown {unknown}; gpt2+adamw must be among them (it is the baseline)")
    with tempfile.TemporaryDirectory(prefix="recipes-") as work:
        results = {name: run(name, RECIPES[name] + args.extra.split(), args.data.resolve(), args.steps, Path(work))
                   for name in names}
    print(table(results))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
