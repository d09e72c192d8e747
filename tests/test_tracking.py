"""Tracking with the real libraries: TensorBoard event files read back with TensorBoard's own EventAccumulator, and
wandb offline run files read back record by record (tests/wandb_offline.py)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gpt_trainer import tracking
from gpt_trainer.commands.train import main
from gpt_trainer.config import build_parser
from gpt_trainer.errors import UsageError
from gpt_trainer.system.distributed import World
from gpt_trainer.tracking import JsonlBackend, RunSummary, Tracker, start_tracking
from tests.conftest import files_containing, interrupt_after_lines, plan_for, scalars, script_env
from tests.swanlab_offline import finish_states, run_folders, scalar_steps
from tests.swanlab_offline import read_records as read_swanlab
from tests.wandb_offline import history_rows, read_records, run_files

ROOT = Path(__file__).resolve().parents[1]
FAKE_KEY = "FAKEKEY_" + "x7" * 20  # well-formed (40+ word characters) and easy to search for
pytestmark = pytest.mark.usefixtures("clean_wandb_env")


def wandb_steps(run_file: Path) -> dict:
    steps: dict = {}
    for row in history_rows(run_file):
        for key in row:
            if not key.startswith(("_", "global_step", "samples")):
                steps.setdefault(key, []).append(row["global_step"])
    return steps


def test_tensorboard_and_wandb_get_the_same_metrics_at_the_same_steps(poems_argv, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    assert main(poems_argv("--max_steps=12", "--eval_interval=6", "--wandb_log_model", "--wandb_tags=mine")) == 0
    out = tmp_path / "out"
    [logdir] = list((out / "logs").iterdir())
    assert re.fullmatch(r"tiny-poems\.txt-lr3e-3-bs4-\d{8}_\d{6}", logdir.name)  # muon: AdamW groups at 3e-3
    tb, acc = scalars(logdir)
    [run_file] = run_files(out)
    wb = wandb_steps(run_file)
    assert tb == wb
    expected = {"train/loss", "train/perplexity", "train/learning_rate", "train/muon_learning_rate", "train/grad_norm",
                "train/tokens_per_sec",
                "train/mfu", "train/epoch", "train/tokens_seen", "train/skipped_steps", "system/step_time_ms",
                "eval/loss", "eval/perplexity", "eval/best_perplexity", "epoch/train_loss", "epoch/val_loss",
                "epoch/val_perplexity", "final/best_perplexity", "final/total_steps", "final/total_epochs"}
    assert set(tb) == expected
    assert tb["train/loss"] == list(range(1, 13)) and tb["final/total_steps"] == [12]
    assert tb["eval/loss"] == sorted({6, 12, *tb["epoch/val_loss"]})  # every evaluation: interval or epoch end
    assert "_hparams_/session_start_info" in acc.PluginTagToContent("hparams")
    assert {"samples/春江/text_summary", "samples/往事/text_summary"} <= set(acc.Tags()["tensors"])
    records = read_records(run_file)
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert {"tiny", "fp32", "cpu", "mine"} <= set(run.tags) and "single-gpu" not in run.tags  # trained on the CPU
    assert run.display_name == logdir.name
    assert any(r.artifact.name == f"model-{run.run_id}" for r in records if r.WhichOneof("record_type") == "artifact")
    assert any(row.get("samples/_type") == "table-file" for row in history_rows(run_file))
    assert files_containing(tmp_path / "out", FAKE_KEY) == []


@pytest.mark.slow
def test_sigterm_and_resume_keep_every_tracker_continuous(poems_argv, tmp_path):
    env = script_env(WANDB_MODE="offline", WANDB_API_KEY=FAKE_KEY, HOME=os.environ["HOME"])
    args = poems_argv("--max_steps=100000", "--eval_interval=100000", "--save_interval=100000",
                      "--report_to=tensorboard,wandb,swanlab")
    metrics = tmp_path / "out" / "metrics.jsonl"
    code, err = interrupt_after_lines([sys.executable, str(ROOT / "train_single_gpu.py"), *args], metrics, 4, cwd=ROOT,
                                      env=env)
    assert code == 143, err
    stopped_at = len([1 for line in metrics.read_text().splitlines() if "train/loss" in line])
    resumed = subprocess.run([sys.executable, str(ROOT / "train_single_gpu.py"), *args, "--resume",
                              f"--max_steps={stopped_at + 3}"], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    [logdir] = list((tmp_path / "out" / "logs").iterdir())  # the same TensorBoard run continued
    assert scalars(logdir)[0]["train/loss"] == list(range(1, stopped_at + 4))
    first, second = run_files(tmp_path / "out")
    assert first.name == second.name  # the same wandb run id (offline resume writes a second folder)
    steps = wandb_steps(first)["train/loss"] + wandb_steps(second)["train/loss"]
    assert steps == list(range(1, stopped_at + 4))  # every row kept, none twice, none backwards
    assert f"wandb sync {first.parent} {second.parent}" in resumed.stderr  # both folders make up the run
    first, second = (read_swanlab(folder) for folder in run_folders(tmp_path / "out" / "swanlog"))
    assert finish_states(first) == ["RUN_STATE_ABORTED"]  # SIGTERM flushed it and marked it
    steps = scalar_steps(first)["train/loss"] + scalar_steps(second)["train/loss"]
    assert steps == list(range(1, stopped_at + 4))
    assert files_containing(tmp_path / "out", FAKE_KEY) == []


def test_only_the_main_process_logs(tiny_cfg, tmp_path):
    tracker = start_tracking(plan_for(tiny_cfg("--report_to=all"), world=World(rank=1, local_rank=1, size=2)))
    tracker.log({"train/loss": 1.0}, 1)
    tracker.close(RunSummary())
    assert tracker.backends == [] and not (tmp_path / "out").exists()


def test_the_tracker_state_loads_back_as_it_was_saved():
    saved = {"wandb_id": "abc123", "swanlab_id": None, "run_name": "tiny-poems"}
    tracker = Tracker()
    tracker.load_state_dict(saved)
    assert tracker.state_dict() == saved and tracker.run_name == "tiny-poems"


@pytest.mark.parametrize("report_to, trackers", [
    ("all", ["tensorboard", "wandb"]), ("none", []), ("tensorboard,swanlab", ["tensorboard", "swanlab"]),
    ("TensorBoard, wandb ,swanlab", ["tensorboard", "wandb", "swanlab"]), ("wandb,wandb", ["wandb"]),
])
def test_report_to_is_a_list_of_trackers(report_to, trackers):
    assert tracking.chosen(report_to) == trackers


@pytest.mark.parametrize("report_to, named", [("tensorbord", "'tensorbord'"), ("all,swanlab", "'all'"),
                                              ("none,wandb", "'none'"), (",", "")])
def test_report_to_refuses_unknown_names_with_the_known_ones(report_to, named):
    with pytest.raises(UsageError, match=f"is not a list of trackers \\({named}\\). Give a comma-separated list of "
                                         f"tensorboard, wandb, swanlab, or all"):
        tracking.chosen(report_to)


def test_the_flag_help_names_every_tracker_the_registry_knows():
    help_text = next(a.help for a in build_parser()._actions if a.dest == "report_to")
    assert all(name in help_text for name in tracking.BACKENDS)


def test_metrics_jsonl_keeps_each_step_once_and_stays_strict_json(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(f'{{"step": {s}, "train/loss": {s}.0}}\n' for s in range(1, 7)) + '{"step": 7, "train/lo')
    backend = JsonlBackend(path, keep_through_step=3)  # resumed from a checkpoint at step 3, after a kill at step 7
    backend.log({"train/loss": float("nan"), "train/grad_norm": float("inf"), "train/epoch": 0.5}, 4)
    rows = [json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} is not JSON")) for line in
            path.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1] == {"step": 4, "train/loss": None, "train/grad_norm": None, "train/epoch": 0.5}
    JsonlBackend(path, keep_through_step=0)  # a run started afresh
    assert path.read_text() == ""


def test_a_failing_backend_costs_that_backend_only(tmp_path, capsys):
    class FullDiskBackend:
        """Writes to /dev/full, where every write fails with the real ENOSPC of a full disk."""
        name = "tensorboard"
        calls = 0

        def log(self, metrics, step):
            FullDiskBackend.calls += 1
            with open("/dev/full", "w") as f:
                f.write(json.dumps(metrics))

        def log_samples(self, samples, step):
            self.log(samples, step)

        def close(self, summary):
            self.log({}, summary.step)

    jsonl = JsonlBackend(tmp_path / "metrics.jsonl", keep_through_step=0)
    tracker = Tracker([FullDiskBackend(), jsonl], "run")
    for step in (1, 2, 3):
        tracker.log({"train/loss": 1.0 / step}, step)
    tracker.log_samples({"春": "春江"}, 3)
    tracker.close(RunSummary(final={"final/total_steps": 3}, step=3))
    err = capsys.readouterr().err
    assert err.count("is off for the rest of this run") == 1 and FullDiskBackend.calls == 1
    assert "tensorboard: logging failed (OSError: [Errno 28] No space left on device)" in err
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 3] and rows[-1]["final/total_steps"] == 3  # closed: final row
    assert tracker.backends == []


def test_a_backend_dropped_after_a_failure_keeps_its_run_id_in_the_checkpoint(capsys):
    class KilledWandb:
        """A wandb run whose own process was killed (Slurm's SIGTERM reaches it too): every call fails."""
        name = "wandb"

        def log(self, metrics, step):
            raise ConnectionResetError("Connection lost")

        def state_dict(self):
            return {"wandb_id": "abc123"}

    class Broken(KilledWandb):
        name = "swanlab"

        def state_dict(self):
            raise RuntimeError("no state either")

    tracker = Tracker([KilledWandb(), Broken()], "run", resumed={"swanlab_id": "sw1"})
    tracker.log({"train/loss": 1.0}, 1)
    assert tracker.backends == [] and capsys.readouterr().err.count("is off for the rest of this run") == 2
    # the resumed run continues the same wandb run; a backend that cannot say its state keeps the saved one
    assert tracker.state_dict() == {"wandb_id": "abc123", "swanlab_id": "sw1", "run_name": "run"}


def test_rows_that_are_not_utf8_are_kept_as_they_were_on_resume(tiny_argv, tmp_path):
    argv = tiny_argv("--max_steps=2", "--eval_interval=2", "--log_interval=1")
    assert main(argv) == 0
    metrics = tmp_path / "out" / "metrics.jsonl"
    bad = b'{"step": 1, "note": "\xff\xfe"}\n'  # a damaged block: not UTF-8, at a step the checkpoint covers
    lines = metrics.read_bytes().splitlines(keepends=True)
    metrics.write_bytes(lines[0] + bad + b"".join(lines[1:]))
    before = metrics.read_bytes()
    assert main([*argv, "--resume", "--max_steps=3"]) == 0
    after = metrics.read_bytes()
    assert after.startswith(before) and bad in after  # every kept row byte for byte, then the new steps
    assert [json.loads(line)["step"] for line in after[len(before):].splitlines()][0] == 3
