"""Experiment tracking: the same metrics, under the same names and steps, to metrics.jsonl, TensorBoard and wandb.

wandb never blocks a run: no key means offline (with the `wandb sync` command to upload later), an unreachable
server means offline after a bounded wait, and a missing package means TensorBoard only. The API key itself is never
read into anything that is logged or saved; only where it would come from is reported."""

from __future__ import annotations

import configparser
import json
import math
import netrc
import os
from datetime import datetime
from pathlib import Path
from urllib.parse import urlparse

from .config import TrainConfig, notice

WANDB_INIT_TIMEOUT_S = 20.0  # how long to wait for a wandb server before going offline (env WANDB_INIT_TIMEOUT wins)


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0  # torchrun / accelerate set RANK on every process


def format_lr(lr: float) -> str:
    mantissa, exponent = f"{lr:e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def default_run_name(cfg: TrainConfig, corpus: str) -> str:
    stamp = datetime.now().strftime("%Y%m%d_%H%M%S")
    return f"{cfg.model_size}-{corpus}-lr{format_lr(cfg.learning_rate)}-bs{cfg.batch_size}-{stamp}"


def wandb_key_source() -> str | None:
    """Where wandb would find an API key, in wandb's own order, without reading the key into anything."""
    if os.environ.get("WANDB_API_KEY"):
        return "WANDB_API_KEY"
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    netrc_path = Path(os.environ.get("NETRC") or Path.home() / ".netrc")
    if netrc_path.is_file():
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


# ---- backends -------------------------------------------------------------------------------------------------------
class JsonlBackend:
    """metrics.jsonl in output_dir: every run keeps a plain record, readable without any tracker installed."""

    def __init__(self, path: Path):
        self.path = path

    def log(self, metrics: dict, step: int) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")

    def log_samples(self, samples: dict, step: int) -> None:
        pass

    def finish(self, hparams: dict, final: dict, step: int, checkpoints: list[Path], exit_code: int) -> None:
        if final:
            self.log(final, step)


class TensorBoardBackend:
    def __init__(self, logdir: Path, purge_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops events a crashed run wrote after its last checkpoint, so resumed curves never go backwards
        self.writer = SummaryWriter(str(logdir), purge_step=purge_step)

    def log(self, metrics: dict, step: int) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)

    def log_samples(self, samples: dict, step: int) -> None:
        for prompt, text in samples.items():
            self.writer.add_text(f"samples/{prompt}", text.replace("\n", "  \n"), step)  # markdown line breaks

    def finish(self, hparams: dict, final: dict, step: int, checkpoints: list[Path], exit_code: int) -> None:
        if final:  # also writes the final metrics as scalars at `step`
            clean = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in hparams.items()}
            self.writer.add_hparams(clean, final, run_name=".", global_step=step)  # "." keeps it in this run's folder
        self.writer.close()


class WandbBackend:
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

    def finish(self, hparams: dict, final: dict, step: int, checkpoints: list[Path], exit_code: int) -> None:
        if final:
            self.log(final, step)
        existing = [p for p in checkpoints if p.exists()]
        if self.log_model and existing:
            artifact = self.wandb.Artifact(f"model-{self.run.id}", type="model", metadata=final)
            for path in existing:
                artifact.add_file(str(path), name=path.name)
            self.run.log_artifact(artifact, aliases=["best", "final", "latest"])
        offline = self.run.settings.mode in ("offline", "dryrun")
        run_dir = Path(self.run.dir).parent
        self.run.finish(exit_code=exit_code)
        if offline:
            notice(f"wandb: this run was logged offline. Upload it with:  wandb sync {run_dir}")


def sweep_locked_keys() -> set[str]:
    """Parameters a wandb sweep set for this run: wandb locks them, so we leave them out of our config update."""
    path = os.environ.get("WANDB_SWEEP_PARAM_PATH")
    if not path or not Path(path).is_file():
        return set()
    import yaml

    params = yaml.safe_load(Path(path).read_text()) or {}
    return set(params) if isinstance(params, dict) else set()


def start_wandb(cfg: TrainConfig, run_name: str, config: dict, tags: list[str], run_id: str | None):
    """Start a wandb run that cannot hang or crash training; None if wandb is off or missing."""
    try:
        import wandb
    except ImportError:
        notice("note: wandb is not installed, so metrics go to TensorBoard only (pip install wandb to add it).")
        return None
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_ENTITY", "WANDB_PROJECT"):
        if os.environ.get(name) == "":  # compose passes unset settings as empty strings; wandb would reject them
            del os.environ[name]
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
        name=run_name, tags=tags, id=run_id, resume="allow" if run_id else None,
        config={k: v for k, v in config.items() if k not in sweep_locked_keys()},
        dir=os.environ.get("WANDB_DIR") or cfg.output_dir,
    )
    timeout = float(os.environ.get("WANDB_INIT_TIMEOUT", WANDB_INIT_TIMEOUT_S))
    settings = wandb.Settings(init_timeout=timeout, login_timeout=timeout)
    attempts = [mode, "offline"] if mode in ("online", "run") else [mode]
    for attempt in attempts:
        try:
            run = wandb.init(mode=attempt, settings=settings, **kwargs)
            break
        except Exception as e:  # unreachable server, rejected key, unwritable folder: training goes on regardless
            reason = f"{type(e).__name__}: {str(e)[:160]}"
            if attempt != attempts[-1]:
                notice(f"wandb: could not reach the server ({reason}); logging offline instead.")
            else:
                notice(f"wandb: could not start ({reason}); continuing without wandb (metrics.jsonl and TensorBoard "
                       f"still record everything).")
                return None
    return WandbBackend(run, wandb, cfg.wandb_log_model)


class NullTracker:
    """Logs nothing: for library use and tests that need no tracking."""

    def log(self, metrics: dict, step: int) -> None:
        pass

    def log_samples(self, samples: dict, step: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {}


# ---- the fan-out ----------------------------------------------------------------------------------------------------
class Tracker:
    """What the trainer logs to. On processes other than the main one it does nothing."""

    def __init__(self, cfg: TrainConfig, config: dict, corpus: str, resume_state: dict | None = None,
                 start_step: int = 0):
        resume_state = resume_state or {}
        self.run_name = resume_state.get("run_name") or cfg.wandb_run_name or default_run_name(cfg, corpus)
        self.wandb_id = resume_state.get("wandb_id")
        self.hparams = config
        self.backends: list = []
        if not is_main_process():
            return
        out = Path(cfg.output_dir)
        self.backends.append(JsonlBackend(out / "metrics.jsonl"))
        if cfg.report_to in ("all", "tensorboard"):
            self.backends += self._tensorboard(out / "logs" / self.run_name, start_step)
        if cfg.report_to in ("all", "wandb"):
            tags = [cfg.model_size, config.get("precision", ""), "single-gpu", *cfg.wandb_tags.split(",")]
            tags = [t.strip()[:64] for t in tags if t.strip()]  # wandb rejects empty tags and tags over 64 characters
            backend = start_wandb(cfg, self.run_name, config, tags, self.wandb_id)
            if backend:
                self.wandb_id = backend.run.id
                self.backends.append(backend)

    @staticmethod
    def _tensorboard(logdir: Path, start_step: int) -> list:
        try:
            return [TensorBoardBackend(logdir, purge_step=start_step + 1 if start_step else None)]
        except ImportError:
            notice("note: tensorboard is not installed, so TensorBoard logs are skipped (pip install tensorboard).")
            return []

    def log(self, metrics: dict, step: int) -> None:
        for backend in self.backends:
            backend.log(metrics, step)

    def log_samples(self, samples: dict, step: int) -> None:
        for backend in self.backends:
            backend.log_samples(samples, step)

    def finish(self, final: dict | None = None, step: int = 0, checkpoints: list[Path] = (), exit_code: int = 0) -> None:
        """Close every backend; `final` metrics (only for a completed run) also go to TensorBoard's HParams table."""
        final = {k: v for k, v in (final or {}).items() if math.isfinite(v)}
        for backend in self.backends:
            backend.finish(self.hparams, final, step, list(checkpoints), exit_code)
        self.backends = []

    def state_dict(self) -> dict:
        return {"run_name": self.run_name, "wandb_id": self.wandb_id}
