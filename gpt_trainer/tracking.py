"""Experiment tracking: the same metrics, under the same names and steps, to metrics.jsonl and every tracker asked
for (TensorBoard, wandb, SwanLab). Each tracker is a backend behind one small protocol, started from its own module;
adding a tracker is one new module and one line in BACKENDS. A `Tracker` with no backends logs nothing (library use,
tests, and every process but the main one)."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable, Protocol

from . import swanlab_backend, tensorboard_backend, wandb_backend
from .config import TrainConfig
from .distributed import launched_world
from .errors import notice


@dataclass
class RunInfo:
    """What a backend needs to start: the run's flags, name, full resolved config, and where a resumed run stood."""
    cfg: TrainConfig
    name: str
    hparams: dict
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


# --report_to names -> the function that starts that backend (None when it cannot start; it says why)
BACKENDS: dict[str, Callable[[RunInfo], Backend | None]] = {
    "tensorboard": tensorboard_backend.start,
    "wandb": wandb_backend.start,
    "swanlab": swanlab_backend.start,
}


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


def format_lr(lr: float) -> str:
    mantissa, exponent = f"{lr:e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def default_run_name(cfg: TrainConfig, corpus: str) -> str:
    stamp = datetime.now().strftime("%Y%m%d_%H%M%S")
    return f"{cfg.model_size}-{corpus}-lr{format_lr(cfg.learning_rate)}-bs{cfg.batch_size}-{stamp}"


class JsonlBackend:
    """metrics.jsonl in output_dir: every run keeps a plain record, readable without any tracker installed. It is
    strict JSON (a non-finite value is written as null) and, like TensorBoard, holds each step once: a resumed run
    first drops the rows after its checkpoint's step, and a run started afresh starts an empty record."""

    def __init__(self, path: Path, keep_through_step: int):
        self.path = path
        rows = path.read_text(encoding="utf-8").splitlines() if path.exists() and keep_through_step else []
        kept = [row for row in rows if (step := _step_of(row)) is not None and step <= keep_through_step]
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(row + "\n" for row in kept), encoding="utf-8")
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
    """What the trainer logs to: fans every call out to its backends."""

    def __init__(self, backends: list[Backend] = (), run_name: str = "", resumed: dict | None = None):
        self.backends, self.run_name = list(backends), run_name
        self.resumed = resumed or {}  # carried on, so a restart with fewer trackers does not forget a wandb id

    def log(self, metrics: dict, step: int) -> None:
        for backend in self.backends:
            backend.log(metrics, step)

    def log_samples(self, samples: dict[str, str], step: int) -> None:
        for backend in self.backends:
            backend.log_samples(samples, step)

    def close(self, summary: RunSummary) -> None:
        """Close every backend; `summary.final` (only for a completed run) also goes to TensorBoard's HParams table."""
        summary.final = {k: v for k, v in summary.final.items() if math.isfinite(v)}
        for backend in self.backends:
            backend.close(summary)
        self.backends = []

    def state_dict(self) -> dict:
        """What a resumed run needs to continue the same runs: the name, and each backend's own state (wandb: its
        id)."""
        state = {"wandb_id": None, "swanlab_id": None, **self.resumed, "run_name": self.run_name}
        for backend in self.backends:
            state.update(getattr(backend, "state_dict", dict)())
        return state


def start_tracking(cfg: TrainConfig, hparams: dict, run_name: str, resumed: dict | None = None,
                   start_step: int = 0) -> Tracker:
    """metrics.jsonl plus every backend --report_to asks for, on the main process only."""
    run = RunInfo(cfg, run_name, hparams, start_step, resumed or {})
    if not launched_world().is_main:
        return Tracker(run_name=run.name, resumed=resumed)
    backends = [JsonlBackend(Path(cfg.output_dir) / "metrics.jsonl", keep_through_step=start_step)]
    backends += [b for b in (BACKENDS[name](run) for name in cfg.trackers()) if b is not None]
    return Tracker(backends, run.name, resumed)
