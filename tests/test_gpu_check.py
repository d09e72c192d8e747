"""tools/gpu_check.py (`./dev.sh gpu-check`): without a GPU it claims nothing; the section it prints for BENCHMARKS.md.
What it checks on a GPU is tests/test_gpu.py, the training command and the benchmark, each tested on its own."""

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import gpu_check  # noqa: E402


def test_without_a_gpu_it_says_so_runs_nothing_and_exits_0():
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: ./dev.sh gpu-check runs for real")
    started = time.monotonic()
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check.py")], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and time.monotonic() - started < 60, done.stderr
    assert done.stdout.startswith(f"gpu-check: PyTorch {torch.__version__} (") and "sees no GPU here, so nothing was " \
        "run or measured" in done.stdout
    assert "passed" not in done.stdout and "| model |" not in done.stdout and "## GPU" not in done.stdout


def test_dev_sh_lists_every_subcommand_it_has_including_gpu_check():
    done = subprocess.run(["bash", str(ROOT / "dev.sh")], capture_output=True, text=True, timeout=30)  # no setup
    assert done.returncode == 2
    cases = re.findall(r"^  ([a-z-]+)\)$", (ROOT / "dev.sh").read_text(), re.MULTILINE)
    assert "gpu-check" in cases and 'tools/gpu_check.py "${@:2}"' in (ROOT / "dev.sh").read_text()
    assert all(f"./dev.sh {case}" in done.stderr for case in cases), done.stderr


# what python -m gpt_trainer.benchmark prints as its last line (a stand-in: no GPU measured it)
H200_ROW = {"model_size": "small", "parameters": 123_587_328, "device": "NVIDIA H200", "precision": "bf16",
            "batch_size": 32, "block_size": 1024, "gradient_accumulation_steps": 1, "compile": True,
            "compile_s": 41.6, "step_time_s": 0.1834, "tokens_per_sec": 178_670.0, "mfu": 0.4021,
            "peak_tflops_assumed": 989.4, "peak_source": "data sheet of H200, dense bf16", "peak_memory_gib": 41.27,
            "timed_steps": 20}


def test_the_section_for_benchmarks_md_names_the_machine_the_checks_and_the_rows():
    outcomes = [gpu_check.Outcome("GPU-only tests (`pytest -m gpu`)", True, "21 passed, 2 skipped", 95.2),
                gpu_check.Outcome("two-process `--parallel fsdp --compile` run and resume", None,
                                  "one GPU: it needs two"),
                gpu_check.Outcome("benchmark", True, "`python -m gpt_trainer.benchmark --suite --vocab_size=6045`",
                                  231.0)]
    text = gpu_check.section("1 x NVIDIA H200 (140 GiB), torch 2.13.0+cu128 (CUDA 12.8, driver 570.86.15)", outcomes,
                             [H200_ROW], 7.1 * 60, "2026-12-04")
    assert text.splitlines()[:6] == [
        "## GPU: 1 x NVIDIA H200 (140 GiB), torch 2.13.0+cu128 (CUDA 12.8, driver 570.86.15) — 2026-12-04", "",
        "`./dev.sh gpu-check` took 7.1 min:", "",
        "- GPU-only tests (`pytest -m gpu`): passed (21 passed, 2 skipped, 95 s)",
        "- two-process `--parallel fsdp --compile` run and resume: not run (one GPU: it needs two)"]
    assert ("| small (123.6M) | NVIDIA H200 | bf16 | on (42 s) | 32 x 1024 | 178,670 | 40.2% | 183.4 ms | "
            "41.27 GiB |") in text.splitlines()


def test_a_failed_check_is_said_and_pytest_s_summary_is_read():
    assert gpu_check.Outcome("benchmark", False, "row --model_size=small failed", 12).line() == \
        "- benchmark: FAILED (row --model_size=small failed, 12 s)"
    assert gpu_check.pytest_summary("...s..\n==== 1 failed, 19 passed, 3 skipped in 95.21s (0:01:35) ====\n") == \
        "1 failed, 19 passed, 3 skipped"


def test_a_check_that_runs_past_its_time_is_stopped_with_what_it_started():
    started = time.monotonic()
    assert gpu_check.run_within([sys.executable, "-c", "import time; time.sleep(60)"], 1) is None
    assert time.monotonic() - started < 30
    done = gpu_check.run_within([sys.executable, "-c", "print('ran')"], 30)
    assert done.returncode == 0 and done.stdout == "ran\n"
