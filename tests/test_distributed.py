"""Several processes for real: torchrun and accelerate launch with two CPU processes on gloo, each one thread."""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt_trainer.data import EpochSampler, share_of
from gpt_trainer.distributed import World
from tests.conftest import CLASSIC_POEMS, TINY_SHAPE, interrupt_after_lines, plan_for, scalars
from tests.wandb_offline import history_rows, run_files

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def launch(cmd: list[str], env: dict = ENV, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run a launcher to the end; on a time-out stop it with SIGTERM, which it passes on to its worker processes
    (they run in sessions of their own, so killing the launcher alone would leave them behind)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def training(out: Path, cache_dir: Path, *extra: str) -> list[str]:
    return [str(ROOT / "train_single_gpu.py"), f"--data_path={CLASSIC_POEMS}", f"--cache_dir={cache_dir}",
            f"--output_dir={out}", *TINY_SHAPE, "--log_interval=1", *extra]


def weights(out: Path) -> dict:
    return torch.load(out / "checkpoints" / "latest.pt", weights_only=False)["model"]


def test_the_processes_share_each_epoch_once_between_them():
    tokens = np.arange(16 * 40 + 1)
    samplers = [EpochSampler(tokens, 16, seed=3) for _ in range(2)]
    seen = [np.concatenate([share_of(s.next_offsets(8), rank, 2) for _ in range(5)]) for rank, s in enumerate(samplers)]
    assert set(seen[0]).isdisjoint(seen[1])
    assert len(set(seen[0]) | set(seen[1])) == 40 == samplers[0].windows_per_epoch  # the epoch, once


@pytest.mark.slow
def test_one_step_on_two_processes_equals_two_accumulated_micro_batches_on_one(tmp_path, cache_dir):
    flags = ("--max_steps=1", "--eval_interval=1", "--report_to=none", "--dropout=0.0")
    two = launch([*TORCHRUN, *training(tmp_path / "two", cache_dir, *flags)])
    assert two.returncode == 0, two.stderr[-3000:]
    assert "x 2 processes" in two.stdout and "(global batch 8)" in two.stdout
    one = subprocess.run([sys.executable, *training(tmp_path / "one", cache_dir, *flags,
                                                   "--gradient_accumulation_steps=2")],
                         cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = weights(tmp_path / "two"), weights(tmp_path / "one")
    assert all(torch.allclose(a[k], b[k], atol=1e-5, rtol=0) for k in a)
    assert json.loads((tmp_path / "two" / "config.json").read_text())["global_batch_size"] == 8


@pytest.mark.slow
def test_only_the_main_process_writes_and_each_step_is_logged_once(tmp_path, cache_dir):
    env = {**ENV, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "HOME": str(tmp_path / "home")}
    out = tmp_path / "out"
    result = launch([*TORCHRUN, *training(out, cache_dir, "--max_steps=4", "--eval_interval=2", "--report_to=all")],
                    env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("done: 4 steps") == 1 and result.stdout.count("step 4 |") == 1
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if "train/loss" in line]
    assert steps == [1, 2, 3, 4]
    [logdir] = list((out / "logs").iterdir())
    assert scalars(logdir)[0]["train/loss"] == [1, 2, 3, 4]
    [run_file] = run_files(out)  # one wandb run
    assert [row["global_step"] for row in history_rows(run_file) if "train/loss" in row] == [1, 2, 3, 4]


@pytest.mark.slow
def test_sigterm_stops_every_process_at_one_step_and_resume_continues(tmp_path, cache_dir):
    out = tmp_path / "out"
    argv = training(out, cache_dir, "--max_steps=100000", "--eval_interval=100000", "--save_interval=100000",
                    "--report_to=none")
    _, err = interrupt_after_lines([*TORCHRUN, *argv], out / "metrics.jsonl", 3, signal.SIGTERM, cwd=ROOT, env=ENV,
                                   timeout=120)
    stopped_at = torch.load(out / "checkpoints" / "latest.pt", weights_only=False)["trainer"]["step"]
    assert stopped_at >= 3, err[-2000:]
    resumed = launch([*TORCHRUN, *argv, "--resume", f"--max_steps={stopped_at + 2}"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if "train/loss" in line]
    assert steps == list(range(1, stopped_at + 3))  # each step once, continuing where the stop saved


@pytest.mark.slow
def test_accelerate_launch_runs_the_same_training(tmp_path, cache_dir):
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    # accelerate's own --cpu flag runs a single process; --multi_gpu goes through torchrun, and on a machine
    # without GPUs our program then joins the processes over gloo on the CPU
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes=2",
                  f"--main_process_port={port}"]
    out = tmp_path / "out"
    result = launch([*accelerate, *training(out, cache_dir, "--max_steps=2", "--eval_interval=2", "--report_to=none")])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "x 2 processes" in result.stdout
    assert json.loads((out / "config.json").read_text())["world_size"] == 2


def test_resuming_with_another_number_of_processes_is_reported(tiny_cfg):
    cfg = tiny_cfg("--max_steps=1000")  # a fixed budget: the warm-up fits either way
    one, two = plan_for(cfg), plan_for(cfg, world=World(0, 0, 2))
    assert two.resume_changes({"config": one.flags(), "world_size": 1}) == {"world_size": [1, 2]}
    assert one.resume_changes({"config": one.flags()}) == {}  # checkpoints from before: one process
