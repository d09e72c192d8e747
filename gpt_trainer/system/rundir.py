"""The run folder (--output_dir): one object names every file and folder a run writes, checks the folder before
anything is written, holds it for one run at a time, and keeps a config.json that tells the truth about every resumed
segment.

A run folder is recognised by a marker file the program writes before anything else. A folder with other content and
no marker is never written to: it may be the user's own work (a config.json of theirs, a project folder given as
`--output_dir .`). --overwrite removes the files runs wrote, each known by name (the marker records the TensorBoard
run names), and nothing else: a checkpoint the user copied into checkpoints/ or notes in logs/ stay."""

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

from ..errors import UsageError

MARKER = ".gpt-trainer-run"
TENSORBOARD_EVENTS = "events.out.tfevents.*"  # the only files TensorBoard's writer makes in a run's logs folder
PROBE_PREFIX = ".write-probe-"  # check_writable_folder's probe: another process starting beside us may show one
# a sharded checkpoint (--parallel fsdp) is a folder: its manifest, the run's state, and each process's tensors
SHARDED_FILES = ("manifest.json", "state.json", "shard-*.safetensors")


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

    def checkpoint_kinds(self, name: str) -> list[Path]:
        """Where the `name` checkpoint ("latest" or "best") may be: the .pt file of a run in one process or under DDP,
        the folder of an FSDP run's shards, and such a folder set aside by a save that was replacing it."""
        return [self.checkpoints / f"{name}.pt", self.checkpoints / name, self.checkpoints / f".{name}.previous"]

    def staging(self, name: str, step: int) -> Path:
        """The folder a sharded save of the `name` checkpoint at `step` writes into before it is renamed into place."""
        return self.checkpoints / f".{name}.tmp-{step}"

    def staging_folders(self, name: str) -> list[Path]:
        """The staging folders of sharded saves of the `name` checkpoint that a kill interrupted."""
        return [path for path in sorted(self.checkpoints.glob(f".{name}.tmp-*"))  # staging(name, any step)
                if path.is_dir() and not path.is_symlink()]

    def sharded_folders(self) -> list[Path]:
        """The folders of sharded checkpoints here: complete, set aside, or the staging folders of saves a kill
        interrupted."""
        named = [path for name in ("latest", "best") for path in self.checkpoint_kinds(name)[1:]
                 if path.is_dir() and not path.is_symlink()]
        return [*named, *(path for name in ("latest", "best") for path in self.staging_folders(name))]

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

    def run_files(self) -> list[Path]:
        """Every file runs write here, by name: config.json, metrics.jsonl, samples.txt and their temporaries, the
        two checkpoints (the files of sharded ones too) and the temporaries of saves a kill interrupted, and the
        TensorBoard event files of each run name the folder recorded."""
        temporaries = [self.path / ".config.json.tmp", self.path / ".metrics.jsonl.tmp", self.path / f"{MARKER}.tmp"]
        saves = [tmp for path in (self.latest, self.best)
                 for tmp in sorted(self.checkpoints.glob(f".{path.name}.tmp-*"))]
        shards = [file for folder in self.sharded_folders() for pattern in SHARDED_FILES
                  for file in sorted(folder.glob(pattern))]
        events = [event for name in self.run_names()
                  for event in sorted(self.tensorboard_run(name).glob(TENSORBOARD_EVENTS))]
        return [self.config_json, self.metrics_jsonl, self.samples, *temporaries, self.latest, self.best, *saves,
                *shards, *events]

    def run_names(self) -> list[str]:
        """The TensorBoard run names runs in this folder used: those the marker recorded, and config.json's (a
        folder of a version before they were recorded). Only plain names: a hand-edited marker cannot point
        elsewhere."""
        names = [*self.marker_record().get("run_names", []), self.previous_config().get("run_name")]
        return list(dict.fromkeys(n for n in names if isinstance(n, str) and n not in ("", ".", "..")
                                  and Path(n).name == n))

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
        held = [path for path in self.checkpoint_kinds("latest") if path.exists()]
        if held and not resuming and not overwrite:
            raise UsageError(f"--output_dir {out} already holds a training run ({held[0]}). Pass --resume to "
                             f"continue it, --overwrite to replace it, or choose another --output_dir.")

    def mark(self) -> None:
        """Claim the folder as a run folder (the first file a run writes)."""
        if not self.marker.exists():
            self.write_marker({"written_by": "gpt-trainer", "created": f"{datetime.now():%Y-%m-%d %H:%M:%S}"})

    def marker_record(self) -> dict:
        try:
            record = json.loads(self.marker.read_text())
        except (OSError, ValueError):
            return {}
        return record if isinstance(record, dict) else {}

    def write_marker(self, record: dict) -> None:
        tmp = self.path / f"{MARKER}.tmp"
        tmp.write_text(json.dumps(record) + "\n")
        os.replace(tmp, self.marker)

    def record_run_name(self, name: str) -> None:
        """Note the run name in the marker: its TensorBoard folder is then known to --overwrite, whatever later
        config.json files say."""
        record = self.marker_record()
        names = record.get("run_names", [])
        if name not in names:
            self.write_marker({**record, "run_names": [*names, name]})

    def clear(self) -> tuple[list[str], list[str]]:
        """--overwrite: remove the files runs wrote (`run_files`) and the trackers' own folders, wandb/ and swanlog/,
        then the folders this leaves empty; nothing else. Returns what was removed and what was kept (the marker and
        the lock aside), as paths relative to the folder."""
        tensorboard_runs = [self.tensorboard_run(name) for name in self.run_names()]  # before config.json goes
        sharded = self.sharded_folders()
        files = [path for path in self.run_files() if path.is_file() or path.is_symlink()]
        for path in files:
            path.unlink()
        removed = self.shown(files)
        for folder in (self.wandb, self.swanlog):
            if folder.is_symlink():
                folder.unlink()
            elif folder.is_dir():
                shutil.rmtree(folder)
            else:
                continue
            removed.append(f"{folder.name}/")
        for folder in (*tensorboard_runs, *sharded, self.logs, self.checkpoints):
            with contextlib.suppress(OSError):  # a folder that is not empty holds something of the user's: it stays
                folder.rmdir()
        if self.marker.exists():
            self.write_marker({**self.marker_record(), "run_names": []})
        return removed, self.shown(self.kept_entries())

    def kept_entries(self) -> list[Path]:
        """What is left beside the run's files: entries of the folder and files inside checkpoints/ and logs/."""
        folders = [f for f in (self.checkpoints, self.logs) if f.is_dir() and not f.is_symlink()]
        beside = [p for p in sorted(self.path.iterdir()) if p.name not in (MARKER, self.lock.name) and p not in folders]
        inside = [p for folder in folders for p in sorted(folder.rglob("*")) if not p.is_dir() or p.is_symlink()]
        return [*beside, *inside]

    def shown(self, paths: list[Path]) -> list[str]:
        """Paths as the user reads them in a notice: relative to the folder, a folder with a trailing /, and the
        TensorBoard event files of one run counted, not listed."""
        names, events = [], {}
        for path in paths:
            if path.match(TENSORBOARD_EVENTS):
                events[path.parent] = events.get(path.parent, 0) + 1
                continue
            folder = "/" if path.is_dir() and not path.is_symlink() else ""
            names.append(f"{path.relative_to(self.path)}{folder}")
        return names + [f"{folder.relative_to(self.path)}/ ({count} TensorBoard event file{'s' * (count > 1)})"
                        for folder, count in events.items()]

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
        if description.get("run_name"):
            self.record_run_name(description["run_name"])


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
        with tempfile.NamedTemporaryFile(dir=existing, prefix=PROBE_PREFIX):
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
