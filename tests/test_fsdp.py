"""--parallel fsdp for real: two CPU processes on gloo under torchrun, against DDP and one process. The learning rate
is constant (no warm-up, --min_lr at the peak) so that a run resumed with a larger --max_steps continues the very
sequence an uninterrupted run trains."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.test_distributed import ENV, ROOT, TORCHRUN, launch, training

CONSTANT_LR = ("--learning_rate=1e-3", "--min_lr=1e-3", "--warmup_steps=0", "--eval_interval=10",
               "--save_interval=10")
TOLERANCE = 1e-5


def train_losses(out: Path) -> dict[int, float]:
    """step -> train/loss of every report in metrics.jsonl (a step logged twice would fail the caller's checks)."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["train/loss"] for row in rows if "train/loss" in row}


def train(out: Path, cache_dir: Path, *flags: str, processes: int = 2) -> subprocess.CompletedProcess:
    launcher = TORCHRUN if processes == 2 else [sys.executable]
    done = launch([*launcher, *training(out, cache_dir, *CONSTANT_LR, *flags)])
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


def largest_difference(a: dict[int, float], b: dict[int, float]) -> float:
    assert list(a) == list(b)
    largest = max(abs(a[step] - b[step]) for step in a)
    print(f"largest loss difference over {len(a)} steps: {largest:.3g}")
    return largest


@pytest.fixture(scope="module")
def ddp_30_steps(tmp_path_factory, cache_dir) -> dict[int, float]:
    """The reference: 30 uninterrupted DDP steps on two processes."""
    out = tmp_path_factory.mktemp("ddp30")
    train(out, cache_dir, "--max_steps=30", "--parallel=ddp")
    return train_losses(out)


@pytest.mark.slow
@pytest.mark.parametrize("accumulation", [1, 2])
def test_fsdp_trains_the_same_losses_as_ddp(tmp_path, cache_dir, ddp_30_steps, accumulation):
    steps = ("--max_steps=20", f"--gradient_accumulation_steps={accumulation}")
    if accumulation == 1:
        ddp = {step: loss for step, loss in ddp_30_steps.items() if step <= 20}  # constant rate: the same 20 steps
    else:
        train(tmp_path / "ddp", cache_dir, *steps, "--parallel=ddp")
        ddp = train_losses(tmp_path / "ddp")
    fsdp = train(tmp_path / "fsdp", cache_dir, *steps, "--parallel=fsdp")
    assert "x 2 processes" in fsdp.stdout
    assert list(ddp) == list(range(1, 21))
    assert largest_difference(train_losses(tmp_path / "fsdp"), ddp) <= TOLERANCE


@pytest.mark.slow
def test_fsdp_with_activation_checkpointing_trains_the_same_losses_as_ddp(tmp_path, cache_dir, ddp_30_steps):
    """Each sharded block recomputed in backward: the same math, so the same losses."""
    ddp = {step: loss for step, loss in ddp_30_steps.items() if step <= 20}
    train(tmp_path / "fsdp-ac", cache_dir, "--max_steps=20", "--parallel=fsdp", "--activation_checkpointing")
    assert largest_difference(train_losses(tmp_path / "fsdp-ac"), ddp) <= TOLERANCE


@pytest.mark.slow
def test_resume_moves_from_fsdp_to_ddp_to_one_process_without_a_seam(tmp_path, cache_dir, ddp_30_steps):
    out = tmp_path / "out"
    train(out, cache_dir, "--max_steps=10", "--parallel=fsdp")
    train(out, cache_dir, "--max_steps=20", "--parallel=ddp", "--resume")
    # one process: two accumulated micro-batches of 4 are the two processes' global batch of 8
    train(out, cache_dir, "--max_steps=30", "--gradient_accumulation_steps=2", "--resume", processes=1)
    # and back: a one-process checkpoint resumed under FSDP
    train(out, cache_dir, "--max_steps=32", "--parallel=fsdp", "--resume")
    losses = train_losses(out)
    assert list(losses) == list(range(1, 33))
    assert largest_difference({step: losses[step] for step in range(1, 31)}, ddp_30_steps) <= TOLERANCE
    saved = torch.load(out / "checkpoints" / "latest.pt", weights_only=True)
    assert saved["trainer"]["step"] == 32 and all(isinstance(i, int) for i in saved["optimizer"]["state"])


BYTES_SCRIPT = """
import json, sys
sys.path.insert(0, sys.argv[1])
import torch
from gpt_trainer.system import distributed
from gpt_trainer.config import parse_args
from gpt_trainer.data.tokens import prepare_data
from gpt_trainer.train.trainer import Trainer
from tests.conftest import plan_for

def local_bytes(tensors):
    return sum((t.to_local() if hasattr(t, "to_local") else t).nbytes for t in tensors)

world = distributed.launched_world()
distributed.start(world, torch.device("cpu"), 60.0)
held = {}
for parallel in ("ddp", "fsdp"):
    cfg = parse_args([*sys.argv[2:], f"--parallel={parallel}"])
    trainer = Trainer(plan_for(cfg, world=world), prepare_data(cfg))  # built as the training command builds it
    trainer.train_step()  # AdamW makes its state at the first step
    params = list(trainer.model.parameters())
    held[parallel] = {"parameters": local_bytes(params),
                      "optimizer": local_bytes(t for s in trainer.optimizer.state.values() for t in s.values()
                                               if t.dim() > 0),  # the moments, not the step counters
                      "whole model": sum(p.numel() * p.element_size() for p in params)}
print("HELD", world.rank, json.dumps(held), flush=True)
distributed.stop(world, True)
"""


@pytest.mark.slow
def test_each_fsdp_process_holds_half_of_the_parameters_and_optimizer_state(tmp_path, cache_dir):
    script = tmp_path / "held.py"
    script.write_text(BYTES_SCRIPT)
    argv = training(tmp_path / "out", cache_dir)[1:]  # the flags without the program
    done = launch([*TORCHRUN, str(script), str(ROOT), *argv])
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    held = {int(line.split()[1]): json.loads(line.split(maxsplit=2)[2]) for line in done.stdout.splitlines()
            if line.startswith("HELD ")}
    assert sorted(held) == [0, 1]
    whole = held[0]["ddp"]["whole model"]
    slack = 0.01 * whole  # dim-0 slices of rows that do not split evenly
    for rank in (0, 1):
        ddp, fsdp = held[rank]["ddp"], held[rank]["fsdp"]
        assert ddp["parameters"] == whole and ddp["optimizer"] == 2 * whole  # AdamW: two moments per weight
        assert fsdp["parameters"] <= 0.5 * ddp["parameters"] + slack
        assert fsdp["optimizer"] <= 0.5 * ddp["optimizer"] + 2 * slack
    assert held[0]["fsdp"]["parameters"] + held[1]["fsdp"]["parameters"] == whole  # every weight held once
    print(f"bytes per process: DDP {held[0]['ddp']}, FSDP rank 0 {held[0]['fsdp']}, rank 1 {held[1]['fsdp']}")


def worker_pids(launcher: int) -> list[int]:
    """torchrun's worker processes: its children (they run in sessions of their own)."""
    return [int(pid) for task in Path(f"/proc/{launcher}/task").iterdir()
            for pid in (task / "children").read_text().split()]


@pytest.mark.slow
def test_a_kill_9_under_fsdp_resumes_with_each_step_once(tmp_path, cache_dir):
    out = tmp_path / "out"
    argv = [*TORCHRUN, *training(out, cache_dir, *CONSTANT_LR, "--max_steps=40", "--save_interval=3",
                                 "--eval_interval=5", "--parallel=fsdp")]
    proc = subprocess.Popen(argv, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while len(train_losses(out) if (out / "metrics.jsonl").exists() else {}) < 12:
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    for pid in worker_pids(proc.pid):  # the whole job dies at once, as on a lost node: no handler runs
        os.kill(pid, signal.SIGKILL)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    killed_at = len(train_losses(out))
    assert killed_at < 40
    launch_resume = launch([*argv, "--resume"])
    assert launch_resume.returncode == 0, launch_resume.stderr[-3000:]
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if "train/loss" in line]
    assert steps == list(range(1, 41))  # each step once, across the kill
    assert torch.load(out / "checkpoints" / "latest.pt", weights_only=True)["trainer"]["step"] == 40
    assert not list((out / "checkpoints").glob(".*.tmp-*"))


def test_fsdp_with_fp16_is_refused_before_anything_is_written(tiny_argv, tmp_path, monkeypatch, capsys):
    """fp16 exists only on GPUs; a GPU that resolves --precision to fp16 and a world of two processes are stood in for
    here (no GPU): the run stops with exit 2 before joining the processes or writing a file."""
    from gpt_trainer.commands import train as cli
    from gpt_trainer.system import distributed

    monkeypatch.setattr(cli, "resolve_precision", lambda cfg, device: "fp16")
    monkeypatch.setattr(distributed, "launched_world", lambda: distributed.World(rank=0, local_rank=0, size=2))
    monkeypatch.setattr(distributed, "start", lambda *a: pytest.fail("joined the process group before refusing"))
    assert cli.main(tiny_argv("--parallel=fsdp")) == 2
    assert ("--parallel fsdp trains in bf16 or fp32; fp16 needs a gradient scaler that does not handle sharded "
            "gradients. Pass --bf16 or --fp32, or use --parallel ddp.") in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
