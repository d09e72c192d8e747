"""wandb: credentials found without reading the key into anything logged, a bounded start-up with an offline
fallback, and the backend that logs to the run.

wandb never blocks a run: no key means offline (with the `wandb sync` command to upload later), an unreachable
server means offline after a bounded wait, and a missing package means no wandb. The API key itself is never read
into anything that is logged or saved; only where it would come from is reported."""

from __future__ import annotations

import configparser
import contextlib
import json
import netrc
import os
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

from ..errors import notice
from .base import RunInfo, RunSummary, drop_empty_settings, start_in_first_mode
from .wandb_records import history_rows

WANDB_INIT_TIMEOUT_S = 20.0  # how long to wait for a wandb server before going offline (env WANDB_INIT_TIMEOUT wins)


def wandb_key_source() -> str | None:
    """Where wandb would find an API key, in wandb's own order, without reading the key into anything."""
    if os.environ.get("WANDB_API_KEY"):
        return "WANDB_API_KEY"
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    netrc_path = Path(os.environ.get("NETRC") or Path.home() / ".netrc")
    if netrc_path.is_file():
        with contextlib.suppress(OSError):
            if netrc_path.stat().st_mode & 0o044:
                notice(f"warning: {netrc_path} holds API keys and can be read by other users of this machine (mode "
                       f"{netrc_path.stat().st_mode & 0o777:o}). Make it private: chmod 600 {netrc_path}")
        try:
            # an explicit path skips the owner/permission check, so a read-only mount from the host works
            if netrc.netrc(str(netrc_path)).authenticators(host):
                return str(netrc_path)
        except PermissionError:
            notice(f"note: {netrc_path} exists but this user (uid {os.getuid()}) cannot read it; run the container "
                   f"as the file's owner or pass WANDB_API_KEY instead.")
        except netrc.NetrcParseError as e:
            notice(f"note: {netrc_path} could not be parsed (line {e.lineno}); ignoring it.")
    settings = Path(os.environ.get("WANDB_CONFIG_DIR") or Path.home() / ".config" / "wandb") / "settings"
    if settings.is_file():
        parser = configparser.ConfigParser()
        try:
            parser.read(settings)
        except (configparser.Error, OSError):
            return None
        if parser.get("default", "api_key", fallback=None):
            return str(settings)
    return None


class WandbBackend:
    name = "wandb"

    def __init__(self, run, wandb_module, log_model: bool):
        self.run, self.wandb, self.log_model = run, wandb_module, log_model
        self.table_rows: list = []
        # our step is a logged value, not wandb's internal _step, so a resumed run never logs "backwards"
        run.define_metric("global_step")
        run.define_metric("*", step_metric="global_step")

    def log(self, metrics: dict, step: int) -> None:
        self.run.log({**metrics, "global_step": step})

    def log_samples(self, samples: dict, step: int) -> None:
        self.table_rows += [[step, prompt, text] for prompt, text in samples.items()]
        table = self.wandb.Table(columns=["step", "prompt", "text"], data=self.table_rows)
        self.run.log({"samples": table, "global_step": step})

    def state_dict(self) -> dict:
        return {"wandb_id": self.run.id}

    @property
    def offline(self) -> bool:
        return self.run.settings.mode in ("offline", "dryrun")

    def run_dirs(self) -> list[Path]:
        """This run's local folders: offline, every start of a resumed run writes its own, and all make up the run."""
        run_dir = Path(self.run.dir).parent
        return sorted(run_dir.parent.glob(f"offline-run-*-{self.run.id}")) or [run_dir]

    def held_before(self) -> Callable[[int, dict], bool] | None:
        """Whether the earlier segments of this run hold a row (its step and metrics); None when that cannot be told,
        and then nothing is logged again."""
        if self.offline:
            here = Path(self.run.dir).parent
            files = [d / f"run-{self.run.id}.wandb" for d in self.run_dirs() if d != here]
            files = [f for f in files if f.is_file()]
            if not files:  # the earlier segments' folders are elsewhere (another WANDB_DIR) or gone
                return None
            held = {(row.get("global_step"), key) for f in files for row in history_rows(f) for key in row}
            return lambda step, metrics: any((step, key) in held for key in metrics)
        # Online, wandb loads a resumed run's summary from the server on init (Run._set_run_obj in wandb 0.31): its
        # global_step is the last step the server received. No server is reachable in the tests, so this branch is
        # checked only with a stand-in run object.
        last = self.run.summary.get("global_step")
        return None if last is None else lambda step, metrics: step <= last

    def close(self, summary: RunSummary) -> None:
        if summary.final:
            self.log(summary.final, summary.step)
        existing = [p for p in summary.checkpoints if p.exists()]
        if self.log_model and existing:
            artifact = self.wandb.Artifact(f"model-{self.run.id}", type="model", metadata=summary.final)
            for path in existing:  # a sharded checkpoint (FSDP) is a folder
                if path.is_dir():
                    artifact.add_dir(str(path), name=path.name)
                else:
                    artifact.add_file(str(path), name=path.name)
            self.run.log_artifact(artifact, aliases=["best", "final", "latest"])
        offline, run_dirs = self.offline, self.run_dirs()
        self.run.finish(exit_code=summary.exit_code)
        if offline:
            notice(f"wandb: this run was logged offline. Upload it with:  wandb sync {' '.join(map(str, run_dirs))}")


def log_lost_rows_again(backend: WandbBackend, run: RunInfo) -> None:
    """A resumed run logs again the rows before its checkpoint that the earlier segments' wandb run lacks, from
    metrics.jsonl (the record our own process writes): Slurm's SIGTERM (requeue, preemption, scancel) reaches every
    process of a job, and wandb's own process exits at once, losing what it had not yet written (wandb/wandb#9963)."""
    held = backend.held_before()
    if held is None or not run.folder.metrics_jsonl.is_file():
        return
    rows = []
    for line in run.folder.metrics_jsonl.read_text("utf-8", "replace").splitlines():
        try:
            row = json.loads(line)
            step = row.pop("step")
        except (ValueError, KeyError, TypeError, AttributeError):  # a line a kill cut short
            continue
        # metrics.jsonl writes a non-finite value as null; wandb got it as a float
        metrics = {key: float("nan") if value is None else value for key, value in row.items()}
        if isinstance(step, int) and step <= run.start_step and metrics and not held(step, metrics):
            rows.append((step, metrics))
    for step, metrics in rows:
        backend.log(metrics, step)
    if rows:
        notice(f"wandb: logged again the {len(rows)} rows (steps {rows[0][0]}-{rows[-1][0]}) that the earlier "
               f"segment's wandb process lost when it was stopped (a SIGTERM to the whole job, as Slurm sends, stops "
               f"wandb's own process too); metrics.jsonl holds them, so the run has each step once.")


def sweep_locked_keys() -> set[str]:
    """Parameters a wandb sweep set for this run: wandb locks them, so we leave them out of our config update."""
    path = os.environ.get("WANDB_SWEEP_PARAM_PATH")
    if not path or not Path(path).is_file():
        return set()
    import yaml

    params = yaml.safe_load(Path(path).read_text()) or {}
    return set(params) if isinstance(params, dict) else set()


def start(run: RunInfo) -> WandbBackend | None:
    """Start a wandb run that cannot hang or crash training; None if wandb is off or missing."""
    cfg, run_id = run.cfg, run.resumed.get("wandb_id")
    tags = [tag[:64] for tag in run.tags]  # wandb rejects tags over 64 characters
    try:
        import wandb
    except ImportError:
        notice("note: wandb is not installed, so metrics go to TensorBoard only (pip install wandb to add it).")
        return None
    drop_empty_settings("WANDB_")
    mode = (cfg.wandb_mode or os.environ.get("WANDB_MODE") or "online").lower()
    if mode == "disabled":
        return None
    if mode in ("online", "run") and not wandb_key_source():
        notice("wandb: no API key (WANDB_API_KEY, ~/.netrc or ~/.config/wandb/settings), so this run logs offline; "
               "the command to upload it is printed at the end.")
        mode = "offline"
    kwargs = dict(
        project=cfg.wandb_project or os.environ.get("WANDB_PROJECT") or "gpt-training",
        entity=cfg.wandb_entity or os.environ.get("WANDB_ENTITY") or None,
        name=run.name, tags=tags, id=run_id, resume="allow" if run_id else None,
        config={k: v for k, v in run.hparams.items() if k not in sweep_locked_keys()},
        dir=os.environ.get("WANDB_DIR") or str(run.folder.path),
    )
    timeout = float(os.environ.get("WANDB_INIT_TIMEOUT", WANDB_INIT_TIMEOUT_S))

    def start_in(attempt: str) -> WandbBackend:
        # offline, wandb's own closing lines would print a second `wandb sync`, naming only this start's folder; ours
        # (close) names every folder of a resumed run
        settings = wandb.Settings(init_timeout=timeout, login_timeout=timeout, quiet=attempt in ("offline", "dryrun"))
        return WandbBackend(wandb.init(mode=attempt, settings=settings, **kwargs), wandb, cfg.wandb_log_model)
    backend = start_in_first_mode("wandb", [mode, "offline"] if mode in ("online", "run") else [mode], start_in)
    if backend is not None and run_id and run.start_step:
        try:
            log_lost_rows_again(backend, run)
        except Exception as e:  # noqa: BLE001 - a run file we cannot read costs the rows it lost, not the run
            notice(f"wandb: could not log again the rows the earlier segment lost ({type(e).__name__}: {str(e)[:160]})")
    return backend
