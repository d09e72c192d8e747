import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from gpt_trainer.commands import sweep
from gpt_trainer.commands import train as cli
from gpt_trainer.commands.sweep import agent_args, load_sweep, main
from gpt_trainer.config import parse_args
from tests.conftest import CLASSIC_POEMS, TINY_SHAPE, interrupt_after_lines
from tests.swanlab_offline import run_folders

ROOT = Path(__file__).resolve().parents[1]
SWEEP_FILES = [ROOT / "sweep_config.yaml", *sorted((ROOT / "examples" / "sweeps").glob("*.yaml"))]


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: p.name)
def test_every_sweep_file_validates_against_wandbs_schema_and_names_real_flags(path):
    config = load_sweep(str(path))  # raises on a schema violation or an unknown flag
    assert config["metric"] == {"name": "eval/loss", "goal": "minimize"}
    # the agent runs the command's literal program: `python` (which the image has) or the torchrun launcher
    assert config["command"][1] in ("python", "torchrun") and "${args}" in config["command"]
    assert set(config["parameters"]) <= sweep.FLAGS
    sweep.check_trials(config, str(path), Path("output_sweep"), "tensorboard")  # no trial refused, alone or together


def test_the_top_level_grid_is_the_one_asked_for():
    params = load_sweep(str(ROOT / "sweep_config.yaml"))["parameters"]
    assert params["optimizer"]["value"] == "muon"  # explicit: the file does not depend on the default
    assert params["muon_learning_rate"]["values"] == [0.01, 0.02, 0.04]
    assert params["learning_rate"]["values"] == [1.5e-3, 3e-3, 6e-3]
    assert params["model_size"]["value"] == "tiny" and params["use_chinese"]["value"] is True


def test_every_grid_combination_as_the_agent_renders_it_passes_dry_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CHINESE_POETRY_BASE_URL", "http://127.0.0.1:9")  # no network: the offline fallbacks answer
    params = load_sweep(str(ROOT / "sweep_config.yaml"))["parameters"]
    grid = {k: v["values"] for k, v in params.items() if "values" in v}
    fixed = {k: v["value"] for k, v in params.items() if "value" in v}
    combos = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    assert len(combos) == 9
    for combo in combos:
        args = agent_args({**fixed, **combo})
        assert "--use_chinese=True" in args and any(a.startswith("--learning_rate=") for a in args)
        capsys.readouterr()
        assert cli.main([*args, "--dry_run", f"--cache_dir={tmp_path}", f"--output_dir={tmp_path / 'o'}"]) == 0
        resolved = json.loads(capsys.readouterr().out)
        assert (resolved["optimizer"], resolved["muon_learning_rate"], resolved["learning_rate"]) == \
            ("muon", combo["muon_learning_rate"], combo["learning_rate"])


def test_under_an_agent_each_run_gets_its_own_output_dir(monkeypatch):
    monkeypatch.setenv("WANDB_SWEEP_ID", "abc123")
    monkeypatch.setenv("WANDB_RUN_ID", "run42")
    assert cli.sweep_output_dir(parse_args([])) == os.path.join("output_sweeps", "abc123", "run42")
    assert cli.sweep_output_dir(parse_args(["--output_dir=mine"])) == "mine"


def test_sweep_values_are_left_out_of_our_wandb_config(tmp_path, monkeypatch):
    from gpt_trainer.tracking.wandb import sweep_locked_keys
    params = tmp_path / "params.yaml"
    params.write_text("learning_rate:\n  value: 0.0001\nbatch_size:\n  value: 8\n")
    monkeypatch.setenv("WANDB_SWEEP_PARAM_PATH", str(params))
    assert sweep_locked_keys() == {"learning_rate", "batch_size"}


def tiny_sweep_params() -> dict:
    """The tests' tiny model shape as fixed sweep parameters (the runner picks the trackers itself)."""
    fixed = {a.split("=")[0][2:]: {"value": yaml.safe_load(a.split("=", 1)[1])} for a in TINY_SHAPE if "=" in a}
    fixed.pop("report_to")
    return fixed


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("text, message", [
    ("method: grid\nparameters:\n  batch_size: {values: [8, 16]\n", "not valid YAML at line 4"),
    ("method: sometimes\nparameters:\n  batch_size: {values: [8]}\n", "'sometimes' is not one of"),
    ("method: grid\nparameters:\n  batch_sise: {values: [8]}\n",
     "`batch_sise` is not a flag of train_single_gpu.py. Did you mean `batch_size`?"),
    ("method: grid\nparameters:\n  learning_rate: {values: [1e-5, 1.0e-4]}\n",
     "`learning_rate` has '1e-5', which YAML reads as a string"),
    ("method: random\nparameters:\n  learning_rate: {distribution: log_uniform_values, min: 1e-5, max: 1.0e-3}\n",
     "`learning_rate` has '1e-5'"),
    ("- just\n- a list\n", "must be a mapping"),
])
def test_bad_sweep_files_exit_2_naming_the_line_or_key(tmp_path, capsys, text, message):
    assert main([write(tmp_path, "bad.yaml", text), "--check"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err


def test_check_fails_where_the_agent_would_not_find_the_program(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    assert main(["sweep_config.yaml", "--check"]) == 0
    monkeypatch.chdir(tmp_path)  # the file is valid, but an agent started here would not find train_single_gpu.py
    assert main([str(ROOT / "sweep_config.yaml"), "--check"]) == 2
    assert f"program train_single_gpu.py is not found from {tmp_path}" in capsys.readouterr().err


def test_the_trials_trackers_are_checked_before_the_first_trial(capsys):
    assert main([str(ROOT / "sweep_config.yaml"), "--report_to=tensorboard,swanlob"]) == 2
    assert "'swanlob'" in capsys.readouterr().err


def test_random_and_bayes_need_a_run_limit(capsys):
    assert main([str(ROOT / "examples" / "sweeps" / "random_tiny.yaml")]) == 2
    assert "--max_runs" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--count=0", "--max_runs=-1"])
def test_a_count_or_total_below_one_is_refused(tmp_path, capsys, flag):
    assert main([str(ROOT / "sweep_config.yaml"), f"--output_dir={tmp_path / 'sweep'}", flag]) == 2
    name, value = flag[2:].split("=")
    assert f"--{name} must be at least 1, not {value}." in capsys.readouterr().err
    assert not (tmp_path / "sweep").exists()


@pytest.mark.slow
def test_local_runner_completes_a_2x2_grid_ranks_it_and_skips_finished_trials_on_restart(tmp_path, cache_dir, capsys,
                                                                                         clean_wandb_env):
    fixed = tiny_sweep_params()
    config = {
        "program": str(ROOT / "train_single_gpu.py"), "method": "grid",
        "metric": {"name": "eval/loss", "goal": "minimize"},
        "parameters": {**fixed, "data_path": {"value": str(CLASSIC_POEMS)}, "cache_dir": {"value": str(cache_dir)},
                       "max_steps": {"value": 4}, "eval_interval": {"value": 2}, "fp32": {"value": True},
                       "learning_rate": {"values": [1.0e-4, 3.0e-3]}, "batch_size": {"values": [2, 4]}},
    }
    config["parameters"]["n_layer"] = {"value": 1}
    sweep_file = write(tmp_path, "grid.yaml", yaml.safe_dump(config))
    out = tmp_path / "sweep"
    assert main([sweep_file, f"--output_dir={out}", "--report_to=tensorboard,swanlab"]) == 0
    printed = capsys.readouterr().out
    state = json.loads((out / "sweep_state.json").read_text())["trials"]
    assert [t["status"] for t in state] == ["finished"] * 4
    assert {(t["params"]["learning_rate"], t["params"]["batch_size"]) for t in state} == \
        {(1e-4, 2), (1e-4, 4), (3e-3, 2), (3e-3, 4)}
    for t in state:  # each trial in its own folder with its own TensorBoard run
        rows = [json.loads(line) for line in (out / t["name"] / "metrics.jsonl").read_text().splitlines()]
        assert t["metric"] == min(r["eval/loss"] for r in rows if "eval/loss" in r)
        assert list((out / t["name"] / "logs").glob(f"{t['name']}/events.out.tfevents.*"))
        assert run_folders(out / t["name"] / "swanlog")  # and its own SwanLab record (offline: no key here)
    ranking = [line.split()[1] for line in printed.splitlines() if line[:1].isdigit()]
    assert ranking == [t["name"] for t in sorted(state, key=lambda t: t["metric"])]
    best = min(state, key=lambda t: t["metric"])
    assert f"best: {best['name']}" in printed and f"--learning_rate={best['params']['learning_rate']}" in printed

    assert main([sweep_file, f"--output_dir={out}"]) == 0  # restarted: nothing left to run
    assert "=== trial" not in capsys.readouterr().out
    assert json.loads((out / "sweep_state.json").read_text())["trials"] == state


@pytest.mark.slow
def test_an_interrupted_sweep_resumes_the_running_trial(tmp_path, cache_dir):
    fixed = tiny_sweep_params()
    config = {"program": str(ROOT / "train_single_gpu.py"), "method": "grid",
              "metric": {"name": "eval/loss", "goal": "minimize"},
              "parameters": {**fixed, "n_layer": {"value": 1}, "data_path": {"value": str(CLASSIC_POEMS)},
                             "cache_dir": {"value": str(cache_dir)}, "max_steps": {"value": 300},
                             "log_interval": {"value": 1}, "eval_interval": {"value": 300},
                             "learning_rate": {"values": [1.0e-3, 2.0e-3]}}}
    sweep_file = write(tmp_path, "grid.yaml", yaml.safe_dump(config))
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "gpt_trainer.sweep", sweep_file, f"--output_dir={out}"]
    code, err = interrupt_after_lines(cmd, out / "trial-001" / "metrics.jsonl", 5, signal.SIGINT, group=True, cwd=ROOT)
    assert code == 130, err
    assert "run the same command again" in err
    state = json.loads((out / "sweep_state.json").read_text())["trials"]
    assert [t["status"] for t in state] == ["running"]

    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert f"resumed from {out / 'trial-001' / 'checkpoints' / 'latest.pt'}" in again.stdout
    state = json.loads((out / "sweep_state.json").read_text())["trials"]
    assert [t["status"] for t in state] == ["finished", "finished"]


@pytest.mark.parametrize("parameter, values, named", [
    ("learning_rate", [-1, 0], ["-1: --learning_rate must be", "0: --learning_rate must be"]),
    ("batch_size", [0], ["0: --batch_size must be at least 1"]),
])
def test_check_refuses_a_sweep_whose_values_are_all_invalid(tmp_path, capsys, parameter, values, named):
    config = {"program": str(ROOT / "train_single_gpu.py"), "method": "grid",
              "parameters": {parameter: {"values": values}}}
    assert main([write(tmp_path, "bad.yaml", yaml.safe_dump(config)), "--check"]) == 2
    err = capsys.readouterr().err
    assert f"parameter `{parameter}` has values train_single_gpu.py would refuse" in err
    assert all(n in err for n in named)
    config["parameters"][parameter] = {"values": [1.0e-3, 2.0e-3] if parameter == "learning_rate" else [4, 8]}
    assert main([write(tmp_path, "good.yaml", yaml.safe_dump(config)), "--check"]) == 0  # the control


def test_the_local_runner_exits_1_when_every_trial_failed(tmp_path, cache_dir, capsys):
    """A missing --data_path is a valid flag value (--check cannot see it), so each trial fails only when it runs."""
    config = {"program": str(ROOT / "train_single_gpu.py"), "method": "grid",
              "parameters": {"data_path": {"value": str(tmp_path / "no-such-corpus.txt")},
                             "cache_dir": {"value": str(cache_dir)}, "max_steps": {"value": 2},
                             "learning_rate": {"values": [1.0e-3, 2.0e-3]}}}
    sweep_file = write(tmp_path, "grid.yaml", yaml.safe_dump(config))
    assert main([sweep_file, "--check"]) == 0
    out = tmp_path / "sweep"
    assert main([sweep_file, f"--output_dir={out}", "--report_to=none"]) == 1
    assert "every trial failed" in capsys.readouterr().err
    state = json.loads((out / "sweep_state.json").read_text())["trials"]
    assert [t["status"] for t in state] == ["failed (exit 2)"] * 2


# ---- several workers on one sweep -----------------------------------------------------------------------------------
# A quick program stands in for train_single_gpu.py: it takes the same arguments, logs each start (with its worker's
# pid) to FAKE_LOG, trains for a random 0.2-1 s (so that the workers' claims interleave and a race is likely), and
# writes a metrics.jsonl as training does. FAKE_WAIT_FOR=N holds each trial until N trials have started (the first
# N can only start on N different workers, so every worker gets one); FAKE_HANG=1 keeps it running until it is
# signalled. On SIGTERM it logs that it saved and exits 143, as training does.
FAKE_PROGRAM = r'''
import json, os, random, signal, sys, time
from pathlib import Path

args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if "=" in a)
log = os.environ["FAKE_LOG"]


def note(event):
    line = json.dumps({"event": event, "output_dir": args["output_dir"], "resume": "--resume" in sys.argv,
                       "worker": os.getppid(), "argv": sys.argv[1:]}) + "\n"
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.write(fd, line.encode())  # one small appending write: lines of concurrent trials do not mix
    os.close(fd)


def save_and_stop(signum, frame):
    note("saved")
    sys.exit(128 + signum)


signal.signal(signal.SIGTERM, save_and_stop)
note("start")
deadline = time.time() + 20
while time.time() < deadline and sum('"start"' in line for line in open(log)) < int(os.environ.get("FAKE_WAIT_FOR", 0)):
    time.sleep(0.05)
time.sleep(30 if os.environ.get("FAKE_HANG") else random.uniform(0.2, 1.0))
Path(args["output_dir"]).mkdir(parents=True, exist_ok=True)
loss = float(args["learning_rate"]) * 1000 + float(args.get("batch_size", 0))
Path(args["output_dir"], "metrics.jsonl").write_text(json.dumps({"step": 1, "eval/loss": loss}) + "\n")
'''


def fake_sweep(tmp_path, parameters: dict, method: str = "grid") -> str:
    program = tmp_path / "fake_train.py"
    program.write_text(FAKE_PROGRAM)
    config = {"program": str(program), "method": method, "metric": {"name": "eval/loss", "goal": "minimize"},
              "parameters": parameters}
    return write(tmp_path, f"{method}.yaml", yaml.safe_dump(config))


def start_worker(sweep_file: str, out: Path, *flags: str, group: bool = False, **env: str) -> subprocess.Popen:
    """A worker as a user starts one: its own process, here with the fake program's settings in its environment."""
    return subprocess.Popen([sys.executable, "-m", "gpt_trainer.sweep", sweep_file, f"--output_dir={out}",
                             "--report_to=none", *flags], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=group, env={**os.environ, "PYTHONUNBUFFERED": "1", **env})


def finish(worker: subprocess.Popen, timeout: float = 120) -> str:
    out, err = worker.communicate(timeout=timeout)
    assert worker.returncode == 0, err
    return out


def logged(log: Path, event: str = "start") -> list[dict]:
    rows = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return [row for row in rows if row["event"] == event]


def wait_until(condition, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def trials(out: Path) -> list[dict]:
    return json.loads((out / "sweep_state.json").read_text())["trials"]


def test_three_workers_started_together_run_each_grid_point_exactly_once(tmp_path):
    sweep_file = fake_sweep(tmp_path, {"learning_rate": {"values": [1.0e-4, 2.0e-4, 3.0e-4]},
                                       "batch_size": {"values": [2, 4]}})
    out, log = tmp_path / "sweep", tmp_path / "log.jsonl"
    workers = [start_worker(sweep_file, out, FAKE_LOG=str(log), FAKE_WAIT_FOR="3") for _ in range(3)]
    printed = [finish(w) for w in workers]

    starts = logged(log)
    folders = [s["output_dir"] for s in starts]
    assert len(folders) == 6 and len(set(folders)) == 6  # six trials, none run twice
    assert {s["worker"] for s in starts} == {w.pid for w in workers}  # each worker ran at least one
    state = trials(out)
    assert [t["status"] for t in state] == ["finished"] * 6
    assert sorted((t["params"]["learning_rate"], t["params"]["batch_size"]) for t in state) == \
        sorted(itertools.product([1e-4, 2e-4, 3e-4], [2, 4]))  # every grid point, once
    assert sorted(folders) == sorted(str(out / t["name"]) for t in state)
    for t in state:  # the owner recorded is the worker that ran it
        assert t["metric"] is not None and t["owner"]["pid"] in {s["worker"] for s in starts
                                                               if s["output_dir"] == str(out / t["name"])}
    for text in printed:  # each worker's ranking covers all trials, whoever ran them
        assert "nothing to claim: all 6 points of the grid are taken" in text
        assert all(f" {t['name']} " in text for t in state)
    assert not list(out.glob("*.claim"))  # claims of finished trials are removed


def test_a_dead_workers_trial_is_resumed_by_the_next_worker_and_a_live_ones_is_left_alone(tmp_path):
    sweep_file = fake_sweep(tmp_path, {"learning_rate": {"values": [1.0e-4, 2.0e-4]}})
    out, log = tmp_path / "sweep", tmp_path / "log.jsonl"
    first = start_worker(sweep_file, out, "--count=1", group=True, FAKE_LOG=str(log), FAKE_HANG="1")
    try:
        wait_until(lambda: logged(log))
        # while the first worker lives, a second one leaves its trial alone and takes the other grid point
        second = finish(start_worker(sweep_file, out, FAKE_LOG=str(log)))
        assert [(s["output_dir"], s["worker"]) for s in logged(log)][0] == (str(out / "trial-001"), first.pid)
        assert [s["output_dir"] for s in logged(log)] == [str(out / "trial-001"), str(out / "trial-002")]
        assert f"Still running: trial-001 (worker {socket.gethostname()}:{first.pid})" in second
        state = trials(out)
        assert [t["status"] for t in state] == ["running", "finished"]
        assert state[0]["owner"]["pid"] == first.pid and state[0]["params"] != state[1]["params"]
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the worker and its trial, as a node that dies
        first.wait()
    assert [t["status"] for t in trials(out)] == ["running", "finished"]  # nobody recorded anything

    third = start_worker(sweep_file, out, FAKE_LOG=str(log))
    printed = finish(third)
    assert f"taken over from worker {socket.gethostname()}:{first.pid}, which is gone: resuming it" in printed
    resumed = logged(log)[-1]
    assert len(logged(log)) == 3 and resumed["worker"] == third.pid
    assert resumed["output_dir"] == str(out / "trial-001") and resumed["resume"]  # the same folder, --resume
    state = trials(out)
    assert [t["status"] for t in state] == ["finished", "finished"] and state[0]["owner"]["pid"] == third.pid


def test_count_is_this_workers_share_and_max_runs_the_sweeps_total(tmp_path, monkeypatch, capsys):
    sweep_file = fake_sweep(tmp_path, {"learning_rate": {"values": [1.0e-4, 2.0e-4, 3.0e-4]}})
    out, log = tmp_path / "sweep", tmp_path / "log.jsonl"
    monkeypatch.setenv("FAKE_LOG", str(log))
    worker = [sweep_file, f"--output_dir={out}", "--report_to=none"]
    assert main([*worker, "--count=1", "--max_runs=2"]) == 0  # as one task of a job array
    assert len(logged(log)) == 1 and [t["status"] for t in trials(out)] == ["finished"]
    assert "this worker has run its 1 trial(s) (--count)" in capsys.readouterr().out
    assert main([*worker, "--count=1", "--max_runs=2"]) == 0
    assert len(logged(log)) == 2 and len(trials(out)) == 2
    capsys.readouterr()
    assert main([*worker, "--max_runs=2"]) == 0  # the sweep has its two: this worker starts none
    assert len(logged(log)) == 2 and "nothing to claim: the sweep has its 2 trials" in capsys.readouterr().out
    assert main(worker) == 0  # no total: the grid's last point
    assert len(logged(log)) == 3 and [t["status"] for t in trials(out)] == ["finished"] * 3

    random_file = fake_sweep(tmp_path, {"learning_rate": {"min": 1.0e-4, "max": 1.0e-3}}, method="random")
    assert main([random_file, f"--output_dir={tmp_path / 'random'}", "--count=1"]) == 0  # --count bounds it too
    assert len(trials(tmp_path / "random")) == 1 and len(logged(log)) == 4


def test_a_changed_sweep_file_is_refused_before_anything_runs(tmp_path, monkeypatch, capsys):
    sweep_file = fake_sweep(tmp_path, {"learning_rate": {"values": [1.0e-4]}})
    out, log = tmp_path / "sweep", tmp_path / "log.jsonl"
    monkeypatch.setenv("FAKE_LOG", str(log))
    assert main([sweep_file, f"--output_dir={out}", "--report_to=none"]) == 0
    fake_sweep(tmp_path, {"learning_rate": {"values": [1.0e-4, 2.0e-4]}})  # the same file, edited
    assert main([sweep_file, f"--output_dir={out}", "--report_to=none"]) == 2
    assert "holds a different sweep" in capsys.readouterr().err and len(logged(log)) == 1


def test_sigterm_sent_to_the_worker_alone_reaches_its_trial_which_saves_and_is_resumed_later(tmp_path):
    sweep_file = fake_sweep(tmp_path, {"learning_rate": {"values": [1.0e-4]}})
    out, log = tmp_path / "sweep", tmp_path / "log.jsonl"
    worker = start_worker(sweep_file, out, FAKE_LOG=str(log), FAKE_HANG="1")  # `kill` or `docker stop`: no group
    wait_until(lambda: logged(log))
    worker.send_signal(signal.SIGTERM)
    _, err = worker.communicate(timeout=60)
    assert worker.returncode == 128 + signal.SIGTERM and "run the same command again" in err
    assert [s["output_dir"] for s in logged(log, "saved")] == [str(out / "trial-001")]
    assert [t["status"] for t in trials(out)] == ["running"]
    finish(start_worker(sweep_file, out, FAKE_LOG=str(log)))
    assert logged(log)[-1]["resume"] and [t["status"] for t in trials(out)] == ["finished"]


@pytest.mark.slow
def test_two_workers_train_a_2_point_grid_in_parallel_with_the_real_program(tmp_path, cache_dir, clean_wandb_env):
    config = {"program": str(ROOT / "train_single_gpu.py"), "method": "grid",
              "metric": {"name": "eval/loss", "goal": "minimize"},
              "parameters": {**tiny_sweep_params(), "n_layer": {"value": 1}, "data_path": {"value": str(CLASSIC_POEMS)},
                             "cache_dir": {"value": str(cache_dir)}, "max_steps": {"value": 4},
                             "eval_interval": {"value": 2}, "learning_rate": {"values": [1.0e-4, 3.0e-3]}}}
    sweep_file = write(tmp_path, "grid.yaml", yaml.safe_dump(config))
    out = tmp_path / "sweep"
    workers = [start_worker(sweep_file, out) for _ in range(2)]
    printed = "".join(finish(w, timeout=300) for w in workers)
    state = trials(out)
    assert [t["status"] for t in state] == ["finished", "finished"]
    assert sorted(t["params"]["learning_rate"] for t in state) == [1e-4, 3e-3]
    for t in state:  # each trial ran once, in its own folder, and its metric is its own folder's
        assert printed.count(f"=== {t['name']}:") == 1
        rows = [json.loads(line) for line in (out / t["name"] / "metrics.jsonl").read_text().splitlines()]
        assert t["metric"] == min(r["eval/loss"] for r in rows if "eval/loss" in r)
        assert (out / t["name"] / "checkpoints" / "latest.pt").exists()


# ---- values refused together: each trial's command line checked before the first trial -----------------------------
METRIC = {"name": "eval/loss", "goal": "minimize"}


@pytest.mark.parametrize("method, refused, accepted, named", [
    ("grid", {"learning_rate": {"values": [1.0e-3, 2.0e-2]}, "min_lr": {"value": 1.0e-2}},
     {"learning_rate": {"values": [1.0e-2, 2.0e-2]}, "min_lr": {"value": 1.0e-2}},
     ["refuses 1 of the 2 trials checked (every point of the grid)",
      "(1) `--learning_rate=0.001`: --min_lr 0.01 is above --learning_rate 0.001"]),
    ("grid", {"use_chinese": {"value": True}, "data_path": {"values": ["a.txt", "b.txt"]}},
     {"use_chinese": {"value": False}, "data_path": {"values": ["a.txt", "b.txt"]}},
     ["refuses 2 of the 2 trials", "(1) `--data_path=a.txt`: --use_chinese asks for the Chinese poetry corpus, but "
      "--data_path a.txt names other text", "(2) `--data_path=b.txt`"]),
    ("random", {"learning_rate": {"distribution": "log_uniform_values", "min": 1.0e-4, "max": 1.0e-2},
                "min_lr": {"distribution": "uniform", "min": 0.0, "max": 1.0e-3}},
     {"learning_rate": {"distribution": "log_uniform_values", "min": 1.0e-3, "max": 1.0e-2},
      "min_lr": {"distribution": "uniform", "min": 0.0, "max": 1.0e-3}},
     ["refuses 1 of the 4 trials checked (every combination of each parameter's fixed or listed values and the ends "
      "of its range)", "`--learning_rate=0.0001 --min_lr=0.001`: --min_lr 0.001 is above --learning_rate 0.0001"]),
    ("bayes", {"n_head": {"values": [4, 6]}, "n_embd": {"distribution": "int_uniform", "min": 96, "max": 128}},
     {"n_head": {"values": [4, 8]}, "n_embd": {"distribution": "q_uniform", "min": 96, "max": 128, "q": 8}},
     ["refuses 1 of the 4 trials", "`--n_embd=128 --n_head=6`: n_embd=128 is not divisible by n_head=6"]),
])
def test_check_refuses_values_that_the_training_command_refuses_together(tmp_path, capsys, method, refused, accepted,
                                                                         named):
    """Each value alone is fine; together they are not, in some trials or all."""
    config = {"program": str(ROOT / "train_single_gpu.py"), "method": method, "metric": METRIC, "parameters": refused}
    for name, spec in refused.items():
        assert sweep.refused_values(name, spec) == []
    assert main([write(tmp_path, "bad.yaml", yaml.safe_dump(config)), "--check"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and all(n in err for n in named), err
    config["parameters"] = accepted  # the control
    assert main([write(tmp_path, "good.yaml", yaml.safe_dump(config)), "--check"]) == 0
    assert "train_single_gpu.py accepts each of the" in capsys.readouterr().out


def test_the_refusal_named_is_the_training_commands_own_and_nothing_runs(tmp_path, capsys):
    parameters = {"use_chinese": {"value": True}, "data_path": {"values": ["a.txt", "b.txt"]}}
    sweep_file = fake_sweep(tmp_path, parameters)
    out = tmp_path / "sweep"
    assert main([sweep_file, f"--output_dir={out}"]) == 2  # a real run is checked as --check is
    said = capsys.readouterr().err
    assert cli.main(["--use_chinese=True", "--data_path=a.txt", f"--output_dir={tmp_path / 'o'}"]) == 2
    training_said = capsys.readouterr().err.removeprefix("error: ").strip()
    assert f"`--data_path=a.txt`: {training_said}" in said
    assert not out.exists() and not (tmp_path / "o").exists()


def test_the_ends_of_a_range_are_the_values_the_sweep_engine_draws_between():
    assert sweep.parameter_values("warmup_steps", {"distribution": "int_uniform", "min": 0, "max": 500}) == [0, 500]
    assert sweep.parameter_values("learning_rate", {"distribution": "log_uniform_values", "min": 1.0e-4,
                                                    "max": 3.0e-3}) == [1e-4, 3e-3]
    # log_uniform's min and max are natural logarithms: e^-9.2 and e^-4.6, not -9.2 (which would be refused)
    spec = {"distribution": "log_uniform", "min": -9.2, "max": -4.6}
    assert sweep.parameter_values("learning_rate", spec) == pytest.approx([1.0104e-4, 1.0052e-2], rel=1e-3)
    assert sweep.refused_values("learning_rate", spec) == []
    # a normal distribution has no ends: its 0.1 and 99.9 percentiles, here below 0 for dropout
    spec = {"distribution": "normal", "mu": 0.1, "sigma": 0.05}
    assert sweep.parameter_values("dropout", spec) == pytest.approx([0.1 - 0.1545, 0.1 + 0.1545], abs=1e-3)
    assert [value for value, _ in sweep.refused_values("dropout", spec)] == sweep.parameter_values("dropout", spec)[:1]


# ---- the state file, damaged: refused and left as it is ---------------------------------------------------------
def one_trial_done(tmp_path, monkeypatch) -> tuple[str, Path, Path]:
    """A two-point sweep (the fake program) with its first trial finished: the sweep file, its folder, the fake log."""
    sweep_file = fake_sweep(tmp_path, {"learning_rate": {"values": [1.0e-4, 2.0e-4]}})
    out, log = tmp_path / "sweep", tmp_path / "log.jsonl"
    monkeypatch.setenv("FAKE_LOG", str(log))
    assert main([sweep_file, f"--output_dir={out}", "--report_to=none", "--count=1"]) == 0
    assert [t["status"] for t in trials(out)] == ["finished"]
    return sweep_file, out, log


def first_trial(change):
    """A damage to the state file: a change to its first trial."""
    def damage(data: bytes) -> bytes:
        state = json.loads(data)
        change(state["trials"][0])
        return json.dumps(state).encode()
    return damage


DAMAGES = {  # what a full disk, a killed editor or a hand edit leaves; and the words that name it
    "truncated": (lambda data: data[:len(data) // 2], "it is not valid JSON ("),
    "empty": (lambda data: b"", "it is empty"),
    "a list": (lambda data: b"[]", "it holds [], not the mapping of `fingerprint` and `trials` a sweep writes"),
    "trials not a list": (lambda data: json.dumps({**json.loads(data), "trials": {}}).encode(),
                          "its `trials` is {}, not a list"),
    "a trial without params": (first_trial(lambda t: t.pop("params")), "its trial #1 (trial-001) has no `params`"),
    "params a list": (first_trial(lambda t: t.update(params=[1])),
                      "its trial #1 (trial-001) has `params` [1], not a mapping"),
    "metric a string": (first_trial(lambda t: t.update(metric="low")), "has `metric` \"low\", not a number or null"),
    "name a number": (first_trial(lambda t: t.update(name=7)), "its trial #1 has `name` 7, not a name such as"),
    "name a path": (first_trial(lambda t: t.update(name="../elsewhere")), "has `name` \"../elsewhere\", not a name"),
    "status null": (first_trial(lambda t: t.update(status=None)), "has `status` null, not running, finished or"),
    "not UTF-8": (lambda data: data.replace(b'"finished"', b'"fini\xe9"'), "it is not UTF-8 text (byte offset"),
}


@pytest.mark.parametrize("damage", DAMAGES, ids=list(DAMAGES))
def test_a_damaged_state_file_is_refused_and_left_byte_for_byte(tmp_path, monkeypatch, capsys, damage):
    sweep_file, out, log = one_trial_done(tmp_path, monkeypatch)
    change, words = DAMAGES[damage]
    state = out / "sweep_state.json"
    state.write_bytes(change(state.read_bytes()))
    before = state.read_bytes()
    capsys.readouterr()
    assert main([sweep_file, f"--output_dir={out}", "--report_to=none"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {state} is damaged: ") and words in err, err
    assert f"move it aside (`mv {state} {state}.damaged`)" in err and "Traceback" not in err
    assert state.read_bytes() == before and len(logged(log)) == 1  # never reset, and nothing ran


def test_after_a_damaged_state_is_moved_aside_new_trials_never_reuse_the_kept_folders(tmp_path, monkeypatch):
    sweep_file, out, log = one_trial_done(tmp_path, monkeypatch)
    kept = (out / "trial-001" / "metrics.jsonl").read_text()
    state = out / "sweep_state.json"
    state.write_text("")
    os.replace(state, out / "sweep_state.json.damaged")  # what the message says to do
    assert main([sweep_file, f"--output_dir={out}", "--report_to=none"]) == 0
    assert [t["name"] for t in trials(out)] == ["trial-002", "trial-003"]  # the grid again, after the kept folder
    assert [s["output_dir"] for s in logged(log)[1:]] == [str(out / "trial-002"), str(out / "trial-003")]
    assert (out / "trial-001" / "metrics.jsonl").read_text() == kept


# ---- the sweep's folder ---------------------------------------------------------------------------------------------
def test_a_folder_with_files_no_sweep_wrote_is_refused_and_an_earlier_sweeps_is_continued(tmp_path, monkeypatch,
                                                                                        capsys):
    sweep_file = fake_sweep(tmp_path, {"learning_rate": {"values": [1.0e-4, 2.0e-4]}})
    monkeypatch.setenv("FAKE_LOG", str(tmp_path / "log.jsonl"))
    mine = tmp_path / "mine"
    (mine / "data").mkdir(parents=True)
    (mine / "notes.txt").write_text("my notes\n")
    assert main([sweep_file, f"--output_dir={mine}", "--report_to=none"]) == 2
    assert f"--output_dir {mine} already holds files no sweep wrote (data, notes.txt)" in capsys.readouterr().err
    assert sorted(p.name for p in mine.iterdir()) == ["data", "notes.txt"]

    starting = tmp_path / "starting"  # what workers started together see of each other before the marker is written
    starting.mkdir()
    for name in (".write-probe-x1y2", "sweep_state.lock", "trial-001.claim", "trial-001"):
        (starting / name).touch()
    assert sweep.foreign_entries(starting) == []

    out = tmp_path / "sweep"  # a sweep's folder: marked, and continued (a moved-aside file of it is not foreign)
    assert main([sweep_file, f"--output_dir={out}", "--report_to=none", "--count=1"]) == 0
    assert (out / sweep.MARKER).exists()
    (out / "notes.txt").write_text("what I saw\n")
    assert main([sweep_file, f"--output_dir={out}", "--report_to=none"]) == 0
    assert [t["status"] for t in trials(out)] == ["finished", "finished"]

    earlier = tmp_path / "earlier"  # the folder of a version before the marker: its state file says it is a sweep's
    assert main([sweep_file, f"--output_dir={earlier}", "--report_to=none", "--count=1"]) == 0
    (earlier / sweep.MARKER).unlink()
    (earlier / "notes.txt").write_text("what I saw\n")  # the user's, beside a sweep's state: still a sweep's folder
    assert main([sweep_file, f"--output_dir={earlier}", "--report_to=none"]) == 0
    assert [t["status"] for t in trials(earlier)] == ["finished", "finished"]


# ---- training flags after the sweep's own: for every trial --------------------------------------------------------
@pytest.mark.slow
def test_training_flags_after_the_sweeps_own_shorten_every_real_trial_and_are_kept_for_a_resumed_sweep(
        tmp_path, cache_dir, capsys, clean_wandb_env):
    config = {"program": str(ROOT / "train_single_gpu.py"), "method": "grid",
              "metric": {"name": "eval/loss", "goal": "minimize"},
              "parameters": {**tiny_sweep_params(), "n_layer": {"value": 1}, "data_path": {"value": str(CLASSIC_POEMS)},
                             "cache_dir": {"value": str(cache_dir)}, "max_steps": {"value": 400},
                             "eval_interval": {"value": 2}, "learning_rate": {"values": [1.0e-3, 2.0e-3, 3.0e-3]}}}
    sweep_file = write(tmp_path, "grid.yaml", yaml.safe_dump(config))
    out = tmp_path / "sweep"
    command = [sweep_file, f"--output_dir={out}", "--max_runs", "2", "--max_steps", "3", "--n_embd=16"]
    assert main(command) == 0
    printed = capsys.readouterr().out
    assert f"note: --max_steps=3 replaces {sweep_file}'s fixed max_steps: 400 in every trial." in printed
    state = json.loads((out / "sweep_state.json").read_text())
    assert state["passthrough"] == ["--max_steps=3", "--n_embd=16"]
    assert [t["status"] for t in state["trials"]] == ["finished"] * 2
    for trial in state["trials"]:  # the file's swept value, the flags given here over its fixed ones
        resolved = json.loads((out / trial["name"] / "config.json").read_text())
        assert (resolved["max_steps"], resolved["n_embd"]) == (3, 16)
        assert resolved["learning_rate"] == trial["params"]["learning_rate"]
        assert [r["step"] for r in map(json.loads, (out / trial["name"] / "metrics.jsonl").read_text().splitlines())
                if "train/loss" in r][-1] == 3
    assert "--max_steps=3 --n_embd=16" in printed.split("best: ")[1]  # the best trial's command, as it ran

    before = (out / "sweep_state.json").read_bytes()
    assert main([sweep_file, f"--output_dir={out}", "--max_runs=3", "--max_steps=5", "--n_embd=16"]) == 2
    err = capsys.readouterr().err
    assert (f"the sweep in {out} runs its trials with the training flags --max_steps=3 --n_embd=16 after the sweep's "
            f"own, and this command gives --max_steps=5 --n_embd=16") in err
    assert (out / "sweep_state.json").read_bytes() == before and not (out / "trial-003").exists()
    assert main([sweep_file, f"--output_dir={out}", "--max_runs=3", "--max_steps=3", "--n_embd", "16"]) == 0
    assert [t["status"] for t in trials(out)] == ["finished"] * 3  # the same flags, however written: continued


@pytest.mark.parametrize("flags, words", [
    (["--max_step", "10"], "--max_step is neither a flag of the sweep runner nor of train_single_gpu.py. Did you mean "
                           "--max_steps?"),
    (["--learning_rate=0.1"], "--learning_rate=0.1 names `learning_rate`, which"),
    (["--resume"], "--resume=True: the sweep runner sets --resume for each trial itself"),
    (["--wandb_run_name", "mine"], "the sweep runner sets --wandb_run_name for each trial itself"),
    (["--max_steps=0"], "--max_steps=0, given for every trial, is refused by train_single_gpu.py: --max_steps must be "
                        "at least 1."),
    (["--fp32=maybe"], "--fp32=maybe, given for every trial, is refused by train_single_gpu.py: argument --fp32: "
                       "expected a boolean"),
    (["--max_steps"], "--max_steps needs a value (e.g. --max_steps=VALUE)."),
    (["10"], "'10' after the sweep file is neither a flag nor a flag's value."),
    (["--n_embd=48", "--n_head=5"], "(given here), so they would fail at once"),  # refused together, as trials are
])
def test_a_bad_training_flag_after_the_sweeps_own_is_refused_with_a_sentence_and_nothing_written(tmp_path, capsys,
                                                                                                 flags, words):
    sweep_file = fake_sweep(tmp_path, {"learning_rate": {"values": [1.0e-4, 2.0e-4]}, "max_steps": {"value": 9}})
    for check in ([], ["--check"]):
        assert main([sweep_file, f"--output_dir={tmp_path / 'sweep'}", *check, *flags]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and words in err, err
        assert not (tmp_path / "sweep").exists()


def test_flags_after_the_sweeps_own_reach_each_trial_after_the_files_values(tmp_path, monkeypatch, capsys):
    sweep_file = fake_sweep(tmp_path, {"learning_rate": {"values": [1.0e-4, 2.0e-4]}, "max_steps": {"value": 9}})
    out, log = tmp_path / "sweep", tmp_path / "log.jsonl"
    monkeypatch.setenv("FAKE_LOG", str(log))
    assert main([sweep_file, f"--output_dir={out}", "--report_to=none", "--max_steps", "2", "--fp32"]) == 0
    for start in logged(log):  # argparse lets the later value win: ours come after the file's, before the runner's
        argv, own = start["argv"], f"--output_dir={start['output_dir']}"
        assert argv.index("--max_steps=9") < argv.index("--max_steps=2") < argv.index(own)
        assert "--fp32=True" in argv
    assert "note: --max_steps=2 replaces" in capsys.readouterr().out
    assert main([sweep_file, f"--output_dir={out}", "--report_to=none"]) == 2  # none given now: refused, not mixed
    assert "this command gives none" in capsys.readouterr().err
    assert len(logged(log)) == 2


def test_check_shows_each_trials_flags_and_those_given_here(tmp_path, capsys):
    sweep_file = fake_sweep(tmp_path, {"learning_rate": {"values": [1.0e-4, 2.0e-4]}, "max_steps": {"value": 9},
                                       "fp32": {"value": True}})
    assert main([sweep_file, "--check", "--output_dir=o", "--max_steps=3", "--n_layer", "1"]) == 0
    printed = capsys.readouterr().out
    assert ("every trial runs: --fp32=True --max_steps=3 --n_layer=1 (given here: --max_steps=3 --n_layer=1); swept: "
            "--learning_rate (values [0.0001, 0.0002]); and the local runner's own: --output_dir=o/trial-NNN "
            "--report_to=tensorboard --wandb_run_name=trial-NNN --resume") in printed
    assert f"note: --max_steps=3 replaces {sweep_file}'s fixed max_steps: 9 in every trial." in printed
    assert not Path("o").exists()


@pytest.mark.parametrize("parameter", ["output_dir", "report_to", "wandb_run_name", "resume"])
def test_a_sweep_file_setting_what_the_runner_sets_is_refused_locally_and_noted_by_check(tmp_path, capsys, parameter):
    value = {"output_dir": "elsewhere", "report_to": "wandb", "wandb_run_name": "mine", "resume": True}[parameter]
    sweep_file = fake_sweep(tmp_path, {"learning_rate": {"values": [1.0e-4]}, parameter: {"value": value}})
    assert main([sweep_file, f"--output_dir={tmp_path / 'sweep'}"]) == 2
    err = capsys.readouterr().err
    assert f"{sweep_file} sets {parameter}, which the local runner sets for each trial itself" in err
    assert "the file's value would be ignored" in err and not (tmp_path / "sweep").exists()
    assert main([sweep_file, "--check"]) == 0  # valid for `wandb agent`, which honours it: said, not refused
    assert "note: for `wandb agent` only: the local runner refuses this file." in capsys.readouterr().out
