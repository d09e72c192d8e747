"""Measure training speed: tokens/s, model FLOPs utilisation (with the peak it assumed), step time, peak memory.

    python -m gpt_trainer.benchmark --model_size tiny --batch_size 16 --block_size 256 --steps 20 [--bf16 ...]
    python -m gpt_trainer.benchmark --suite      # the standard matrix as a Markdown table, for BENCHMARKS.md

Takes every training flag; the data are random tokens from a --vocab_size vocabulary, so no corpus is needed.
Compiling happens before the timed steps and is reported on its own."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ..config import TrainConfig, parse_args
from ..data.tokenizer import CharTokenizer
from ..data.tokens import TokenData
from ..errors import RunStopped, UsageError
from ..plan.autobatch import settle_batch
from ..plan.run_plan import RunPlan, make_plan
from ..system.distributed import World
from ..system.hardware import device_name, peak_memory_bytes, pick_device, resolve_precision, synchronize
from ..system.rundir import RunFolder
from ..tracking import RunSummary, start_tracking
from ..train.metrics import model_flops_utilisation
from ..train.trainer import Trainer
from .failures import AGAIN, run_cli


def synthetic_data(vocab_size: int, tokens: int, seed: int = 0) -> TokenData:
    rng = np.random.default_rng(seed)
    dtype = np.uint16 if vocab_size <= 65536 else np.uint32
    ids = rng.integers(0, vocab_size, size=tokens, dtype=np.uint32).astype(dtype)
    tokenizer = CharTokenizer([chr(0x4E00 + i) for i in range(vocab_size)])
    return TokenData(ids, ids, tokenizer, "random", "")  # the benchmark never evaluates: val may repeat train


def own_flags(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """The benchmark's own flags, and the training flags that remain."""
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    extra.add_argument("--warmup", type=int, default=3, help="untimed steps first (allocator, kernels)")
    extra.add_argument("--tracking_overhead", action="store_true",
                       help="also time the steps with TensorBoard + wandb (offline) logging every --log_interval steps")
    extra.add_argument("--suite", action="store_true", help="run the standard matrix, print a Markdown table")
    own, rest = extra.parse_known_args(argv)
    if own.steps < 1 or own.warmup < 0:
        raise UsageError(f"--steps must be at least 1 and --warmup at least 0 (got {own.steps} and {own.warmup}).")
    return own, rest


def benchmark(argv: list[str]) -> dict:
    own, rest = own_flags(argv)
    cfg = parse_args(rest)
    return measure(cfg, own.steps, own.warmup, own.tracking_overhead)


def measure(cfg: TrainConfig, steps: int, warmup: int, with_tracking: bool = False) -> dict:
    device = pick_device(cfg.device)
    precision = resolve_precision(cfg, device)
    batch = settle_batch(cfg, cfg.vocab_size, device, precision, World())  # searched once: the data's size needs it
    cfg = dataclasses.replace(cfg, batch_size=batch.micro_batch, gradient_accumulation_steps=batch.accumulation,
                              global_batch_size=None)
    windows = (steps + warmup) * batch.micro_batch * batch.accumulation + 2
    data = synthetic_data(cfg.vocab_size, windows * cfg.block_size + 1)
    # the step budget is the benchmark's own; files are written only when tracking is timed, into a temporary folder
    plan = make_plan(cfg, World(), device, precision, data, RunFolder(Path(tempfile.gettempdir())))
    trainer = Trainer(plan, data)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        trainer.train_step()
        synchronize(device)  # timing needs the GPU finished; training itself never waits like this
        if i >= warmup:
            times.append(time.perf_counter() - start)
    step_time = statistics.median(times)
    tokens_per_sec = plan.tokens_per_step / step_time
    overhead = tracking_overhead(plan, data, steps) if with_tracking else {}
    return {**overhead,
        "model_size": cfg.model_size, "parameters": trainer.model.num_params(), "device": device_name(device),
        "precision": precision, "batch_size": plan.micro_batch, "block_size": cfg.block_size,
        "gradient_accumulation_steps": plan.accumulation,
        "compile": trainer.compile_seconds is not None, "compile_s": trainer.compile_seconds,
        "step_time_s": step_time, "tokens_per_sec": tokens_per_sec,
        "mfu": model_flops_utilisation(trainer.model.flops_per_token(), tokens_per_sec, trainer.peak),
        "peak_tflops_assumed": trainer.peak, "peak_source": trainer.peak_source,
        "peak_memory_gib": peak_memory_bytes(device) / 2**30, "timed_steps": steps,
    }


def timed_loop(trainer: Trainer, steps: int) -> tuple[float, float]:
    """(seconds per step, seconds spent reporting) for `steps` steps, reporting when training would (should_log)."""
    window = trainer.throughput_window()
    start, reporting = time.perf_counter(), 0.0
    for _ in range(steps):
        loss, grad_norm = trainer.train_step()
        window.add(loss)
        if trainer.should_log():
            synchronize(trainer.device)  # the wait for the GPU is not the logging calls' cost
            before = time.perf_counter()
            trainer.report(window, grad_norm)
            reporting += time.perf_counter() - before
    synchronize(trainer.device)
    return (time.perf_counter() - start) / steps, reporting


def tracking_overhead(plan: RunPlan, data: TokenData, steps: int) -> dict:
    """Same steps, same reporting cadence: once into nothing, once into metrics.jsonl + TensorBoard + wandb (offline).
    The wall-clock difference is noisy on a busy machine; the time spent inside the logging calls is not."""
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("WANDB_MODE", "offline")
        os.environ.setdefault("WANDB_SILENT", "true")
        tracked_plan = dataclasses.replace(plan, cfg=dataclasses.replace(plan.cfg, report_to="all"),
                                           folder=RunFolder(Path(tmp)), run_name="benchmark")
        bare, _ = timed_loop(Trainer(plan, data), steps)
        tracker = start_tracking(tracked_plan)
        tracked, logging_time = timed_loop(Trainer(tracked_plan, data, tracker), steps)
        tracker.close(RunSummary())
    return {"step_time_untracked_s": bare, "step_time_tracked_s": tracked, "tracking_wall_overhead": tracked / bare - 1,
            "tracking_call_overhead": logging_time / (bare * steps)}


def benchmark_command(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--suite" in argv:
        print(markdown_table(suite([a for a in argv if a != "--suite"])))
        return 0
    r = benchmark(argv)
    compiled = f", compiled in {r['compile_s']:.1f} s (not timed)" if r["compile"] else ""
    print(f"{r['model_size']} ({r['parameters'] / 1e6:.1f}M params) on {r['device']}, {r['precision']}{compiled}, "
          f"batch {r['batch_size']}x{r['block_size']} (accum {r['gradient_accumulation_steps']}):\n"
          f"  step time   {r['step_time_s'] * 1000:.1f} ms (median of {r['timed_steps']})\n"
          f"  throughput  {r['tokens_per_sec']:,.0f} tokens/s\n"
          f"  MFU         {r['mfu'] * 100:.1f}% of {r['peak_tflops_assumed']:.2f} TFLOP/s ({r['peak_source']})\n"
          f"  peak memory {r['peak_memory_gib']:.2f} GiB")
    if "tracking_call_overhead" in r:
        print(f"  tracking    {r['tracking_call_overhead'] * 100:.2f}% of step time spent in the logging calls; wall "
              f"clock {r['step_time_untracked_s'] * 1000:.1f} ms/step untracked vs "
              f"{r['step_time_tracked_s'] * 1000:.1f} ms/step with TensorBoard + wandb "
              f"({r['tracking_wall_overhead'] * 100:+.1f}%, noisy)")
    print(json.dumps(r))
    return 0


# ---- the standard matrix ---------------------------------------------------------------------------------------------
# Each row runs in its own process, so peak memory is that row's and no compiled code carries over.
GPU_SUITE = [[f"--model_size={size}", f"--block_size={block}", f"--compile={compiled}", "--batch_size=auto"]
             for size, block in (("tiny", 256), ("small", 1024)) for compiled in ("false", "true")]
CPU_SUITE = [["--model_size=tiny", "--block_size=128", f"--compile={compiled}", "--batch_size=auto", "--steps=10"]
             for compiled in ("false", "true")]  # reduced: the small model takes minutes per step on a few cores


def suite(extra: list[str]) -> list[dict]:
    """Every row of the standard matrix for this machine's device; `extra` flags follow (and win over) each row's."""
    cfg = parse_args(own_flags(extra)[1])  # bad flags stop here, before the first row
    rows = GPU_SUITE if pick_device(cfg.device).type == "cuda" else CPU_SUITE
    results = []
    for i, row in enumerate(rows, 1):
        command = [sys.executable, "-m", "gpt_trainer.benchmark", *row, *extra]
        print(f"[{i}/{len(rows)}] {' '.join(row + extra)}", file=sys.stderr, flush=True)
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            raise RunStopped(f"benchmark row {' '.join(row)} failed (exit {done.returncode}): "
                             f"{done.stderr.strip().splitlines()[-1] if done.stderr.strip() else 'no message'}")
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return results


def markdown_table(results: list[dict]) -> str:
    lines = ["| model | device | precision | compile | micro-batch x block | tokens/s | MFU | step time | "
             "peak memory |", "|---|---|---|---|---|---:|---:|---:|---:|"]
    for r in results:
        compiled = f"on ({r['compile_s']:.0f} s)" if r["compile"] else "off"
        lines.append(f"| {r['model_size']} ({r['parameters'] / 1e6:.1f}M) | {r['device']} | {r['precision']} | "
                     f"{compiled} | {r['batch_size']} x {r['block_size']} | {r['tokens_per_sec']:,.0f} | "
                     f"{r['mfu'] * 100:.1f}% | {r['step_time_s'] * 1000:.1f} ms | {r['peak_memory_gib']:.2f} GiB |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return run_cli(benchmark_command, argv, AGAIN)


if __name__ == "__main__":
    sys.exit(main())
