"""Shared helpers: a very small model shape and a private cache, so every test runs in seconds on a CPU."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gpt_trainer.config import TrainConfig, parse_args
from gpt_trainer.data.tokens import prepare_data
from gpt_trainer.plan.run_plan import RunPlan, make_plan
from gpt_trainer.system.distributed import World
from gpt_trainer.system.hardware import resolve_precision
from gpt_trainer.system.rundir import RunFolder
from gpt_trainer.train.trainer import Trainer

POEMS = ("静夜思\n床前明月光，疑是地上霜。举头望明月，低头思故乡。\n\n"
         "春晓\n春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。\n\n") * 8
# the tests' own small corpus (about 80 classic poems): the embedded one is sized for the demo, not for tests
CLASSIC_POEMS = Path(__file__).parent / "fixtures" / "classic_poems.txt"
TINY_SHAPE = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=16", "--batch_size=4", "--dropout=0.0",
              "--eval_steps=2", "--fp32", "--device=cpu", "--sample_tokens=8", "--report_to=none"]

GPT2_ADAMW = ("--arch=gpt2", "--optimizer=adamw")  # the recipe of runs before llama + muon became the default


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` run only where PyTorch sees a CUDA or ROCm GPU."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA or ROCm GPU; none is visible")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def tiny_argv(tmp_path, cache_dir):
    """argv for a tiny run on the classic poems; extra flags are appended (later flags win in argparse)."""
    def make(*extra: str) -> list[str]:
        own_source = any(e.startswith(("--data_path", "--corpus")) for e in extra)
        source = [] if own_source else [f"--data_path={CLASSIC_POEMS}"]
        return [*source, f"--cache_dir={cache_dir}", f"--output_dir={tmp_path / 'out'}", *TINY_SHAPE, *extra]
    return make


@pytest.fixture
def tiny_cfg(tiny_argv):
    def make(*extra: str):
        return parse_args(tiny_argv(*extra))
    return make


@pytest.fixture
def clean_wandb_env(monkeypatch, tmp_path):
    """No credentials or modes (wandb's or SwanLab's) leak in from the machine running the tests."""
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DIR", "WANDB_BASE_URL", "NETRC", "WANDB_PROJECT",
                 "WANDB_ENTITY", *(name for name in os.environ if name.startswith("SWANLAB_"))):
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(home / ".config" / "wandb"))
    monkeypatch.setenv("WANDB_SILENT", "true")


@pytest.fixture
def poems_argv(tmp_path, cache_dir):
    """argv for a tiny run on a few poems with every tracker and a report at each step."""
    corpus = tmp_path / "poems.txt"
    corpus.write_text(POEMS, encoding="utf-8")
    base = [f"--data_path={corpus}", f"--cache_dir={cache_dir}", f"--output_dir={tmp_path / 'out'}", *TINY_SHAPE]
    return lambda *extra: [*base, "--report_to=all", "--log_interval=1", *extra]


def plan_for(cfg: TrainConfig, device: str = "cpu", world: World = World()) -> RunPlan:
    """The run plan the training command would make for `cfg` (a fresh run), with its token data prepared."""
    device = torch.device(device)
    folder = RunFolder(Path(cfg.output_dir))
    return make_plan(cfg, world, device, resolve_precision(cfg, device), prepare_data(cfg), folder)


def make_trainer(cfg: TrainConfig, tracker=None, device: str = "cpu") -> Trainer:
    """A Trainer built as the training command builds it: token data, then the run plan."""
    return Trainer(plan_for(cfg, device), prepare_data(cfg), tracker)


def scalars(logdir: Path) -> dict:
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {tag: [e.step for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}, acc


def files_containing(root: Path, needle: str) -> list:
    return [p for p in root.rglob("*") if p.is_file() and needle.encode() in p.read_bytes()]


def script_env(**changes) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") or k in changes}
    env.update({"WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1", **changes})
    return env


def interrupt_after_lines(cmd: list[str], watched: Path, lines: int, sig: int = signal.SIGTERM, group: bool = False,
                          timeout: float = 90, **popen_kwargs) -> tuple[int, str]:
    """Start cmd, wait until `watched` has `lines` lines, send `sig` (SIGTERM is what `docker stop` sends; with
    group=True to the whole process group, as Ctrl-C in a terminal does); returns (exit code, stderr)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=group,
                            **popen_kwargs)
    deadline = time.time() + timeout
    while time.time() < deadline and (not watched.exists() or len(watched.read_text().splitlines()) < lines):
        time.sleep(0.1)
    if group:
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err
