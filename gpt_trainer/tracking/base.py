"""What every tracker shares: the facts a backend starts from (`RunInfo`), how a run ended (`RunSummary`), the small
protocol each backend implements, metrics.jsonl (the record every run keeps), the `Tracker` that fans each call out to
its backends, and the start-up rules wandb and SwanLab both follow. A `Tracker` with no backends logs nothing (library
use, tests, and every process but the main one)."""

from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

from ..config import TrainConfig
from ..errors import notice
from ..system.rundir import RunFolder


@dataclass(frozen=True)
class RunInfo:
    """What a backend needs to start: the flags (each tracker reads its own), the run folder, the run's name, its
    description (the run plan's, logged as hyper-parameters), its tags, and where a resumed run stood."""
    cfg: TrainConfig
    folder: RunFolder
    name: str
    hparams: dict
    tags: list[str] = field(default_factory=list)
    start_step: int = 0
    resumed: dict = field(default_factory=dict)  # the tracker state saved in the checkpoint being resumed


@dataclass
class RunSummary:
    """How the run ended: final metrics (empty unless it completed), the last step, checkpoints and exit code."""
    final: dict = field(default_factory=dict)
    step: int = 0
    checkpoints: list[Path] = field(default_factory=list)
    exit_code: int = 0


class Backend(Protocol):
    def log(self, metrics: dict, step: int) -> None: ...

    def log_samples(self, samples: dict[str, str], step: int) -> None: ...

    def close(self, summary: RunSummary) -> None: ...


def drop_empty_settings(prefix: str) -> None:
    """docker compose passes unset settings as empty strings, which wandb and SwanLab reject: remove them."""
    for name in [name for name, value in os.environ.items() if name.startswith(prefix) and value == ""]:
        del os.environ[name]


def start_in_first_mode(tracker: str, modes: list[str], start: Callable[[str], Backend]) -> Backend | None:
    """`start(mode)` for each mode in turn (online, then offline) until one works; None, said in one line, when none
    does: an unreachable server, a rejected key or an unwritable folder never stops training."""
    for mode in modes:
        try:
            return start(mode)
        except Exception as e:  # noqa: BLE001 - whatever the tracker raises, training goes on
            reason = f"{type(e).__name__}: {str(e)[:160]}"
            if mode != modes[-1]:
                notice(f"{tracker}: could not start {mode} ({reason}); logging offline instead.")
            else:
                notice(f"{tracker}: could not start ({reason}); continuing without {tracker} (metrics.jsonl and the "
                       f"other trackers still record everything).")
    return None


class JsonlBackend:
    """metrics.jsonl in the run folder: every run keeps a plain record, readable without any tracker installed. It is
    strict JSON (a non-finite value is written as null) and, like TensorBoard, holds each step once: a resumed run
    first drops the rows after its checkpoint's step, and a run started afresh starts an empty record."""

    name = "metrics.jsonl"

    def __init__(self, path: Path, keep_through_step: int):
        self.path = path
        # bytes that are not UTF-8 (a damaged disk block, an edit) are carried over as they were, not decoded
        rows = path.read_text("utf-8", "surrogateescape").splitlines() if path.exists() and keep_through_step else []
        kept = [row for row in rows if (step := _step_of(row)) is not None and step <= keep_through_step]
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(row + "\n" for row in kept), "utf-8", "surrogateescape")
        os.replace(tmp, path)

    def log(self, metrics: dict, step: int) -> None:
        row = {k: v if not isinstance(v, float) or math.isfinite(v) else None for k, v in metrics.items()}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, **row}, allow_nan=False) + "\n")

    def log_samples(self, samples: dict[str, str], step: int) -> None:
        pass

    def close(self, summary: RunSummary) -> None:
        if summary.final:
            self.log(summary.final, summary.step)


def _step_of(row: str) -> int | None:
    """The step of a metrics.jsonl row; None for a line a kill cut short."""
    try:
        return json.loads(row)["step"]
    except (ValueError, KeyError, TypeError):
        return None


class Tracker:
    """What the trainer logs to: fans every call out to its backends. A backend that fails (a full disk under
    TensorBoard's files, a tracker's bug) costs that backend, said once, never the run: the checkpoints and the other
    backends go on."""

    def __init__(self, backends: list[Backend] = (), run_name: str = "", resumed: dict | None = None):
        self.backends, self.run_name = list(backends), run_name
        self.resumed = resumed or {}  # carried on, so a restart with fewer trackers does not forget a wandb id

    def each(self, action: str, call: Callable[[Backend], None]) -> None:
        for backend in list(self.backends):
            try:
                call(backend)
            except Exception as e:  # noqa: BLE001 - whatever a tracker raises, training goes on
                self.backends.remove(backend)
                self.keep_state_of(backend)
                name = getattr(backend, "name", type(backend).__name__)
                notice(f"{name}: {action} failed ({type(e).__name__}: {str(e)[:160]}); {name} is off for the rest "
                       f"of this run (the checkpoints and the other trackers go on).")

    def keep_state_of(self, backend: Backend) -> None:
        """A dropped backend's run id stays in the checkpoint, so the resumed run continues that run (a wandb process
        that Slurm's SIGTERM killed costs this segment its wandb, not the run its history)."""
        with contextlib.suppress(Exception):  # a broken backend may fail to say its state too: keep what there was
            self.resumed.update(getattr(backend, "state_dict", dict)())

    def log(self, metrics: dict, step: int) -> None:
        self.each("logging", lambda backend: backend.log(metrics, step))

    def log_samples(self, samples: dict[str, str], step: int) -> None:
        self.each("logging samples", lambda backend: backend.log_samples(samples, step))

    def close(self, summary: RunSummary) -> None:
        """Close every backend; `summary.final` (only for a completed run) also goes to TensorBoard's HParams table."""
        summary.final = {k: v for k, v in summary.final.items() if math.isfinite(v)}
        self.each("closing", lambda backend: backend.close(summary))
        self.backends = []

    def state_dict(self) -> dict:
        """What a resumed run needs to continue the same runs: the name, and each backend's own state (wandb and
        SwanLab: their run ids)."""
        state = {"wandb_id": None, "swanlab_id": None, **self.resumed, "run_name": self.run_name}
        for backend in self.backends:
            state.update(getattr(backend, "state_dict", dict)())
        return state

    def load_state_dict(self, state: dict) -> None:
        """The saved state of the runs this one continues (the backends were already started from it: they must
        reopen the same runs before anything is logged); kept so that a backend not started now keeps its id."""
        self.run_name = state.get("run_name") or self.run_name
        self.resumed = {key: value for key, value in state.items() if key != "run_name"}
