"""Everything only a GPU can show, in one command (`./dev.sh gpu-check`), and the section it makes for BENCHMARKS.md.

    python tools/gpu_check.py

Where PyTorch sees a CUDA or ROCm GPU: the GPU-only tests (`pytest -m gpu`), a two-process `--parallel fsdp
--compile` training run and its resume when there are two GPUs or more, and the benchmark's standard matrix (tiny and
small, bf16 where the GPU has it, compile off and on, `--batch_size auto`); then it prints a section to paste into
BENCHMARKS.md: the machine, what passed, and the benchmark's rows. Expected to take 5-7 minutes on one H100/H200-class
GPU (not measured yet: no GPU has run it).
Exit code 1 when a check failed (the section says which).

Where PyTorch sees no GPU it says so and exits 0, having run and measured nothing."""

from __future__ import annotations

import datetime
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from gpt_trainer.commands.benchmark import markdown_table, suite  # noqa: E402
from gpt_trainer.errors import RunStopped  # noqa: E402
from gpt_trainer.system.hardware import bf16_supported, is_rocm  # noqa: E402

TESTS_TIMEOUT_S, SMOKE_TIMEOUT_S = 360, 300
SMOKE_FLAGS = ["--corpus=builtin", "--model_size=tiny", "--block_size=256", "--batch_size=8", "--parallel=fsdp",
               "--compile=true", "--report_to=none", "--log_interval=10", "--eval_interval=20", "--eval_steps=2",
               "--sample_tokens=16"]
BENCHMARK_FLAGS = ["--vocab_size=6045"]  # the Song ci character set, as in BENCHMARKS.md's CPU tables


@dataclass
class Outcome:
    """One check: whether it passed (None: not run), what it showed, and how long it took."""
    name: str
    passed: bool | None
    said: str
    seconds: float = 0.0

    def line(self) -> str:
        verdict = {True: "passed", False: "FAILED", None: "not run"}[self.passed]
        took = f", {self.seconds:.0f} s" if self.passed is not None else ""
        return f"- {self.name}: {verdict} ({self.said}{took})"


def no_gpu_here() -> str | None:
    """Why there is nothing to check here, or None where PyTorch sees a GPU."""
    if torch.cuda.is_available():
        return None
    build = (f"CUDA {torch.version.cuda}" if torch.version.cuda else f"ROCm {torch.version.hip}" if torch.version.hip
             else "a CPU-only build")
    driver = next((tool for tool in ("nvidia-smi", "rocm-smi") if shutil.which(tool)), None)
    hint = (f" {driver} is here, so the GPU is not reachable from this PyTorch: install the build for it into .venv "
            f"(e.g. `TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 ./dev.sh gpu-check` after removing .venv; "
            f"rocm6.4 for AMD) and check the driver with `python -m gpt_trainer.doctor`." if driver else "")
    return (f"gpu-check: PyTorch {torch.__version__} ({build}) sees no GPU here, so nothing was run or measured and "
            f"BENCHMARKS.md gets nothing from this machine.{hint}")


def machine() -> str:
    """The GPUs and the software that drove them, for the section's heading."""
    count, name = torch.cuda.device_count(), torch.cuda.get_device_name(0)
    memory = torch.cuda.get_device_properties(0).total_memory / 2**30
    stack = f"ROCm {torch.version.hip}" if is_rocm() else f"CUDA {torch.version.cuda}"
    driver = driver_version()
    return (f"{count} x {name} ({memory:.0f} GiB), torch {torch.__version__} ({stack}"
            f"{f', driver {driver}' if driver else ''})")


def driver_version() -> str | None:
    tool = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
    if is_rocm() or not shutil.which(tool[0]):
        return None
    done = subprocess.run(tool, capture_output=True, text=True)
    return done.stdout.splitlines()[0].strip() if done.returncode == 0 and done.stdout.strip() else None


def run_within(command: list[str], timeout_s: float) -> subprocess.CompletedProcess | None:
    """`command` run to its end, or None when it ran past `timeout_s`: then it gets SIGTERM (torchrun passes it on to
    the processes it started, which run in sessions of their own), and SIGKILL a minute later if it is still there."""
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
        return None
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def run_gpu_tests() -> Outcome:
    name, started = "GPU-only tests (`pytest -m gpu`)", time.monotonic()
    done = run_within([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider"], TESTS_TIMEOUT_S)
    if done is None:
        return Outcome(name, False, f"still running after {TESTS_TIMEOUT_S} s, stopped", time.monotonic() - started)
    if done.returncode:
        print(done.stdout[-6000:], done.stderr[-2000:], sep="\n", file=sys.stderr)
    return Outcome(name, done.returncode == 0, pytest_summary(done.stdout), time.monotonic() - started)


def pytest_summary(output: str) -> str:
    """pytest's last line without its timing and decoration: `20 passed, 3 skipped`."""
    lines = [line.strip("= ") for line in output.splitlines() if re.search(r"\d+ (passed|failed|error)", line)]
    return re.sub(r" in [\d.]+s.*$", "", lines[-1]) if lines else "no summary line"


def run_fsdp_smoke(precision_flag: list[str]) -> Outcome:
    """Two processes, --parallel fsdp --compile, 40 steps with evaluations and sharded checkpoints, then a resume for
    20 more: the path no CPU test runs (NCCL, FSDP2 and torch.compile on GPUs together)."""
    name = "two-process `--parallel fsdp --compile` run and resume"
    if torch.cuda.device_count() < 2:
        return Outcome(name, None, "one GPU: it needs two")
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                str(ROOT / "train_single_gpu.py"), *SMOKE_FLAGS, *precision_flag, f"--output_dir={tmp}/run",
                f"--cache_dir={tmp}/cache"]
        for extra in (["--max_steps=40"], ["--max_steps=60", "--resume"]):
            done = run_within([*argv, *extra], SMOKE_TIMEOUT_S)
            if done is None:
                return Outcome(name, False, f"{' '.join(extra)} still running after {SMOKE_TIMEOUT_S} s, stopped",
                               time.monotonic() - started)
            if done.returncode:
                print(done.stdout[-4000:], done.stderr[-4000:], sep="\n", file=sys.stderr)
                return Outcome(name, False, f"{' '.join(extra)} exited {done.returncode}", time.monotonic() - started)
    speeds = re.findall(r"([\d,]+) tok/s", done.stdout)
    said = f"last progress line {speeds[-1]} tokens/s" if speeds else "no progress line seen"
    return Outcome(name, True, said, time.monotonic() - started)


def run_benchmark(precision_flag: list[str]) -> tuple[Outcome, list[dict]]:
    started = time.monotonic()
    extra = [*BENCHMARK_FLAGS, *precision_flag]
    try:
        results = suite(extra)
    except RunStopped as error:  # a row that failed: its message goes in the section, the other checks still count
        return Outcome("benchmark", False, str(error)[:300], time.monotonic() - started), []
    return (Outcome("benchmark", True, f"`python -m gpt_trainer.benchmark --suite {' '.join(extra)}`",
                    time.monotonic() - started), results)


def section(machine_line: str, outcomes: list[Outcome], results: list[dict], seconds: float, day: str) -> str:
    """The Markdown section for BENCHMARKS.md: heading with the machine and the date, what was checked, the rows."""
    lines = [f"## GPU: {machine_line} — {day}", "", f"`./dev.sh gpu-check` took {seconds / 60:.1f} min:", ""]
    lines += [outcome.line() for outcome in outcomes]
    if results:
        lines += ["", markdown_table(results)]
    return "\n".join(lines)


def main() -> int:
    missing = no_gpu_here()
    if missing:
        print(missing)
        return 0
    started = time.monotonic()
    precision_flag = ["--bf16"] if bf16_supported(torch.device("cuda")) else []  # else fp16, the default there
    outcomes = [run_gpu_tests(), run_fsdp_smoke(precision_flag)]
    benchmark, results = run_benchmark(precision_flag)
    outcomes.append(benchmark)
    print(section(machine(), outcomes, results, time.monotonic() - started, datetime.date.today().isoformat()))
    return 0 if all(outcome.passed is not False for outcome in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
