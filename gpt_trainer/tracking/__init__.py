"""Experiment tracking: the same metrics, under the same names and steps, to metrics.jsonl and every tracker asked
for (TensorBoard, wandb, SwanLab). Each tracker is one module here with a `start(RunInfo)` (and, where it has inputs to
refuse before the run, a `check(TrainConfig)`); BACKENDS below is the one registry of the names --report_to knows."""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING

from ..config import TrainConfig
from ..errors import UsageError
from . import swanlab, tensorboard, wandb
from .base import JsonlBackend, RunInfo, RunSummary, Tracker

if TYPE_CHECKING:  # only a type here: `doctor` imports the trackers' key lookups where torch may be missing
    from ..plan.run_plan import RunPlan

__all__ = ["BACKENDS", "RunSummary", "Tracker", "check", "chosen", "start_tracking"]

BACKENDS: dict[str, ModuleType] = {"tensorboard": tensorboard, "wandb": wandb, "swanlab": swanlab}
ALL = ("tensorboard", "wandb")  # what --report_to all means


def chosen(report_to: str) -> list[str]:
    """--report_to as a list of tracker names: `tensorboard,swanlab`, or all (= tensorboard,wandb), or none."""
    names = [name.strip().lower() for name in report_to.split(",") if name.strip()]
    if names in (["all"], ["none"]):
        return list(ALL) if names == ["all"] else []
    unknown = [name for name in names if name not in BACKENDS]
    if unknown or not names:
        raise UsageError(f"--report_to {report_to!r} is not a list of trackers ({', '.join(map(repr, unknown))}). "
                         f"Give a comma-separated list of {', '.join(BACKENDS)}, or all (= {','.join(ALL)}), or "
                         f"none; all and none stand alone.")
    return list(dict.fromkeys(names))


def check(cfg: TrainConfig) -> None:
    """Refuse, before anything is written, tracker settings that could only fail once the run has started."""
    for name in chosen(cfg.report_to):
        if hasattr(BACKENDS[name], "check"):
            BACKENDS[name].check(cfg)


def start_tracking(plan: RunPlan, resumed: dict | None = None) -> Tracker:
    """metrics.jsonl plus every backend --report_to asks for, on the main process only (the others log nothing)."""
    resumed = resumed or {}
    if not plan.world.is_main:
        return Tracker(run_name=plan.run_name, resumed=resumed)
    run = RunInfo(plan.cfg, plan.folder, plan.run_name, plan.describe(), plan.tags, plan.start_step, resumed)
    backends = [JsonlBackend(plan.folder.metrics_jsonl, keep_through_step=plan.start_step)]
    backends += [b for b in (BACKENDS[name].start(run) for name in chosen(plan.cfg.report_to)) if b is not None]
    return Tracker(backends, run.name, resumed)
