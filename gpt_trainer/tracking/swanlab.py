"""SwanLab: the same metrics, steps, samples and config as TensorBoard and wandb, for those whose network reaches
SwanLab (swanlab.cn, or a self-hosted server) more easily than wandb.

Like wandb it never blocks or ends a run: no key means offline (a local record under output_dir/swanlog, with the
`swanlab sync` command printed at the end), an unreachable server means offline after a bounded check, a missing
package means no SwanLab, and a SwanLab error while logging turns SwanLab off for the rest of the run. The API key is
never read into anything logged or saved; only where it would come from is reported."""

from __future__ import annotations

import contextlib
import io
import os
import re
import urllib.error
import urllib.request
from pathlib import Path

from ..config import TrainConfig
from ..errors import UsageError, notice
from .base import RunInfo, RunSummary, drop_empty_settings, start_in_first_mode

REACH_TIMEOUT_S = 5.0  # how long the server may take to answer at all before the run logs offline
PROJECT_NAME = re.compile(r"[0-9A-Za-z_+.\-]{1,100}")  # what SwanLab accepts as a project name


def check(cfg: TrainConfig) -> None:
    """Refuse, before anything is written, a project name SwanLab would reject after the run started."""
    project = cfg.swanlab_project or os.environ.get("SWANLAB_PROJECT")
    if project and not PROJECT_NAME.fullmatch(project):
        raise UsageError(f"SwanLab project {project!r} (--swanlab_project or $SWANLAB_PROJECT): SwanLab accepts 1 to "
                         f"100 letters, digits and _ - + . only. Choose a name such as gpt-training.")


def swanlab_root() -> Path:
    """SwanLab's own folder for its login file, in SwanLab's order."""
    return Path(os.environ.get("SWANLAB_ROOT") or os.environ.get("SWANLAB_SAVE_DIR") or Path.home() / ".swanlab")


def swanlab_key_source() -> str | None:
    """Where SwanLab would find an API key, in its own order (environment, ./.swanlab/.netrc, then the login file of
    `swanlab login`), without reading the key into anything."""
    if os.environ.get("SWANLAB_API_KEY"):
        return "SWANLAB_API_KEY"
    for login_file in (Path.cwd() / ".swanlab" / ".netrc", swanlab_root() / ".netrc"):
        if login_file.is_file():
            return str(login_file)
    return None


def reachable(url: str, timeout: float = REACH_TIMEOUT_S) -> bool:
    """Any HTTP answer counts (even an error status); no answer within `timeout` does not."""
    try:
        urllib.request.urlopen(url, timeout=timeout).close()
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):
        return False
    return True


def quiet(offline: bool):
    """Offline, SwanLab's own start and end lines only repeat what our notices say (and name one folder of many)."""
    return contextlib.redirect_stdout(io.StringIO()) if offline else contextlib.nullcontext()


class SwanLabBackend:
    name = "swanlab"

    def __init__(self, run, swanlab_module, logdir: Path, offline: bool):
        self.run, self.swanlab, self.logdir, self.offline = run, swanlab_module, logdir, offline
        self.failed = False

    def guarded(self, action: str, call) -> None:
        """A SwanLab error costs SwanLab, never the training run: one notice, then SwanLab is skipped."""
        if self.failed:
            return
        try:
            call()
        except Exception as e:  # noqa: BLE001 - whatever SwanLab raises, training goes on
            self.failed = True
            notice(f"swanlab: {action} failed ({type(e).__name__}: {str(e)[:160]}); SwanLab is off for the rest of "
                   f"this run (metrics.jsonl and the other trackers still record everything).")

    def log(self, metrics: dict, step: int) -> None:
        self.guarded("logging", lambda: self.run.log(metrics, step=int(step)))

    def log_samples(self, samples: dict[str, str], step: int) -> None:
        texts = {f"samples/{prompt}": self.swanlab.Text(text, caption=prompt) for prompt, text in samples.items()}
        self.guarded("logging samples", lambda: self.run.log(texts, step=int(step)))

    def state_dict(self) -> dict:
        return {"swanlab_id": self.run.id}

    def close(self, summary: RunSummary) -> None:
        if summary.final:
            self.log(summary.final, summary.step)
        state = "success" if summary.exit_code == 0 else "aborted"
        self.failed = False  # finishing still flushes what was logged before a failure
        with quiet(self.offline):
            self.guarded("finishing", lambda: self.run.finish(state=state))
        if self.offline:
            # offline, every start of a resumed run writes its own folder: all of them make up the run
            folders = sorted(self.logdir.glob(f"run-*-{self.run.id}"))
            notice(f"swanlab: this run was logged offline. Upload it with:  swanlab sync -i {self.run.id} "
                   f"{' '.join(map(str, folders))}")


def start(run: RunInfo) -> SwanLabBackend | None:
    """Start a SwanLab run that cannot hang or crash training; None if SwanLab is off or missing."""
    cfg = run.cfg
    drop_empty_settings("SWANLAB_")
    if os.environ.get("SWANLAB_DEBUG", "").lower() in ("1", "true", "yes"):
        notice("swanlab: SWANLAB_DEBUG would write the API key into SwanLab's debug log; it is off for this run.")
        os.environ["SWANLAB_DEBUG"] = "false"
    mode = (cfg.swanlab_mode or os.environ.get("SWANLAB_MODE") or "cloud").lower()
    if mode == "disabled":
        return None
    try:
        import swanlab
    except ImportError:
        notice("note: swanlab is not installed, so nothing goes to SwanLab (pip install swanlab, or "
               "pip install 'gpt-trainer[swanlab]').")
        return None
    mode = "offline" if mode == "offline" else choose_cloud_or_offline(swanlab)
    logdir = run.folder.swanlog
    run_id = run.resumed.get("swanlab_id")
    kwargs = dict(
        project=cfg.swanlab_project or os.environ.get("SWANLAB_PROJECT") or "gpt-training",
        workspace=cfg.swanlab_workspace or os.environ.get("SWANLAB_WORKSPACE") or None,
        name=run.name, config=run.hparams, tags=run.tags, logdir=str(logdir),
        id=run_id, resume="allow" if run_id else "never",
        settings=swanlab.Settings(
            interactive=False,  # never wait for a key typed at a prompt
            terminal=swanlab.Settings.Terminal(proxy_type="none"),  # our console output is not SwanLab's to record
            probe=swanlab.Settings.Probe(monitor=False),  # the trainer logs its own system/ metrics
        ),
    )
    def start_in(attempt: str) -> SwanLabBackend:
        with quiet(attempt == "offline"):
            swanlab_run = swanlab.init(mode=attempt, **kwargs)
        return SwanLabBackend(swanlab_run, swanlab, logdir, offline=attempt == "offline")
    return start_in_first_mode("swanlab", [mode, "offline"] if mode == "online" else [mode], start_in)


def choose_cloud_or_offline(swanlab) -> str:
    """online when a key exists and the server answers; offline otherwise, saying why in one line."""
    if not swanlab_key_source():
        notice("swanlab: no API key (SWANLAB_API_KEY or `swanlab login`), so this run logs offline; the command to "
               "upload it is printed at the end.")
        return "offline"
    host = swanlab.Settings().api_host  # SwanLab's own answer: SWANLAB_API_HOST, the login file, or its default
    if not reachable(host):
        notice(f"swanlab: the server {host} did not answer within {REACH_TIMEOUT_S:g} s, so this run logs offline; "
               f"the command to upload it is printed at the end.")
        return "offline"
    return "online"
