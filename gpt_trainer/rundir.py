"""The run folder (--output_dir): one object names every file and folder a run writes, checks the folder before
anything is written, holds it for one run at a time, and keeps a config.json that tells the truth about every resumed
segment."""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from .errors import UsageError


@dataclass(frozen=True)
class RunFolder:
    path: Path

    # ---- what lives where ------------------------------------------------------------------------------------------
    @property
    def config_json(self) -> Path:
        return self.path / "config.json"

    @property
    def metrics_jsonl(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def latest(self) -> Path:
        return self.checkpoints / "latest.pt"

    @property
    def best(self) -> Path:
        return self.checkpoints / "best.pt"

    @property
    def logs(self) -> Path:
        """TensorBoard's folder: one sub-folder per run name."""
        return self.path / "logs"

    @property
    def samples(self) -> Path:
        return self.path / "samples.txt"

    @property
    def swanlog(self) -> Path:
        return self.path / "swanlog"

    @property
    def lock(self) -> Path:
        return self.path / ".lock"

    def tensorboard_run(self, run_name: str) -> Path:
        return self.logs / run_name

    # ---- before anything is written --------------------------------------------------------------------------------
    def check_writable(self, resuming: bool, overwrite: bool) -> None:
        """A folder that is a file, cannot be written, or already holds a run that is neither resumed nor overwritten
        is refused before anything changes."""
        out = self.path
        if out.exists() and not out.is_dir():
            raise UsageError(f"--output_dir {out} is a file, not a folder. Choose another --output_dir.")
        existing = out if out.exists() else next(p for p in out.parents if p.exists())
        try:  # a real probe: os.access says yes for root on read-only mounts and in /proc
            with tempfile.NamedTemporaryFile(dir=existing, prefix=".write-probe-"):
                pass
        except OSError as e:
            raise UsageError(f"--output_dir {out} cannot be written ({existing}: {e.strerror}). Fix its permissions "
                             f"or choose another --output_dir.") from None
        if self.latest.exists() and not resuming and not overwrite:
            raise UsageError(f"--output_dir {out} already holds a training run ({self.latest}). Pass --resume to "
                             f"continue it, --overwrite to replace it, or choose another --output_dir.")

    def hold(self):
        """Take the folder's lock for the life of this process (the OS drops it when the process dies, however it
        dies); a second run into the same folder stops at once, naming the first. Returns the open lock file: keep
        it."""
        self.path.mkdir(parents=True, exist_ok=True)
        lock = open(self.lock, "a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            lock.close()
            raise UsageError(f"--output_dir {self.path} is in use by a training run that is still going ({holder}). "
                             f"Wait for it to finish, stop it, or choose another --output_dir.") from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()}, started {datetime.now():%Y-%m-%d %H:%M:%S}\n")
        lock.flush()
        return lock

    # ---- config.json -----------------------------------------------------------------------------------------------
    def previous_config(self) -> dict:
        try:
            return json.loads(self.config_json.read_text())
        except (OSError, ValueError):
            return {}

    def write_config(self, description: dict, start_step: int, changes: dict) -> None:
        """config.json: what runs now, plus `segments`, one per start of this run with the step it started from and
        the flags that changed at that step."""
        segments = self.previous_config().get("segments", []) if start_step else []
        segments = [s for s in segments if s["from_step"] < start_step]  # segments after the checkpoint never counted
        segments.append({"from_step": start_step, "started": f"{datetime.now():%Y-%m-%d %H:%M:%S}",
                         "changed": changes})
        tmp = self.path / ".config.json.tmp"
        tmp.write_text(json.dumps({**description, "segments": segments}, indent=2, ensure_ascii=False))
        os.replace(tmp, self.config_json)
