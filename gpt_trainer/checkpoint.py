"""Checkpoints: everything needed to continue a run exactly (weights, optimizer, schedule, scaler, data position,
RNG states, config, tokenizer), written atomically so a crash mid-write never leaves a broken file."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from .config import TrainConfig, UsageError

SHAPE_FIELDS = ("n_layer", "n_head", "n_embd", "block_size", "tokenizer")


def checkpoint_dir(output_dir: str) -> Path:
    return Path(output_dir) / "checkpoints"


def latest_path(output_dir: str) -> Path:
    return checkpoint_dir(output_dir) / "latest.pt"


def best_path(output_dir: str) -> Path:
    return checkpoint_dir(output_dir) / "best.pt"


def save_atomic(state: dict, path: Path) -> None:
    """Write to a temporary file in the same folder, flush it to disk, then rename over the old file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load(path: Path, device: torch.device | str = "cpu") -> dict:
    try:
        # our own file: it holds numpy/python RNG states, which the weights-only loader refuses
        return torch.load(path, map_location=device, weights_only=False)
    except Exception as e:  # a truncated or foreign file
        raise UsageError(f"{path} is not a readable checkpoint ({type(e).__name__}: {e}).") from None


def rng_states() -> dict:
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def find_resume_checkpoint(cfg: TrainConfig) -> Path | None:
    """--resume: the latest checkpoint of output_dir (None if there is none yet), or an explicit file or run folder."""
    if cfg.resume is None:
        return None
    if cfg.resume == "latest":
        path = latest_path(cfg.output_dir)
        return path if path.exists() else None
    path = Path(cfg.resume).expanduser()
    if path.is_dir():
        path = latest_path(str(path)) if latest_path(str(path)).exists() else path / "latest.pt"
    if not path.is_file():
        raise UsageError(f"--resume {cfg.resume}: no checkpoint there. Give a .pt file, a run's output_dir, or plain --resume.")
    return path


def check_same_shape(saved: dict, cfg: TrainConfig, tokenizer, path: Path) -> None:
    """A checkpoint only fits a model of the same shape and vocabulary; say exactly what differs."""
    current = {**{k: getattr(cfg, k) for k in SHAPE_FIELDS}, "vocabulary size": tokenizer.vocab_size}
    before = {**{k: saved["config"].get(k) for k in SHAPE_FIELDS}, "vocabulary size": saved["vocab_size"]}
    diffs = [f"{k}: checkpoint {before[k]!r}, now {current[k]!r}" for k in current if before[k] != current[k]]
    if not diffs and saved["tokenizer"] != tokenizer.to_dict():
        diffs = ["vocabulary: same size, different tokens (another corpus?)"]
    if diffs:
        raise UsageError(
            f"cannot resume from {path}: the model shape differs ({'; '.join(diffs)}). Pass the same --model_size, "
            f"overrides and data as the original run (see its config.json), or train into a new --output_dir."
        )
