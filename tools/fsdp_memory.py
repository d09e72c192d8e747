"""The whole job's memory under FSDP on the CPU, against the memory plan it printed (issue 29's check).

Two gloo processes train `--model_size medium --parallel fsdp --batch_size 1 --block_size 64` for 2 steps (an
evaluation, sampling and a checkpoint included), then resume for 1 more. The job's memory is the sum of the
proportional set sizes (PSS: shared library pages split between the processes that map them) of the launcher and
its processes, sampled every 0.2 s. The limit: 1.3 x the plan's per-GPU total without the assumed GPU context, times
two, plus what a bare job (the launcher and two processes that import the trainer and join the group, nothing else)
holds, measured the same way.

    .venv/bin/python tools/fsdp_memory.py [--model_size medium] [--recipe "--arch gpt2 --optimizer adamw"] [--keep]

The processes return large freed blocks to the system as they go (hardware.return_large_blocks_when_freed, which
parallelize asks for under FSDP on the CPU); GLIBC_TUNABLES in the environment reaches every process of the jobs, to
measure other allocator settings.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
GIB = 1024**3
BARE_RANK = ("import torch.distributed as dist, gpt_trainer.commands.train, gpt_trainer.train.trainer; "
             "dist.init_process_group('gloo'); dist.barrier(); dist.destroy_process_group()")


def job_pss(root: psutil.Process) -> int:
    total = 0
    for process in [root, *root.children(recursive=True)]:
        try:
            total += process.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def peak_of(command: list[str], cwd: Path) -> tuple[int, str]:
    """Run `command`; return (the peak of its process tree's PSS, its output)."""
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak, root = 0, psutil.Process(process.pid)
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(process.stdout), daemon=True)
    reader.start()
    while process.poll() is None:
        peak = max(peak, job_pss(root))
        time.sleep(0.2)
    reader.join()
    text = "".join(output)
    if process.returncode:
        sys.exit(f"{' '.join(command)} failed (exit {process.returncode}):\n{text[-3000:]}")
    return peak, text


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]


def planned_without_context(output: str) -> float:
    """The printed plan's per-GPU total less the assumed GPU context, in GiB."""
    total = float(re.search(r"memory total ([\d.]+) GiB", output).group(1))
    context = float(re.search(r"context and fragmentation ([\d.]+)", output).group(1))
    return total - context


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_size", default="medium")
    parser.add_argument("--recipe", default="", help='training flags added to the first run, e.g. "--arch gpt2 '
                                                      '--optimizer adamw" (the resume keeps them)')
    parser.add_argument("--keep", action="store_true", help="keep the run folder")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fsdp-memory-"))
    try:
        bare, _ = peak_of(torchrun("--no-python", sys.executable, "-c", BARE_RANK), work)
        train = ["--model_size", args.model_size, "--parallel", "fsdp", "--batch_size", "1", "--block_size", "64",
                 "--use_chinese", "--eval_interval", "2", "--eval_steps", "2", "--sample_tokens", "16",
                 "--report_to", "none", "--output_dir", str(work / "run")]
        first = [*train, *args.recipe.split(), "--max_steps", "2"]
        trained, output = peak_of(torchrun(str(ROOT / "train_single_gpu.py"), *first), work)
        resumed, _ = peak_of(torchrun(str(ROOT / "train_single_gpu.py"), *train, "--max_steps", "3", "--resume"), work)
        plan = planned_without_context(output)
        limit = 1.3 * plan * 2 * GIB + bare
        print(f"plan per process without GPU context {plan:.1f} GiB; bare job {bare / GIB:.2f} GiB; "
              f"limit {limit / GIB:.2f} GiB")
        for name, peak in (("training (2 steps, evaluation, sampling, checkpoint)", trained),
                           ("resume (1 more step)", resumed)):
            print(f"{name}: peak {peak / GIB:.2f} GiB ({peak / limit:.0%} of the limit)")
        return 0 if max(trained, resumed) <= limit else 1
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
