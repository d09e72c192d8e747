"""Hyper-parameter sweeps from a wandb sweep file, checked before anything runs, and run locally with no server.

    python -m gpt_trainer.sweep sweep_config.yaml [--max_runs N] [--count N] [--output_dir output_sweep]
                                [TRAINING FLAGS...]

Training flags after the sweep's own (e.g. `--max_steps 10` for a quick look) go to every trial: they win over the
file's fixed values (said in a note) and may not name a swept parameter. A sweep's folder records them, and continues
only with the same ones.

The same file works with `wandb sweep` + `wandb agent`. Locally, a worker runs trials one after another, each in its own
output folder (with its own TensorBoard run and HParams), suggested by wandb's own sweep engine (the `sweeps` package:
grid, random, and bayes, which it computes offline). A restarted sweep skips finished trials and resumes an interrupted
one. Hyperband early termination needs a wandb server; locally every trial runs to the end.

Several workers can run one sweep: start the same command several times (one per GPU with CUDA_VISIBLE_DEVICES=i, or a
Slurm job array whose nodes share the folder). They claim trials from OUTPUT_DIR/sweep_state.json under a file lock, so
no trial runs twice; a trial whose worker died is resumed by the next worker that looks. --max_runs is the sweep's total
over all workers, --count what this worker runs at most (like `wandb agent --count`): a job array of K tasks with
--count 1 runs K trials. On a cluster the folder must be on storage whose file locks work across nodes (NFSv4, Lustre
mounted with flock).

Before anything runs, each trial's training command line is parsed and validated as the trial would (no training): a
grid's every point; for random and bayes, the fixed values with every listed value and both ends of every range, in
every combination. The folder holds only what sweeps write (a marker says so); a folder with other files is refused."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import hashlib
import itertools
import json
import math
import os
import random
import re
import signal
import socket
import subprocess
import sys
import warnings
from datetime import datetime
from pathlib import Path
from typing import IO

import yaml

from .. import tracking
from ..config import RANGES, TrainConfig, build_parser, parse_args
from ..errors import UsageError
from ..system.rundir import PROBE_PREFIX, check_writable_folder, held, try_lock
from .failures import AGAIN, run_cli

STATE_FILE = "sweep_state.json"
LOCK_FILE = "sweep_state.lock"  # held only while a worker reads, changes and writes the state, never while it trains
INTERRUPTED = {128 + signal.SIGINT, 128 + signal.SIGTERM, -signal.SIGINT, -signal.SIGTERM}  # saved, or killed early
FLAGS = {f.name for f in dataclasses.fields(TrainConfig)}
MARKER = ".gpt-trainer-sweep"  # written first into a sweep's folder; a folder with other files and no marker is refused
TRIAL_NAME = re.compile(r"trial-\d{3,}")
CHECKED_AT_MOST = 10_000  # trial command lines checked before a sweep starts (about 6 s)
RUNNER_SETS = ("output_dir", "report_to", "wandb_run_name", "resume")  # the local runner's own, in every trial
RUNNER_FLAGS = ("max_runs", "count", "output_dir", "report_to", "check")


def _sweeps():
    with warnings.catch_warnings():  # the package warns about its pydantic settings on import
        warnings.simplefilter("ignore")
        import sweeps
        import sweeps.params  # noqa: F401  (HyperParameter: the ends of a parameter's range)
    return sweeps


# ---- reading and checking a sweep file ------------------------------------------------------------------------------
def load_sweep(path: str) -> dict:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise UsageError(f"cannot read the sweep file {path} ({e.strerror}).") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"the sweep file {path} is not UTF-8 text (byte offset {e.start}). Save it as UTF-8, e.g. "
                         f"`iconv -f <encoding> -t UTF-8 {path} > fixed.yaml`.") from None
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UsageError(f"{path} is not valid YAML{where}: {getattr(e, 'problem', e)}.") from None
    if not isinstance(config, dict) or not isinstance(config.get("parameters"), dict):
        raise UsageError(f"{path} must be a mapping with `method` and a `parameters` mapping (see sweep_config.yaml).")
    check_sweep(config, path)
    return config


def _numbers_hidden_in_strings(name: str, spec: dict, path: str) -> None:
    """YAML reads `1e-5` (no dot) as a string; the agent would then pass a string where a float is meant."""
    candidates = [spec.get("value"), spec.get("min"), spec.get("max"), *(spec.get("values") or [])]
    for value in candidates:
        if isinstance(value, str) and "e" in value.lower():
            try:
                float(value)
            except ValueError:
                continue
            fixed = f"{float(value):.1e}".replace("e-0", "e-").replace("e+0", "e+")
            raise UsageError(f"{path}: parameter `{name}` has {value!r}, which YAML reads as a string, not a number. "
                             f"Write it with a dot and a signed exponent, e.g. {fixed}.")


def check_sweep(config: dict, path: str) -> None:
    for name, spec in config["parameters"].items():
        if not isinstance(spec, dict):
            raise UsageError(f"{path}: parameter `{name}` must be a mapping such as {{values: [...]}} or "
                             f"{{value: ...}}.")
        _numbers_hidden_in_strings(name, spec, path)
        if name not in FLAGS:
            close = difflib.get_close_matches(name, FLAGS, n=1)
            hint = f" Did you mean `{close[0]}`?" if close else " `python train_single_gpu.py --help` lists them."
            raise UsageError(f"{path}: parameter `{name}` is not a flag of train_single_gpu.py.{hint}")
    violations = _sweeps().schema_violations_from_proposed_config(config)
    if violations:
        raise UsageError(f"{path} is not a valid wandb sweep: {'; '.join(violations)}.")
    for name, spec in config["parameters"].items():  # the ends of a range are known once the schema holds
        refused = refused_values(name, spec)
        if refused:
            raise UsageError(f"{path}: parameter `{name}` has values train_single_gpu.py would refuse, so every run "
                             f"given them would fail at once: "
                             f"{'; '.join(f'{value!r}: {reason}' for value, reason in refused)}.")


def parameter_values(name: str, spec: dict) -> list:
    """What is checked of a parameter: its fixed or listed values, else both ends of its range as the sweep engine
    draws from it (a log_uniform's min and max are logarithms; an unbounded distribution's ends are its 0.1 and
    99.9 percentiles)."""
    if "value" in spec:
        return [spec["value"]]
    if "values" in spec:
        return list(spec["values"])
    parameter = _sweeps().params.HyperParameter(name, spec)
    ends = [parameter.ppf(math.ulp(0.0)), parameter.ppf(1.0)]  # ppf(0) of an integer range is one below its min
    if not all(math.isfinite(end) for end in ends):
        ends = [parameter.ppf(0.001), parameter.ppf(0.999)]
    return [float(f"{end:.12g}") if isinstance(end, float) else int(end) for end in map(plain, ends)]


def plain(value):
    """A numpy number as Python's own, as the state file and the command line need it."""
    return value.item() if hasattr(value, "item") else value


def training_sentence(error: UsageError) -> str:
    """The training command's refusal, without the pointer to --help that follows a bad flag."""
    return str(error).split(". Run with --help")[0]


def refused_values(name: str, spec: dict) -> list[tuple]:
    """The values of a parameter (listed, fixed, or the ends of a range) that the flag refuses, each with the reason,
    checked as the agent would pass them."""
    parser = build_parser()
    refusals = [(value, flag_refusal(parser, name, agent_args({name: value})))
                for value in parameter_values(name, spec)]
    return [(value, reason) for value, reason in refusals if reason]


def flag_refusal(parser: argparse.ArgumentParser, name: str, args: list[str]) -> str | None:
    """Why train_single_gpu.py refuses one flag's value on its own (its type, its range); None when it takes it."""
    try:
        parsed = getattr(parser.parse_args(args), name)
    except UsageError as e:
        return training_sentence(e)
    allowed = RANGES.get(name)
    if allowed and parsed is not None and not allowed.holds(parsed):
        return f"--{name} must be {allowed.describe()}"
    return None


def agent_args(params: dict) -> list[str]:
    """The argument list a wandb agent builds for ${args}: `--key=value` with str(value), so booleans arrive as
    True/False."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    return create_sweep_command_args({"args": {k: {"value": v} for k, v in params.items()}})["args"]


def trial_args(params: dict, root: Path, name: str, report_to: str, passthrough: list[str]) -> list[str]:
    """A trial's training arguments: the sweep's values as the agent renders them, the flags given after the sweep's
    own (later, so they win over the file's fixed values), then the runner's own (the trial's folder, trackers and
    name, and --resume, so that an interrupted trial goes on)."""
    return [*agent_args(params), *passthrough, f"--output_dir={root / name}", f"--report_to={report_to}",
            f"--wandb_run_name={name}", "--resume"]


# ---- training flags given after the sweep's own ---------------------------------------------------------------------
def passthrough_flags(extra: list[str], config: dict, path: str) -> list[str]:
    """The training flags given after the sweep's own, each as `--name=value` (what the state records and compares):
    a flag of train_single_gpu.py, with a value it takes, naming neither a swept parameter (a flag for every trial
    would end the sweep over it) nor one the runner sets itself."""
    flags = canonical_flags(extra)
    swept = {name: spec for name, spec in config["parameters"].items() if "value" not in spec}
    parser = build_parser()
    for flag in flags:
        name = flag[2:].split("=", 1)[0]
        if name in swept:
            raise UsageError(f"{flag} names `{name}`, which {path} sweeps over ({describe_spec(swept[name])}): a "
                             f"training flag given here applies to every trial, so it cannot also be swept. Drop "
                             f"{flag}, or make `{name}` a fixed `value:` in the file.")
        if name in RUNNER_SETS:
            raise UsageError(f"{flag}: the sweep runner sets --{name} for each trial itself "
                             f"({runner_sets_words()}); drop it.")
        refusal = flag_refusal(parser, name, [flag])
        if refusal:
            raise UsageError(f"{flag}, given for every trial, is refused by train_single_gpu.py: {refusal}.")
    return flags


def canonical_flags(extra: list[str]) -> list[str]:
    """`--name value`, `--name=value` and a bare boolean `--name` as `--name=value`; a word that is not a training flag
    or its value is refused with a sentence naming it."""
    booleans = {a.dest for a in build_parser()._actions if a.nargs == "?"}
    flags, rest = [], list(extra)
    while rest:
        token = rest.pop(0)
        name, has_value, value = token[2:].partition("=") if token.startswith("--") else ("", False, "")
        if name not in FLAGS:
            raise UsageError(not_a_flag(token))
        if not has_value:
            takes_next = bool(rest) and not rest[0].startswith("--")
            if not takes_next and name not in booleans:
                raise UsageError(f"--{name} needs a value (e.g. --{name}=VALUE).")
            value = rest.pop(0) if takes_next else "True"
        flags.append(f"--{name}={value}")
    return flags


def not_a_flag(token: str) -> str:
    if not token.startswith("--"):
        return (f"{token!r} after the sweep file is neither a flag nor a flag's value. Training flags for every "
                f"trial are written --name=value (or --name value).")
    name = token[2:].split("=", 1)[0]
    close = difflib.get_close_matches(name, [*FLAGS, *RUNNER_FLAGS], n=1)
    hint = f" Did you mean --{close[0]}?" if close else " `python train_single_gpu.py --help` lists them."
    return f"--{name} is neither a flag of the sweep runner nor of train_single_gpu.py.{hint}"


def describe_spec(spec: dict) -> str:
    if "values" in spec:
        return f"values {spec['values']}"
    return ", ".join(f"{k} {v}" for k, v in spec.items())


def runner_sets_words() -> str:
    return ("--output_dir=OUTPUT_DIR/trial-NNN, --report_to as the runner's --report_to, --wandb_run_name=trial-NNN, "
            "--resume")


def replaced_fixed_values(passthrough: list[str], config: dict, path: str) -> list[str]:
    """A note for each fixed value of the file that a flag given here replaces (said, never silently)."""
    notes = []
    for flag in passthrough:
        name = flag[2:].split("=", 1)[0]
        spec = config["parameters"].get(name)
        if spec is not None and agent_args({name: spec["value"]}) != [flag]:
            notes.append(f"note: {flag} replaces {path}'s fixed {name}: {spec['value']} in every trial.")
    return notes


def runner_set_in_file(config: dict, path: str) -> str | None:
    """The local runner's sentence for a file that sets what it sets for each trial itself (`wandb agent` uses them)."""
    named = [name for name in RUNNER_SETS if name in config["parameters"]]
    if not named:
        return None
    return (f"{path} sets {', '.join(named)}, which the local runner sets for each trial itself "
            f"({runner_sets_words()}), so the file's value would be ignored. Remove "
            f"{'it' if len(named) == 1 else 'them'} from the file (or use the file with `wandb agent` only); the "
            f"runner takes the sweep's folder and trackers as its own --output_dir and --report_to.")


def effective_flags(config: dict, passthrough: list[str], root: Path, report_to: str) -> str:
    """What every trial's command line holds, in words: for --check."""
    fixed = {k: v["value"] for k, v in config["parameters"].items() if "value" in v}
    given = {flag[2:].split("=", 1)[0] for flag in passthrough}
    kept = agent_args({k: v for k, v in fixed.items() if k not in given})
    swept = [f"--{k} ({describe_spec(v)})" for k, v in config["parameters"].items() if "value" not in v]
    runner = trial_args({}, root, "trial-NNN", report_to, [])
    return (f"every trial runs: {' '.join([*kept, *passthrough]) or '(no fixed values)'}"
            + (f" (given here: {' '.join(passthrough)})" if passthrough else "")
            + f"; swept: {', '.join(swept) or 'nothing'}; and the local runner's own: {' '.join(runner)}")


def suggested_params(suggestion) -> dict:
    """A sweep engine's suggestion as the trial's flags and values."""
    return {k: v["value"] for k, v in suggestion.config.items()}


def varying(combinations: list[dict]) -> list[str]:
    """The parameters whose values differ between the combinations (the ones worth showing)."""
    return sorted({k for params in combinations for k in params
                   if len({json.dumps(other.get(k)) for other in combinations}) > 1})


# ---- values that are refused together -------------------------------------------------------------------------------
def check_trials(config: dict, path: str, root: Path, report_to: str, passthrough: list[str] = ()) -> str:
    """Each combination of values parsed and validated as its trial's training command would (config.parse_args, no
    training): values refused together (--min_lr above --learning_rate, --use_chinese with --data_path) stop the sweep
    before its first trial, as values refused alone do. Returns what was checked, in words."""
    combinations, which = trial_combinations(config)
    parser = build_parser()  # once: building it is most of the time a check takes
    refused = {}  # the training command's sentence -> the first combination it refuses
    count = 0
    for params in combinations:
        try:
            parse_args(trial_args(params, root, "trial-001", report_to, list(passthrough)), parser)
        except UsageError as e:
            count += 1
            refused.setdefault(training_sentence(e), params)
    if refused:
        shown_keys = varying(combinations) or list(config["parameters"])
        shown = " ".join(f"({i}) `{' '.join(agent_args({k: params[k] for k in shown_keys}))}`: {sentence}"
                         for i, (sentence, params) in enumerate(list(refused.items())[:3], 1))
        given = f" with {' '.join(passthrough)} (given here)" if passthrough else ""
        raise UsageError(f"{path}: train_single_gpu.py refuses {count} of the {len(combinations)} trials checked "
                         f"({which}){given}, so they would fail at once: {shown} Change the values or the fixed "
                         f"values so that they fit together.")
    return f"{len(combinations)} trials checked ({which})"


def trial_combinations(config: dict) -> tuple[list[dict], str]:
    """The parameters of the trials to check, and what they are. A grid: its points, from the sweep engine itself.
    Random and bayes: the fixed values with every listed value and both ends of every range, in every combination
    (CHECKED_AT_MOST of them drawn at random, the same each time, when there are more)."""
    if config["method"] == "grid":
        runs = _sweeps().next_runs(config, [], n=CHECKED_AT_MOST + 1)
        points = [suggested_params(run) for run in runs if run is not None]
        if len(points) <= CHECKED_AT_MOST:
            return points, "every point of the grid"
        return points[:CHECKED_AT_MOST], f"the first {CHECKED_AT_MOST} points of the grid"
    names = list(config["parameters"])
    choices = [parameter_values(name, config["parameters"][name]) for name in names]
    what = "each parameter's fixed or listed values and the ends of its range"
    if math.prod(map(len, choices)) <= CHECKED_AT_MOST:
        return [dict(zip(names, values)) for values in itertools.product(*choices)], f"every combination of {what}"
    draw = random.Random(0)
    return ([dict(zip(names, (draw.choice(c) for c in choices))) for _ in range(CHECKED_AT_MOST)],
            f"{CHECKED_AT_MOST} combinations drawn from {what}")


# ---- running locally ------------------------------------------------------------------------------------------------
def best_metric(metrics_file: Path, metric: str, goal: str) -> float | None:
    if not metrics_file.exists():
        return None
    values = [row[metric] for row in map(json.loads, metrics_file.read_text().splitlines()) if metric in row]
    if not values:
        return None
    return min(values) if goal == "minimize" else max(values)


def owner(trial: dict) -> str:
    """The worker that last claimed a trial, for the messages (a state from before workers had owners has none)."""
    who = trial.get("owner")
    return f"worker {who['host']}:{who['pid']}" if who else "an earlier worker"


# ---- the state file and the folder ----------------------------------------------------------------------------------
def fingerprint(config: dict) -> str:
    """The sweep file's content in short: a state written for another file is refused."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def read_state(path: Path) -> dict:
    """The state file, checked whole. A damaged one is refused and left as it is, never reset: it alone records which
    trials ran."""
    try:
        state = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise damaged(path, f"it is not UTF-8 text (byte offset {e.start})") from None
    except json.JSONDecodeError as e:
        what = f"it is not valid JSON ({e.msg}: line {e.lineno}, column {e.colno})" if e.doc.strip() else "it is empty"
        raise damaged(path, what) from None
    problem = state_problem(state)
    if problem:
        raise damaged(path, problem)
    return state


def damaged(path: Path, what: str) -> UsageError:
    return UsageError(f"{path} is damaged: {what}. It alone records which trials of this sweep ran and how they ended, "
                      f"so it is left as it is. To start the sweep's bookkeeping over, move it aside (`mv {path} "
                      f"{path}.damaged`) and run the same command: the trials' folders are kept, and the sweep starts "
                      f"again with new trials in folders numbered after them.")


def state_problem(state) -> str | None:
    """What is wrong with a state file's content, in words; None when it is what a sweep writes."""
    if not isinstance(state, dict):
        return f"it holds {json.dumps(state)[:40]}, not the mapping of `fingerprint` and `trials` a sweep writes"
    for key, kind, expected in (("fingerprint", str, "text"), ("trials", list, "a list")):
        if not isinstance(state.get(key), kind):
            return f"its `{key}` is {json.dumps(state.get(key))[:40]}, not {expected}"
    passthrough = state.get("passthrough", [])  # absent in the states of versions before it
    if not isinstance(passthrough, list) or not all(isinstance(flag, str) for flag in passthrough):
        return f"its `passthrough` is {json.dumps(passthrough)[:40]}, not a list of flags"
    names = set()
    for number, trial in enumerate(state["trials"], 1):
        problem = trial_problem(trial)
        name = trial.get("name") if isinstance(trial, dict) else None
        if problem:
            return f"its trial #{number}{f' ({name})' if isinstance(name, str) else ''} {problem}"
        if name in names:
            return f"it lists {name} twice"
        names.add(name)
    return None


TRIAL_FIELDS = {  # what each field of a trial must be: a test, and the words for it
    "name": (lambda v: isinstance(v, str) and TRIAL_NAME.fullmatch(v), "a name such as trial-001"),
    "status": (lambda v: isinstance(v, str) and re.fullmatch(r"running|finished|failed \(exit -?\d+\)", v),
               "running, finished or failed (exit N)"),
    "params": (lambda v: isinstance(v, dict), "a mapping of flags to values"),
    "metric": (lambda v: v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)), "a number or null"),
    "owner": (lambda v: v is None or (isinstance(v, dict) and isinstance(v.get("host"), str)
                                      and isinstance(v.get("pid"), int)), "a host and a pid"),
}


def trial_problem(trial) -> str | None:
    if not isinstance(trial, dict):
        return f"is {json.dumps(trial)[:40]}, not a mapping"
    for field, (holds, expected) in TRIAL_FIELDS.items():
        if field not in trial and field != "owner":  # states from before workers had owners have none
            return f"has no `{field}`"
        if not holds(trial.get(field)):
            return f"has `{field}` {json.dumps(trial[field])[:40]}, not {expected}"
    return None


def foreign_entries(root: Path) -> list[str]:
    """What a folder holds that no sweep wrote; nothing for a sweep's folder (its marker, or the state file of a
    version before the marker)."""
    if not root.is_dir() or (root / MARKER).exists() or (root / STATE_FILE).exists():
        return []
    ours = {MARKER, STATE_FILE, STATE_FILE + ".tmp", LOCK_FILE}
    return sorted(e.name for e in root.iterdir()  # workers started together see each other's probes and claims
                  if e.name not in ours and not e.name.startswith(PROBE_PREFIX)
                  and not TRIAL_NAME.fullmatch(e.name.removesuffix(".claim")))


class LocalSweep:
    """One worker of a local sweep. Several workers (processes on one machine, or on nodes sharing the folder) run one
    sweep together: each claims a trial from the shared state file under a lock, trains it with no lock held, and
    records its result under the lock again."""

    def __init__(self, config: dict, sweep_file: str, root: Path, report_to: str, passthrough: list[str]):
        self.config, self.root, self.report_to, self.passthrough = config, root, report_to, passthrough
        self.metric = config.get("metric", {}).get("name", "eval/loss")
        self.goal = config.get("metric", {}).get("goal", "minimize")
        self.program = self._program(config.get("program", "train_single_gpu.py"), sweep_file)
        self.fingerprint = fingerprint(config)
        self.me = {"host": socket.gethostname(), "pid": os.getpid()}
        self.trials: list[dict] = []
        self._take_folder()
        with self._locked_state():  # a changed sweep file or a damaged state is refused here, before anything runs
            pass

    def _take_folder(self) -> None:
        """--output_dir for this sweep: a new or empty folder, or an earlier sweep's. A file, or a folder that holds
        files no sweep wrote (the user's), is refused before anything is written; the marker says it is a sweep's."""
        check_writable_folder(self.root, "--output_dir")
        foreign = foreign_entries(self.root)
        if foreign:
            shown = ", ".join(foreign[:8]) + (f" and {len(foreign) - 8} more" if len(foreign) > 8 else "")
            raise UsageError(f"--output_dir {self.root} already holds files no sweep wrote ({shown}). A sweep writes "
                             f"{STATE_FILE} and a folder per trial there, so a folder of yours is left alone. Choose a "
                             f"new or empty --output_dir (the folder of an earlier sweep is continued).")
        marker = self.root / MARKER
        if not marker.exists():
            self.root.mkdir(parents=True, exist_ok=True)
            created = f"{datetime.now():%Y-%m-%d %H:%M:%S}"
            marker.write_text(json.dumps({"written_by": "gpt-trainer sweep", "created": created}) + "\n")

    @staticmethod
    def _program(program: str, sweep_file: str) -> Path:
        for candidate in (Path(program), Path(sweep_file).resolve().parent / program):
            if candidate.is_file():
                return candidate
        raise UsageError(f"the sweep's program {program} was found neither here nor next to {sweep_file}.")

    # ---- the shared state: read and written only under the lock ----
    @contextlib.contextmanager
    def _locked_state(self):
        """The state as it is now, for the block: other workers change the file, so it is read again each time."""
        with held(self.root / LOCK_FILE):
            self.trials = self._load_state()
            yield

    def _load_state(self) -> list[dict]:
        state_path = self.root / STATE_FILE
        if not state_path.exists():
            return []
        state = read_state(state_path)
        if state["fingerprint"] != self.fingerprint:
            raise UsageError(f"{self.root} holds a different sweep (its file changed). Use another --output_dir, or "
                             f"move {state_path} aside to start this folder over (the trials' folders are kept, and "
                             f"new trials are numbered after them).")
        recorded = state.get("passthrough", [])
        if recorded != self.passthrough:
            def words(flags):
                return " ".join(flags) if flags else "none"
            raise UsageError(f"the sweep in {self.root} runs its trials with the training flags {words(recorded)} "
                             f"after the sweep's own, and this command gives {words(self.passthrough)}: its trials "
                             f"would not be comparable. Give the same flags to continue it, or use another "
                             f"--output_dir for a sweep with these.")
        return state["trials"]

    def _save_state(self) -> None:
        """Written whole and renamed into place: a worker killed while writing leaves the previous state."""
        tmp = self.root / (STATE_FILE + ".tmp")
        state = {"fingerprint": self.fingerprint, "passthrough": self.passthrough, "trials": self.trials}
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, self.root / STATE_FILE)

    def _claim_path(self, trial: dict) -> Path:
        return self.root / f"{trial['name']}.claim"

    # ---- claiming a trial ----
    def _claim(self, max_runs: int | None) -> tuple[dict | None, IO | None, str]:
        """Under the state lock, a trial for this worker and its claim lock: one whose worker is gone (to resume),
        else a new suggestion. With nothing to claim, the trial is None and the text says why."""
        with self._locked_state():
            for trial in self._running():
                # a process that dies loses its locks (the kernel, or for a lost node the NFS server when its lease
                # ends, drops them): a claim we can take means nobody runs that trial any more
                claim = try_lock(self._claim_path(trial))
                if claim:
                    note = f"taken over from {owner(trial)}, which is gone: resuming it"
                    return self._own(trial), claim, note
            if max_runs is not None and len(self.trials) >= max_runs:
                return None, None, f"the sweep has its {max_runs} trials (--max_runs)"
            suggestion = _sweeps().next_run(self.config, self._sweep_runs(), validate=False)
            if suggestion is None:
                return None, None, f"all {len(self.trials)} points of the grid are taken"
            trial = {"name": self._new_name(), "status": "running", "metric": None,
                     "params": suggested_params(suggestion)}
            claim = try_lock(self._claim_path(trial))
            if claim is None:  # a name the state has never listed, yet someone runs it
                raise UsageError(f"{self._claim_path(trial)} is held by a worker although {STATE_FILE} does not list "
                                 f"{trial['name']}: was the state file deleted while workers ran?")
            self.trials.append(trial)
            return self._own(trial), claim, "new"

    def _new_name(self) -> str:
        """The next trial-NNN that the state does not list and no folder holds: the folder of a trial the state does
        not list (the state was moved aside) is kept, never resumed by a trial with other values."""
        listed = {t["name"] for t in self.trials}
        number = len(self.trials) + 1
        while f"trial-{number:03d}" in listed or (self.root / f"trial-{number:03d}").exists():
            number += 1
        return f"trial-{number:03d}"

    def _running(self) -> list[dict]:
        return [t for t in self.trials if t["status"] == "running"]

    def _own(self, trial: dict) -> dict:
        trial["owner"] = self.me  # for the messages only: the claim lock, not this, says whether the owner lives
        self._save_state()
        return trial

    def _sweep_runs(self) -> list:
        """Every trial as the sweep engine's runs, those in flight as running: a grid then never hands one point to
        two workers, and bayes knows what is being tried."""
        sweeps = _sweeps()
        states = {"finished": sweeps.RunState.finished, "running": sweeps.RunState.running}
        return [sweeps.SweepRun(name=t["name"], config={k: {"value": v} for k, v in t["params"].items()},
                                state=states.get(t["status"], sweeps.RunState.failed),
                                summary_metrics={self.metric: t["metric"]} if t["metric"] is not None else {})
                for t in self.trials]

    def _record(self, trial: dict, code: int) -> str:
        """Under the state lock, the trial's result; its claim file goes (claims are looked at only under this lock,
        and only for running trials, so nobody can be locking it)."""
        with self._locked_state():
            trial = next(t for t in self.trials if t["name"] == trial["name"])
            trial["metric"] = best_metric(self.root / trial["name"] / "metrics.jsonl", self.metric, self.goal)
            trial["status"] = "finished" if code == 0 else f"failed (exit {code})"
            self._save_state()
            self._claim_path(trial).unlink(missing_ok=True)
        return trial["status"]

    # ---- running ----
    def flags_of(self, trial: dict) -> list[str]:
        """A trial's training flags as shown to the user: its values, those given here replacing the file's."""
        given = {flag[2:].split("=", 1)[0] for flag in self.passthrough}
        return [*agent_args({k: v for k, v in trial["params"].items() if k not in given}), *self.passthrough]

    def command(self, trial: dict) -> list[str]:
        args = trial_args(trial["params"], self.root, trial["name"], self.report_to, self.passthrough)
        return [sys.executable, str(self.program), *args]

    def run(self, max_runs: int | None, count: int | None) -> int:
        """Claims and runs trials until there is nothing to claim or this worker has run `count` of them."""
        statuses = []
        while count is None or len(statuses) < count:
            trial, claim, note = self._claim(max_runs)
            if trial is None:
                print(f"\nnothing to claim: {note}.{self._others_running()}", flush=True)
                break
            with claim:  # held (by us and the child) while the trial trains: other workers see it taken
                print(f"\n=== {trial['name']}: {' '.join(self.flags_of(trial))}", flush=True)
                if note != "new":
                    print(f"({note})", flush=True)
                code = self._run_child(self.command(trial), claim)
                if code in INTERRUPTED:
                    print(f"sweep interrupted during {trial['name']} (its checkpoint is saved); run the same command "
                          f"again (or any worker of this sweep) to resume it and continue the sweep.", file=sys.stderr)
                    return code if code > 0 else 128 - code
                statuses.append(self._record(trial, code))
        else:
            print(f"\nthis worker has run its {count} trial(s) (--count).", flush=True)
        self.print_ranking()  # of every worker's trials: the state as last read under the lock, just now
        if statuses and "finished" not in statuses:
            print("every trial failed: see the messages above.", file=sys.stderr)
            return 1
        return 0

    def _others_running(self) -> str:
        running = [f"{t['name']} ({owner(t)})" for t in self._running()]
        return f" Still running: {', '.join(running)}." if running else ""

    @staticmethod
    def _run_child(cmd: list[str], claim: IO) -> int:
        """The child inherits the claim lock, so the trial stays taken until the worker AND the child are gone (a
        worker killed alone leaves a child still training or saving). Ctrl-C in a terminal reaches the child by itself
        (same process group), so we ignore it and wait for the child to save; a SIGTERM sent to the worker alone
        (`kill`, `docker stop`) is passed on, and the child saves and stops."""
        child = None
        stopping = []

        def pass_on(signum, frame):
            stopping.append(signum)
            if child is not None:
                child.send_signal(signum)

        previous = {signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN),
                    signal.SIGTERM: signal.signal(signal.SIGTERM, pass_on)}
        try:
            child = subprocess.Popen(cmd, pass_fds=(claim.fileno(),))
            if stopping:  # it came while the child was being started
                child.send_signal(signal.SIGTERM)
            return child.wait()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def ranked(self) -> list[dict]:
        scored = [t for t in self.trials if t["metric"] is not None and math.isfinite(t["metric"])]
        return sorted(scored, key=lambda t: t["metric"], reverse=self.goal == "maximize")

    def print_ranking(self) -> None:
        ranked = self.ranked()
        shown = varying([t["params"] for t in self.trials])
        print(f"\n{'rank':<5}{'trial':<11}{self.metric:>12}  " + "  ".join(shown))
        for i, t in enumerate(ranked, 1):
            values = "  ".join(f"{k}={t['params'].get(k)}" for k in shown)  # .get: a hand-edited state may lack one
            print(f"{i:<5}{t['name']:<11}{t['metric']:>12.4f}  {values}")
        for t in self.trials:
            if t not in ranked:
                status = f"running ({owner(t)})" if t["status"] == "running" else t["status"]
                print(f"{'-':<5}{t['name']:<11}{'-':>12}  {status}")
        if ranked:
            best = ranked[0]
            print(f"\nbest: {best['name']} ({self.metric} {best['metric']:.4f})\n  python {self.program} "
                  + " ".join(self.flags_of(best)))
        print(f"compare the trials: tensorboard --logdir {self.root}")


def sweep_command(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpt_trainer.sweep", description=__doc__.split("\n")[0],
                                     epilog=__doc__.split("\n\n")[-1], allow_abbrev=False)
    parser.add_argument("sweep_file", help="a wandb sweep YAML, e.g. sweep_config.yaml")
    parser.add_argument("--max_runs", type=int, default=None,
                        help="the sweep's number of trials, all workers together: none is started once the sweep has "
                             "this many (grid: all by default)")
    parser.add_argument("--count", type=int, default=None,
                        help="this worker runs at most this many trials, taken-over ones included (default: until "
                             "there is nothing left to claim)")
    parser.add_argument("--output_dir", default="output_sweep", help="one folder per trial below this")
    parser.add_argument("--report_to", default="tensorboard",
                        help="trackers for each trial, as for training: a comma-separated list of "
                             f"{', '.join(tracking.BACKENDS)}, or all, or none (wandb and swanlab log offline without "
                             "a key)")
    parser.add_argument("--check", action="store_true",
                        help="only validate the file (and the training flags given), and show each trial's flags")
    parser.usage = f"{parser.format_usage().removeprefix('usage: ').rstrip()} [TRAINING FLAGS...]"
    args, extra = parser.parse_known_args(argv)
    tracking.chosen(args.report_to)  # a bad list stops here, before the first trial
    config = load_sweep(args.sweep_file)
    passthrough = passthrough_flags(extra, config, args.sweep_file)
    checked = check_trials(config, args.sweep_file, Path(args.output_dir), args.report_to, passthrough)
    for flag in ("max_runs", "count"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise UsageError(f"--{flag} must be at least 1, not {getattr(args, flag)}.")
    if args.max_runs is None and args.count is None and config["method"] != "grid" and not args.check:
        raise UsageError(f"a {config['method']} sweep never runs out of trials: pass --max_runs N (the sweep's "
                         f"total) or --count N (this worker's share).")
    if args.check:
        return check_only(config, args, passthrough, checked)
    refusal = runner_set_in_file(config, args.sweep_file)
    if refusal:
        raise UsageError(refusal)
    for note in replaced_fixed_values(passthrough, config, args.sweep_file):
        print(note, flush=True)
    sweep = LocalSweep(config, args.sweep_file, Path(args.output_dir), args.report_to, passthrough)
    return sweep.run(args.max_runs, args.count)


def check_only(config: dict, args: argparse.Namespace, passthrough: list[str], checked: str) -> int:
    program = config.get("program", "train_single_gpu.py")
    if not Path(program).is_file():  # `wandb agent` runs the program from the folder it is started in
        raise UsageError(f"the sweep's program {program} is not found from {Path.cwd()}, and `wandb agent` runs "
                         f"it from the folder it is started in. Start the agent (and this check) where "
                         f"{program} is, or give its path in the sweep file's `program:`.")
    print(f"{args.sweep_file}: valid {config['method']} sweep over {', '.join(config['parameters'])}; "
          f"train_single_gpu.py accepts each of the {checked}")
    print(effective_flags(config, passthrough, Path(args.output_dir), args.report_to))
    for note in replaced_fixed_values(passthrough, config, args.sweep_file):
        print(note)
    refusal = runner_set_in_file(config, args.sweep_file)
    if refusal:
        print(f"note: for `wandb agent` only: the local runner refuses this file. {refusal}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(sweep_command, argv, AGAIN)


if __name__ == "__main__":
    sys.exit(main())
