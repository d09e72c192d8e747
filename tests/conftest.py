"""Shared helpers: a very small model shape and a private cache, so every test runs in seconds on a CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gpt_trainer.config import parse_args

SHARED_SONG_CI = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "song_ci.txt"

TINY_SHAPE = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=16", "--batch_size=4", "--dropout=0.0",
              "--eval_steps=2", "--fp32", "--device=cpu", "--sample_tokens=8", "--report_to=none"]


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
    """argv for a tiny run on the embedded corpus; extra flags are appended (later flags win in argparse)."""
    def make(*extra: str) -> list[str]:
        source = [] if any(e.startswith(("--data_path", "--corpus")) for e in extra) else ["--corpus=builtin"]
        return [*source, f"--cache_dir={cache_dir}", f"--output_dir={tmp_path / 'out'}", *TINY_SHAPE, *extra]
    return make


@pytest.fixture
def tiny_cfg(tiny_argv):
    def make(*extra: str):
        return parse_args(tiny_argv(*extra))
    return make
