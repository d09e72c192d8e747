"""examples/slurm/ outside Slurm: what runs without a cluster. The recipes on a real two-node Slurm cluster are the CI
stage `./dev.sh slurm-test` (tests/slurm_stage.py)."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import CLASSIC_POEMS, TINY_SHAPE, interrupt_after_lines, script_env

ROOT = Path(__file__).resolve().parents[1]
SWEEP_SCRIPT = ROOT / "examples" / "slurm" / "sweep.sbatch"
TRAIN_SCRIPT = ROOT / "examples" / "slurm" / "train.sbatch"

# Stands in for `wandb agent`, which needs a wandb server (none is reachable here): it records its arguments and the
# signals it receives, as the real agent's trial would save on SIGTERM.
FAKE_WANDB = """#!/usr/bin/env bash
echo "args: $*" >> "$RECORD"
trap 'echo "got TERM" >> "$RECORD"; exit 143' TERM
echo started >> "$RECORD"
while true; do sleep 0.1; done
"""


def start_sweep_task(tmp_path: Path, *args: str, **env: str) -> tuple[subprocess.Popen, Path]:
    bin_dir, record = tmp_path / "bin", tmp_path / "record.txt"
    bin_dir.mkdir()
    (bin_dir / "wandb").write_text(FAKE_WANDB)
    (bin_dir / "wandb").chmod(0o755)
    proc = subprocess.Popen(["bash", str(SWEEP_SCRIPT), *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RECORD": str(record),
                                 "SLURM_JOB_ID": "77", "SLURM_ARRAY_TASK_ID": "3", **env})
    deadline = time.monotonic() + 20
    while "started" not in (record.read_text() if record.exists() else ""):
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()[0]
        time.sleep(0.05)
    return proc, record


def test_a_sweep_task_runs_one_wandb_agent_trial_and_passes_sigterm_on(tmp_path):
    proc, record = start_sweep_task(tmp_path, "me/proj/abc123", "--project", "x")
    proc.send_signal(signal.SIGTERM)  # what --signal=B:TERM@120 sends: the batch shell only
    output = proc.communicate(timeout=20)[0]
    assert record.read_text().splitlines() == ["args: agent --count 1 --project x me/proj/abc123", "started",
                                               "got TERM"], output
    assert proc.returncode == 143
    assert "array task 3 of job 77" in output


def test_trials_per_task_sets_the_agents_count(tmp_path):
    proc, record = start_sweep_task(tmp_path, "me/proj/abc123", TRIALS_PER_TASK="4")
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=20)
    assert record.read_text().splitlines()[0] == "args: agent --count 4 me/proj/abc123"


def test_a_sweep_task_without_a_sweep_says_how_to_call_it():
    done = subprocess.run(["bash", str(SWEEP_SCRIPT)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and "usage: sbatch --array=0-7 examples/slurm/sweep.sbatch" in done.stderr


# ---- train.sbatch outside Slurm: stand-ins for scontrol and srun ----------------------------------------------------
# Stand-ins, since no Slurm runs here (the Slurm stage runs the script on a real cluster): scontrol answers for one
# node, n1 at 127.0.0.1; srun records the command it was given (NUL-separated) and the shutdown time torchrun would
# read from its environment, and starts nothing.
FAKE_SCONTROL = """#!/usr/bin/env bash
case "$1 $2" in
  "show hostnames") echo n1 ;;
  "show node") echo "NodeName=$3 Arch=x86_64 NodeAddr=127.0.0.1 NodeHostName=$3 State=ALLOCATED" ;;
esac
"""
FAKE_SRUN = """#!/usr/bin/env bash
printf '%s\\0' "$@" > "$RECORD"
echo "${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-unset}" > "$RECORD.shutdown"
"""


def submit(tmp_path: Path, attempt: int, *flags: str, shell: tuple[str, ...] = ("bash",),
           **env: str) -> tuple[list[str], str]:
    """train.sbatch as attempt `attempt` of job 5 on one CPU node; returns the training flags its srun would pass to
    `python -m gpt_trainer` on every node, and what the script printed."""
    bin_dir, record = tmp_path / "bin", tmp_path / "srun-command"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("scontrol", FAKE_SCONTROL), ("srun", FAKE_SRUN)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    slurm = {"SLURM_JOB_ID": "5", "SLURM_JOB_NODELIST": "n1", "SLURM_NNODES": "1",
             "SLURM_RESTART_COUNT": str(attempt - 1), "GPUS_PER_NODE": "0"}
    done = subprocess.run([*shell, str(TRAIN_SCRIPT), *flags], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RECORD": str(record), **slurm,
                               **env})
    assert done.returncode == 0, done.stderr
    command = record.read_text().split("\0")[:-1]
    return command[command.index("gpt-train") + 1:], done.stdout + done.stderr


@pytest.mark.parametrize("shell", [("bash",), ("bash", "--posix")])
def test_a_requeued_attempt_drops_overwrite_in_every_spelling_and_keeps_the_other_flags(tmp_path, shell):
    flags = ["--overwrite", "--max_steps", "1", "--output_dir=runs/x", "--overwrite", "true", "--overwrite=yes",
             "--resume"]
    first, _ = submit(tmp_path, 1, *flags, shell=shell)
    assert first == flags  # the first attempt runs what was submitted
    again, log = submit(tmp_path, 2, *flags, shell=shell)
    assert again == ["--max_steps", "1", "--output_dir=runs/x", "--resume", "--resume"]
    assert ("attempt 2 resumes the run: dropped --overwrite --overwrite true --overwrite=yes from the training flags "
            "(it would clear the checkpoints to continue from)") in log
    assert "job 5 (attempt 2): 1 node(s) x 1 process(es), rendezvous at n1 (127.0.0.1:29500), resuming" in log


def test_torchrun_is_given_110_s_to_let_its_processes_save_unless_told_otherwise(tmp_path):
    """torch 2.13's torchrun reads TORCH_ELASTIC_SHUTDOWN_TIMEOUT (30 s when unset): inside the 120 s of
    --signal=B:TERM@120, and stated in docs/clusters.md."""
    submit(tmp_path, 1, "--max_steps=1")
    assert (tmp_path / "srun-command.shutdown").read_text() == "110\n"
    submit(tmp_path, 1, "--max_steps=1", TORCH_ELASTIC_SHUTDOWN_TIMEOUT="280")
    assert (tmp_path / "srun-command.shutdown").read_text() == "280\n"
    assert "#SBATCH --signal=B:TERM@120" in TRAIN_SCRIPT.read_text()
    for page in ("docs/clusters.md", "docs/zh-CN/clusters.md"):
        assert "TORCH_ELASTIC_SHUTDOWN_TIMEOUT=110" in (ROOT / page).read_text(encoding="utf-8"), page


@pytest.mark.parametrize("script", [TRAIN_SCRIPT, SWEEP_SCRIPT], ids=lambda path: path.name)
def test_no_array_is_expanded_bare(script):
    """bash before 4.4 (Debian 9, CentOS 7, Ubuntu 16.04) stops with "unbound variable" at a bare "${A[@]}" of an
    empty array under `set -u`; no such bash can be installed here, so this checks the text: every array expansion
    takes the ${A[@]+"${A[@]}"} form, which expands to nothing when A is empty."""
    text = script.read_text()
    guarded = re.compile(r'\$\{(\w+)\[([@*])\]\+"?\$\{\1\[\2\]\}"?\}')
    assert guarded.search(text)  # the check sees the form it allows
    bare = re.findall(r"\$\{\w+\[[@*]\]\}", guarded.sub("", text.split("set -euo pipefail", 1)[1]))
    assert bare == [], f"{script.name}: {bare}"


@pytest.mark.slow
def test_a_job_submitted_with_overwrite_continues_its_run_when_requeued(tmp_path, cache_dir):
    """Each attempt runs the flags the script would give torchrun, for real, on one process, and is stopped with
    SIGTERM as a requeue stops it."""
    out, metrics = tmp_path / "out", tmp_path / "out" / "metrics.jsonl"
    flags = [f"--data_path={CLASSIC_POEMS}", f"--cache_dir={cache_dir}", f"--output_dir={out}", *TINY_SHAPE,
             "--max_steps=100000", "--eval_interval=100000", "--save_interval=100000", "--log_interval=1",
             "--overwrite"]
    first, _ = submit(tmp_path, 1, *flags)
    code, err = interrupt_after_lines([sys.executable, "-m", "gpt_trainer", *first], metrics, 3, cwd=ROOT,
                                      env=script_env())
    assert code == 128 + signal.SIGTERM, err
    saved = len(metrics.read_text().splitlines())
    again, log = submit(tmp_path, 2, *flags)
    assert "--overwrite" not in again and again[-1] == "--resume", again
    code, err = interrupt_after_lines([sys.executable, "-m", "gpt_trainer", *again], metrics, saved + 3, cwd=ROOT,
                                      env=script_env())
    assert code == 128 + signal.SIGTERM, err  # trained on, not refused (--resume with --overwrite exits 2)
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= saved + 3  # continued: each step once
