"""The run folder (--output_dir): one object names every file and folder a run writes, checks the folder before
anything is written, holds it for one run at a time, and keeps a config.json that tells the truth about every resumed
segment.

A run folder is recognised by a marker file the program writes before anything else. A folder with other content and
no marker is never written to: it may be the user's own work (a config.json of theirs, a project folder given as
`--output_dir .`). --overwrite removes the program's own files, all of them, and nothing else."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO

from .errors import UsageError

MARKER = ".gpt-trainer-run"


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

    @property
    def wandb(self) -> Path:
        """wandb's own folder, when WANDB_DIR does not put it elsewhere."""
        return self.path / "wandb"

    @property
    def marker(self) -> Path:
        return self.path / MARKER

    def tensorboard_run(self, run_name: str) -> Path:
        return self.logs / run_name

    def own_entries(self) -> list[Path]:
        """Everything this program writes here (the lock aside, which the running process holds)."""
        return [self.config_json, self.metrics_jsonl, self.checkpoints, self.logs, self.samples, self.wandb,
                self.swanlog, self.path / ".config.json.tmp", self.path / ".metrics.jsonl.tmp"]

    def foreign_entries(self, ignore: tuple[Path, ...] = ()) -> list[str]:
        """The names of what the folder holds that this program did not write; empty for a run folder. Folders of
        versions before the marker are recognised by their config.json (with `segments`), or by holding checkpoints
        alone."""
        if not self.path.is_dir() or self.marker.exists():
            return []
        ours = {p.name for p in (*self.own_entries(), self.lock)}
        if "segments" not in self.previous_config():
            ours = {self.checkpoints.name, self.lock.name}
        ignored = [p.resolve() for p in ignore]
        return sorted(e.name for e in self.path.iterdir()
                      if e.name not in ours and not any(p.is_relative_to(e.resolve()) for p in ignored))

    # ---- before anything is written --------------------------------------------------------------------------------
    def check_writable(self, resuming: bool, overwrite: bool, ignore: tuple[Path, ...] = ()) -> None:
        """A folder that is a file, cannot be written, holds files this program did not write, or already holds a run
        that is neither resumed nor overwritten is refused before anything changes. `ignore`: paths inside the folder
        that are not foreign (a --cache_dir placed there)."""
        out = self.path
        check_writable_folder(out, "--output_dir")
        foreign = self.foreign_entries(ignore)
        if foreign:
            shown = ", ".join(foreign[:8]) + (f" and {len(foreign) - 8} more" if len(foreign) > 8 else "")
            raise UsageError(f"--output_dir {out} already holds files this program did not write ({shown}). A run "
                             f"writes config.json, metrics.jsonl, samples.txt, checkpoints/ and logs/ there and would "
                             f"replace yours, so it is left alone (--overwrite too replaces only a run's own files). "
                             f"Choose a new or empty --output_dir.")
        if self.latest.exists() and not resuming and not overwrite:
            raise UsageError(f"--output_dir {out} already holds a training run ({self.latest}). Pass --resume to "
                             f"continue it, --overwrite to replace it, or choose another --output_dir.")

    def mark(self) -> None:
        """Claim the folder as a run folder (the first file a run writes)."""
        if not self.marker.exists():
            created = f"{datetime.now():%Y-%m-%d %H:%M:%S}"
            self.marker.write_text(json.dumps({"written_by": "gpt-trainer", "created": created}) + "\n")

    def clear(self) -> list[str]:
        """--overwrite: remove every file and folder a run writes (TensorBoard runs, samples, trackers' folders
        included); the names removed."""
        removed = []
        for entry in self.own_entries():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            elif entry.exists() or entry.is_symlink():
                entry.unlink()
            else:
                continue
            removed.append(entry.name)
        return removed

    def hold(self):
        """Take the folder's lock for the life of this process (the OS drops it when the process dies, however it
        dies); a second run into the same folder stops at once, naming the first. Returns the open lock file: keep
        it."""
        self.path.mkdir(parents=True, exist_ok=True)
        lock = try_lock(self.lock)
        if lock is None:
            holder = self.lock.read_text().strip() or "another process"
            raise UsageError(f"--output_dir {self.path} is in use by a training run that is still going ({holder}). "
                             f"Wait for it to finish, stop it, or choose another --output_dir.")
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


def check_writable_folder(path: Path, flag: str) -> None:
    """A folder (existing or to be made) this program can write: not a file, not a broken or looping link, and
    writable (probed for real: os.access says yes for root on read-only mounts and in /proc)."""
    if path.is_symlink() and not path.exists():
        raise UsageError(f"{flag} {path} is a symbolic link that leads nowhere (its target is missing, or it points "
                         f"back to itself). Fix or remove the link, or choose another {flag}.")
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {path} is a file, not a folder. Choose another {flag}.")
    existing = path if path.exists() else next(p for p in path.absolute().parents if p.exists())
    if not existing.is_dir():
        raise UsageError(f"{flag} {path} cannot be made: {existing} is a file, not a folder. Choose another {flag}.")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".write-probe-"):
            pass
    except OSError as e:
        reason = e.strerror or errno.errorcode.get(e.errno, str(e))
        raise UsageError(f"{flag} {path} cannot be written ({existing}: {reason}). Fix its permissions or choose "
                         f"another {flag}.") from None


# ---- file locks (flock: released by the OS when the holder dies; across machines where the shared storage passes
# them on, as NFSv4 does, and Lustre mounted with flock) --------------------------------------------------------------
@contextlib.contextmanager
def held(path: Path):
    """An exclusive lock on a file for the block, waited for: processes preparing the same token cache, or sweep
    workers changing the same state file, take turns. It waits on the file, not on a process group, so an hour's
    wait trips no collective timeout."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield  # closing the file releases the lock


def try_lock(path: Path) -> IO | None:
    """An exclusive lock on a file, taken without waiting: the open file (closing it releases the lock), or None
    while another process holds it."""
    f = open(path, "a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    return f
