import itertools
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gpt_trainer import cli, sweep
from gpt_trainer.config import parse_args
from gpt_trainer.sweep import agent_args, load_sweep, main
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


def test_the_top_level_grid_is_the_one_asked_for():
    params = load_sweep(str(ROOT / "sweep_config.yaml"))["parameters"]
    assert params["batch_size"]["values"] == [8, 16, 32]
    assert params["learning_rate"]["values"] == [1e-5, 5e-5, 1e-4]
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
        assert (resolved["batch_size"], resolved["learning_rate"], resolved["use_chinese"]) == \
            (combo["batch_size"], combo["learning_rate"], True)


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
