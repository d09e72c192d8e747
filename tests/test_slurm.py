"""examples/slurm/ outside Slurm: what runs without a cluster. The recipes on a real two-node Slurm cluster are the CI
stage `./dev.sh slurm-test` (tests/slurm_stage.py)."""

import os
import signal
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SWEEP_SCRIPT = ROOT / "examples" / "slurm" / "sweep.sbatch"

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
