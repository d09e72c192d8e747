"""The run folder (output_dir): checked before anything is written, held by one run at a time, cleared of what killed
runs left behind, and a config.json that tells the truth about every resumed segment."""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
from datetime import datetime
from pathlib import Path

from . import checkpoint
from .config import TrainConfig
from .errors import UsageError, notice

LOCK_FILE = ".lock"
# flags that change the optimisation: on --resume, a changed value takes effect from the resumed step
OPTIMISATION_FLAGS = ("learning_rate", "min_lr", "warmup_steps", "weight_decay", "grad_clip", "batch_size",
                      "gradient_accumulation_steps", "max_steps", "epochs", "dropout", "max_bad_steps")


def check_writable(cfg: TrainConfig) -> None:
    out = Path(cfg.output_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output_dir {out} is a file, not a folder. Choose another --output_dir.")
    existing = out if out.exists() else next(p for p in out.parents if p.exists())
    try:  # a real probe: os.access says yes for root on read-only mounts and in /proc
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".write-probe-"):
            pass
    except OSError as e:
        raise UsageError(f"--output_dir {out} cannot be written ({existing}: {e.strerror}). Fix its permissions or "
                         f"choose another --output_dir.") from None
    latest = checkpoint.latest_path(str(out))
    if latest.exists() and cfg.resume is None and not cfg.overwrite:
        raise UsageError(f"--output_dir {out} already holds a training run ({latest}). Pass --resume to continue it, "
                         f"--overwrite to replace it, or choose another --output_dir.")


def hold(out: Path):
    """Take the folder's lock for the life of this process (the OS drops it when the process dies, however it dies);
    a second run into the same folder stops at once, naming the first. Returns the open lock file: keep it."""
    out.mkdir(parents=True, exist_ok=True)
    lock = open(out / LOCK_FILE, "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "another process"
        lock.close()
        raise UsageError(f"--output_dir {out} is in use by a training run that is still going ({holder}). Wait for it "
                         f"to finish, stop it, or choose another --output_dir.") from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"pid {os.getpid()}, started {datetime.now():%Y-%m-%d %H:%M:%S}\n")
    lock.flush()
    return lock


def remove_leftovers(out: Path) -> None:
    """Temporary checkpoint files of saves that a kill interrupted (the lock says no other run is writing)."""
    for stray in checkpoint.checkpoint_dir(str(out)).glob(".*.pt.tmp-*"):
        stray.unlink(missing_ok=True)
        notice(f"note: removed {stray.name}, left by a save that was interrupted")


def previous_config(out: Path) -> dict:
    try:
        return json.loads((out / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def resume_changes(saved: dict, cfg: TrainConfig, world_size: int) -> dict:
    """What differs from the checkpoint among the optimisation flags and the number of processes: {name: [before,
    now]}."""
    before = {**saved["config"], "world_size": saved.get("world_size", 1)}
    now = {**cfg.to_dict(), "world_size": world_size}
    return {name: [before[name], now[name]] for name in (*OPTIMISATION_FLAGS, "world_size")
            if name in before and before[name] != now[name]}


def write_config(out: Path, resolved: dict, start_step: int, changes: dict) -> None:
    """config.json: what runs now, plus `segments`, one per start of this run with the step it started from and the
    flags that changed at that step."""
    segments = previous_config(out).get("segments", []) if start_step else []
    segments = [s for s in segments if s["from_step"] < start_step]  # segments after the checkpoint never counted
    segments.append({"from_step": start_step, "started": f"{datetime.now():%Y-%m-%d %H:%M:%S}", "changed": changes})
    tmp = out / ".config.json.tmp"
    tmp.write_text(json.dumps({**resolved, "segments": segments}, indent=2, ensure_ascii=False))
    os.replace(tmp, out / "config.json")
