import dataclasses
import errno
import hashlib
import json
import math
import shutil
import signal
import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest
import torch

from gpt_trainer.commands.train import main, tensorboard_command, what_happened
from gpt_trainer.config import TrainConfig
from gpt_trainer.system.rundir import RunFolder
from gpt_trainer.train import checkpoint
from gpt_trainer.train.trainer import TrainResult
from tests.conftest import CLASSIC_POEMS, TINY_SHAPE, interrupt_after_lines, plan_for

ROOT = Path(__file__).resolve().parents[1]


def snapshot(folder: Path) -> dict:
    if folder.is_file():
        return {folder.name: hashlib.sha256(folder.read_bytes()).hexdigest()}
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A complete tiny run: its files must survive every bad command pointed at it."""
    root = tmp_path_factory.mktemp("run")
    argv = [f"--data_path={CLASSIC_POEMS}", f"--cache_dir={root / 'cache'}", f"--output_dir={root / 'out'}",
            *TINY_SHAPE, "--max_steps=3", "--eval_interval=3", "--log_interval=1"]
    assert main(argv) == 0
    return root, argv


def test_a_run_leaves_checkpoints_metrics_config_and_samples(finished_run):
    root, _ = finished_run
    out = root / "out"
    assert {"latest.pt", "best.pt"} <= {p.name for p in (out / "checkpoints").iterdir()}
    assert torch.load(out / "checkpoints" / "latest.pt", weights_only=True)["trainer"]["step"] == 3
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3]
    assert [r["step"] for r in rows if "eval/loss" in r] == [3]
    assert rows[-1]["final/total_steps"] == 3 and rows[-1]["final/best_perplexity"] > 1
    assert json.loads((out / "config.json").read_text())["precision"] == "fp32"
    samples = (out / "samples.txt").read_text(encoding="utf-8")
    assert "--- '春江' ---\n春江" in samples and "--- '往事' ---\n往事" in samples


def test_dry_run_prints_the_resolved_config_and_writes_nothing(tiny_argv, tmp_path, capsys):
    assert main(tiny_argv("--dry_run", "--model_size=small", "--n_layer=2", "--n_head=2", "--n_embd=32")) == 0
    resolved = json.loads(capsys.readouterr().out)
    assert resolved["n_layer"] == 2 and resolved["device"] == "cpu" and resolved["corpus"] == CLASSIC_POEMS.name
    assert not (tmp_path / "out").exists()


BAD_INPUTS = {
    "missing data path": (["--overwrite", "--data_path=/no/such/file.txt"], "does not exist"),
    "empty data file": (["--overwrite", "--data_path={tmp}/empty.txt"], "holds no text"),
    "corpus too short": (["--overwrite", "--data_path={tmp}/short.txt"], "needs at least block_size + 1 = 17"),
    "unknown model size": (["--model_size=huge"], "invalid choice: 'huge'"),
    "bf16 with fp16": (["--bf16", "--fp16"], "contradict each other"),
    "indivisible width": (["--n_embd=33"], "n_embd=33 is not divisible by n_head=2"),
    "batch size 0": (["--batch_size=0"], "--batch_size must be at least 1"),
    "accumulation 0": (["--gradient_accumulation_steps=0"], "--gradient_accumulation_steps must be at least 1"),
    "output_dir is a file": (["--output_dir={tmp}/empty.txt"], "is a file, not a folder"),
    "resume with another shape": (["--resume", "--n_layer=3"], "n_layer: checkpoint 2, now 3"),
    "existing run without --resume": (["--max_steps=5"], "already holds a training run"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_exits_2_with_one_message_and_touches_nothing(case, finished_run, tmp_path, capsys):
    root, argv = finished_run
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "short.txt").write_text("春江花月夜")
    flags, message = BAD_INPUTS[case]
    before = {"run": snapshot(root / "out"), "file": snapshot(tmp_path / "empty.txt")}
    args = [f.format(tmp=tmp_path) for f in flags]
    if any(a.startswith("--data_path") for a in args):
        argv = [a for a in argv if not a.startswith("--corpus")]
    assert main([*argv, *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert {"run": snapshot(root / "out"), "file": snapshot(tmp_path / "empty.txt")} == before


def run_script(*args, **kwargs):
    return subprocess.run([sys.executable, str(ROOT / "train_single_gpu.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120, **kwargs)


@pytest.mark.slow
def test_the_script_reports_bad_input_without_a_traceback():
    result = run_script("--model_size=huge")
    assert result.returncode == 2
    assert "error: argument --model_size: invalid choice: 'huge'" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_resume_continues(tmp_path, cache_dir):
    argv = [f"--data_path={CLASSIC_POEMS}", f"--cache_dir={cache_dir}", f"--output_dir={tmp_path}", *TINY_SHAPE,
            "--max_steps=100000", "--log_interval=1", "--eval_interval=100000", "--save_interval=100000"]
    metrics = tmp_path / "metrics.jsonl"
    code, err = interrupt_after_lines([sys.executable, str(ROOT / "train_single_gpu.py"), *argv], metrics, 3, cwd=ROOT)
    assert code == 128 + signal.SIGTERM, err
    stopped_at = torch.load(tmp_path / "checkpoints" / "latest.pt", weights_only=True)["trainer"]["step"]
    assert stopped_at >= 3 and "--resume" in err

    resumed = run_script(*argv, "--resume", f"--max_steps={stopped_at + 2}")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {tmp_path / 'checkpoints' / 'latest.pt'} at step {stopped_at}" in resumed.stdout
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps[-1] == stopped_at + 2


def test_overwrite_starts_a_fresh_record(tiny_argv, tmp_path):
    argv = tiny_argv("--max_steps=2", "--eval_interval=2", "--log_interval=1")
    assert main(argv) == 0
    assert main([*argv, "--overwrite", "--max_steps=1"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [1]


# (fixture, the losses of steps 4 and 5 when resumed to --max_steps 5): the format 2 fixture was written by the code
# of 2026-12-01 (3d8711d), and these are the losses that code trained on resuming it; format 1 is older still
EARLIER_CHECKPOINTS = [("checkpoint_v1.pt", None), ("checkpoint_v2.pt", [3.662169933319092, 3.656742572784424])]


@pytest.mark.parametrize("fixture, expected_losses", EARLIER_CHECKPOINTS)
def test_training_resumes_from_checkpoints_of_earlier_formats(tmp_path, cache_dir, fixture, expected_losses):
    """The committed fixtures: 1 layer, 16 wide, saved at step 3 of a run on tests/fixtures/poems.txt."""
    fixtures = ROOT / "tests" / "fixtures"
    (tmp_path / "checkpoints").mkdir()
    shutil.copy(fixtures / fixture, tmp_path / "checkpoints" / "latest.pt")
    argv = [f"--data_path={fixtures / 'poems.txt'}", f"--cache_dir={cache_dir}", f"--output_dir={tmp_path}",
            "--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=8", "--batch_size=2", "--dropout=0.0",
            "--eval_steps=1", "--fp32", "--device=cpu", "--sample_tokens=4", "--report_to=none", "--log_interval=1",
            "--resume", "--max_steps=5"]
    assert main(argv) == 0
    saved = torch.load(tmp_path / "checkpoints" / "latest.pt", weights_only=True)
    assert saved["format_version"] == checkpoint.FORMAT_VERSION and saved["trainer"]["step"] == 5
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows][:2] == [4, 5]
    if expected_losses:  # the same training as before the change, to the last bit
        assert [r["train/loss"] for r in rows if "train/loss" in r] == expected_losses


ZERO_IS_VALID = {"prepare_workers",  # 0: every usable core
                 "dropout", "min_lr", "warmup_steps", "weight_decay", "grad_clip", "seed", "sample_tokens", "top_k",
                 "muon_momentum", "muon_weight_decay"}
HINTS = typing.get_type_hints(TrainConfig)
NUMERIC_FLAGS = [name for name, hint in HINTS.items() if {int, float} & {hint, *typing.get_args(hint)}]


def test_every_numeric_flag_is_range_checked_before_anything_is_written(finished_run, capsys):
    root, argv = finished_run
    before = snapshot(root / "out")
    checked = 0
    for name in NUMERIC_FLAGS:
        for bad in ["-1", "nan", "inf", "-inf"] + ([] if name in ZERO_IS_VALID else ["0"]):
            assert main([*argv, "--resume", f"--{name}={bad}"]) == 2, f"--{name}={bad} was accepted"
            err = capsys.readouterr().err
            assert err.startswith("error: ") and err.count("\n") == 1 and f"--{name}" in err, err
            checked += 1
    assert snapshot(root / "out") == before
    assert len(NUMERIC_FLAGS) >= 25 and checked > 100


def test_abbreviated_flags_are_refused(tiny_argv, capsys):
    assert main(tiny_argv("--learn=1e-3")) == 2
    assert "unrecognized arguments: --learn=1e-3" in capsys.readouterr().err


def test_an_output_dir_that_cannot_be_created_is_a_usage_error(tiny_argv, capsys):
    assert main(tiny_argv("--output_dir=/proc/gpt-trainer-test")) == 2
    assert "cannot be written" in capsys.readouterr().err


def test_a_foreign_file_for_resume_is_a_usage_error(tiny_argv, tmp_path, capsys):
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    assert main(tiny_argv(f"--resume={tmp_path / 'foreign.pt'}")) == 2
    assert "not a checkpoint written by train_single_gpu.py" in capsys.readouterr().err


def test_a_diverging_run_skips_bad_steps_stops_with_advice_and_never_saves_them(tiny_argv, tmp_path, capsys):
    out = tmp_path / "out"
    # AdamW: Muon's orthogonalised steps have a bounded size, and a high --learning_rate is AdamW's. A good checkpoint
    # at step 2 first.
    assert main(tiny_argv("--optimizer=adamw", "--max_steps=2", "--eval_interval=2")) == 0
    argv = tiny_argv("--resume", "--learning_rate=1e3", "--grad_clip=0", "--max_steps=60", "--max_bad_steps=3",
                     "--log_interval=1", "--eval_interval=1000", "--save_interval=1")
    capsys.readouterr()
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "training diverged: 3 optimizer steps in a row" in err and "--learning_rate (now 1000" in err
    assert "enable --grad_clip" in err and "Traceback" not in err
    rows = [json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl"))
            for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["train/skipped_steps"] >= 1
    saved = torch.load(out / "checkpoints" / "latest.pt", weights_only=True)  # saved at every step it could
    assert 2 <= saved["trainer"]["step"] <= rows[-1]["step"]  # a skipped step leaves the weights of the last good one
    assert all(torch.isfinite(t).all() for t in saved["model"].values())


def test_resume_applies_changed_optimisation_flags_and_config_json_records_them(tiny_argv, tmp_path, capsys):
    argv = tiny_argv("--max_steps=4", "--eval_interval=4", "--log_interval=1", "--warmup_steps=0")
    assert main(argv) == 0
    assert main([*argv, "--resume", "--max_steps=6", "--learning_rate=1e-2"]) == 0
    assert "learning_rate 0.003 -> 0.01" in capsys.readouterr().err  # from --optimizer muon's default
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["learning_rate"] == 1e-2
    assert [s["from_step"] for s in config["segments"]] == [0, 4]
    assert config["segments"][1]["changed"] == {"learning_rate": [3e-3, 1e-2], "max_steps": [4, 6]}
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    lr_at = {r["step"]: r["train/learning_rate"] for r in rows if "train/learning_rate" in r}
    final_lr = 1e-3  # learning_rate / 10 at the end of the cosine
    assert lr_at[5] == pytest.approx(final_lr + (1e-2 - final_lr) * 0.5 * (1 + math.cos(math.pi * 5 / 6)))


def test_stray_temporary_checkpoints_are_removed_on_the_next_start(tiny_argv, tmp_path, capsys):
    argv = tiny_argv("--max_steps=2", "--eval_interval=2")
    assert main(argv) == 0
    stray = tmp_path / "out" / "checkpoints" / ".latest.pt.tmp-99999"
    stray.write_bytes(b"half a checkpoint")
    assert main([*argv, "--resume", "--max_steps=3"]) == 0
    assert not stray.exists() and "removed .latest.pt.tmp-99999" in capsys.readouterr().err


def test_a_full_disk_keeps_the_previous_checkpoint_and_says_so(tiny_argv, tmp_path, monkeypatch, capsys):
    argv = tiny_argv("--max_steps=4", "--eval_interval=2")
    real_save = checkpoint.torch.save
    saves = []

    def save_until_the_disk_fills(state, f):
        saves.append(state["trainer"]["step"])
        if len(saves) > 2:  # latest and best at step 2 fit; nothing after does
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(state, f)
    monkeypatch.setattr(checkpoint.torch, "save", save_until_the_disk_fills)
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "The previous one is kept" in err and "Traceback" not in err
    assert checkpoint.load(tmp_path / "out" / "checkpoints" / "latest.pt")["trainer"]["step"] == 2
    assert sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir()) == ["best.pt", "latest.pt"]  # no .tmp
    assert not list((tmp_path / "out" / "checkpoints").glob(".*tmp*"))


def test_a_restart_before_the_first_checkpoint_continues_one_record(tiny_argv, tmp_path):
    argv = tiny_argv("--max_steps=3", "--eval_interval=3", "--log_interval=1", "--report_to=tensorboard")
    out = tmp_path / "out"
    out.mkdir()
    RunFolder(out).mark()  # a start killed before saving: the marker, config.json and a torn record
    (out / "config.json").write_text(json.dumps({"run_name": "first-attempt"}))
    (out / "metrics.jsonl").write_text('{"step": 1, "train/loss": 12345.678}\n{"step": 2, "train/lo')
    assert main(argv) == 0
    assert [p.name for p in (out / "logs").iterdir()] == ["first-attempt"]
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if "train/loss" in line]
    assert steps == [1, 2, 3] and "12345.678" not in (out / "metrics.jsonl").read_text()


@pytest.mark.slow
def test_a_second_run_into_a_busy_output_dir_stops_at_once_naming_the_first(tmp_path, cache_dir, capsys):
    argv = [f"--data_path={CLASSIC_POEMS}", f"--cache_dir={cache_dir}", f"--output_dir={tmp_path}", *TINY_SHAPE,
            "--max_steps=100000", "--log_interval=1", "--eval_interval=100000", "--save_interval=100000"]
    first = subprocess.Popen([sys.executable, str(ROOT / "train_single_gpu.py"), *argv], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not (tmp_path / "metrics.jsonl").exists():
            time.sleep(0.1)
        before = (tmp_path / "config.json").read_text()
        assert main([*argv, "--overwrite"]) == 2
        err = capsys.readouterr().err
        assert f"in use by a training run that is still going (pid {first.pid}" in err
        assert (tmp_path / "config.json").read_text() == before
    finally:
        first.terminate()
        first.wait(timeout=60)
    assert main([*argv, "--resume", "--max_steps=1"]) == 0  # the lock went with the process
    assert "in use" not in capsys.readouterr().err


def test_an_unknown_tracker_is_refused_with_the_known_ones_and_nothing_written(tiny_argv, tmp_path, capsys):
    assert main(tiny_argv("--report_to=tensorboard,swanlob")) == 2
    err = capsys.readouterr().err
    assert "--report_to 'tensorboard,swanlob' is not a list of trackers ('swanlob')" in err
    assert "tensorboard, wandb, swanlab" in err and not (tmp_path / "out").exists()


def test_a_sentencepiece_vocabulary_the_corpus_cannot_fill_stops_with_exit_2_and_nothing_written(tiny_argv, tmp_path,
                                                                                                 capsys):
    assert main(tiny_argv("--tokenizer=sentencepiece", "--vocab_size=100000", "--report_to=none")) == 2
    err = capsys.readouterr().err
    assert "the largest sentencepiece vocabulary it supports is" in err and "--tokenizer char" in err
    assert "character_coverage" not in err and not (tmp_path / "out").exists()


def test_the_end_of_a_run_says_what_happened_and_warns_when_validation_loss_rose(tiny_cfg, tmp_path):
    plan = dataclasses.replace(plan_for(tiny_cfg(f"--output_dir={tmp_path}", "--report_to=none")), vocab_size=1079)
    overfit = TrainResult(150, 6.04, history=[{"train/loss": 6.46}, {"train/loss": 1.08}],
                          evals=[(10, 6.40), (18, 6.04), (150, 7.14)], seconds=564)
    lines = what_happened(overfit, plan)
    assert lines[0] == ("done: 150 steps in 9m 24s; train loss 6.4600 -> 1.0800; val loss 6.4000 (step 10) -> 7.1400 "
                        "(step 150), best val loss 6.0400 (guessing uniformly among the 1,079 tokens scores 6.9838).")
    assert lines[1] == f"samples in {tmp_path / 'samples.txt'}; checkpoints in {tmp_path / 'checkpoints'}"  # no curves
    assert lines[2].startswith("warning: validation loss rose from its best, 6.0400, to 7.1400: the model is memoris")
    learning = TrainResult(150, 5.9, history=overfit.history, evals=[(10, 6.4), (150, 5.9)], seconds=60)
    assert len(what_happened(learning, plan)) == 2  # the control: no warning while it still learns


def test_the_tensorboard_command_is_one_the_user_can_paste(tmp_path, monkeypatch):
    bin_dir = tmp_path / "repo" / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "tensorboard").write_text("#!/bin/sh\n")
    (bin_dir / "tensorboard").chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(bin_dir / "python"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # the venv is not activated
    monkeypatch.chdir(tmp_path / "repo")
    assert tensorboard_command() == ".venv/bin/tensorboard"  # as after ./dev.sh demo
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert tensorboard_command() == str(bin_dir / "tensorboard")  # from elsewhere: the full path
    monkeypatch.setenv("PATH", str(bin_dir))
    assert tensorboard_command() == "tensorboard"  # activated: the plain name


def metrics_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_overwrite_leaves_no_trace_of_the_earlier_run_and_keeps_the_users_notes(tiny_argv, tmp_path):
    out = tmp_path / "out"
    argv = tiny_argv("--eval_interval=100", "--log_interval=1", "--report_to=tensorboard")
    assert main([*argv, "--max_steps=3", "--wandb_run_name=first"]) == 0
    (out / "notes.txt").write_text("lr 3e-4 looked good")
    assert main([*argv, "--max_steps=2", "--wandb_run_name=second", "--overwrite"]) == 0
    assert [p.name for p in (out / "logs").iterdir()] == ["second"]
    samples = (out / "samples.txt").read_text(encoding="utf-8")
    assert samples.count("=== step") == 1 and samples.startswith("=== step 2 ===")
    rows = metrics_rows(out)
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2]
    assert [r["final/total_steps"] for r in rows if "final/total_steps" in r] == [2]
    assert (out / "notes.txt").read_text() == "lr 3e-4 looked good"


def test_resuming_a_finished_run_changes_nothing(tiny_argv, tmp_path, capsys):
    out = tmp_path / "out"
    argv = tiny_argv("--max_steps=3", "--eval_interval=3", "--report_to=tensorboard")
    assert main(argv) == 0

    def tree() -> dict:
        return {str(p.relative_to(out)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
                for p in out.rglob("*") if p.is_file()}
    before = tree()
    capsys.readouterr()
    assert main([*argv, "--resume"]) == 0
    assert f"the run in {out} is complete: step 3 of 3" in capsys.readouterr().out
    assert tree() == before


def test_a_bare_resume_keeps_the_values_the_run_used(tiny_argv, tmp_path, capsys):
    resumed, whole = tmp_path / "resumed", tmp_path / "whole"
    flags = ("--learning_rate=1e-3", "--warmup_steps=0", "--log_interval=1", "--eval_interval=100")
    assert main(tiny_argv(*flags, "--max_steps=4", f"--output_dir={resumed}")) == 0
    assert main(tiny_argv("--log_interval=1", "--eval_interval=100", f"--output_dir={resumed}", "--resume",
                          "--max_steps=6")) == 0
    assert json.loads((resumed / "config.json").read_text())["segments"][-1]["changed"] == {"max_steps": [4, 6]}
    assert main(tiny_argv(*flags, "--max_steps=6", f"--output_dir={whole}")) == 0

    def lr_at(out: Path) -> dict:
        return {r["step"]: r["train/learning_rate"] for r in metrics_rows(out) if "train/learning_rate" in r}
    assert [lr_at(resumed)[s] for s in (5, 6)] == [lr_at(whole)[s] for s in (5, 6)]
    # the control: a value given on the command line is taken, and recorded
    assert main(tiny_argv("--log_interval=1", f"--output_dir={resumed}", "--resume", "--max_steps=7",
                          "--learning_rate=2e-3")) == 0
    changed = json.loads((resumed / "config.json").read_text())["segments"][-1]["changed"]
    assert changed == {"learning_rate": [1e-3, 2e-3], "max_steps": [6, 7]}


def test_a_full_disk_at_the_first_save_says_there_was_no_earlier_checkpoint(tiny_argv, tmp_path, monkeypatch,
                                                                            capsys):
    """A mock: a disk cannot be made to fill up at exactly the first save here, so torch's writer is made to fail as
    it does on a full disk (a RuntimeError with its C++ source location)."""
    def full_disk(state, f):
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0")
    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    assert main(tiny_argv("--max_steps=2", "--eval_interval=2")) == 1
    err = capsys.readouterr().err
    assert "There was no earlier one" in err and "unexpected pos 64 vs 0" in err
    assert "enforce fail" not in err and "previous one is kept" not in err and "Traceback" not in err
    assert not (tmp_path / "out" / "checkpoints" / "latest.pt").exists()


def test_the_tensorboard_command_at_the_end_survives_a_path_with_spaces(tiny_argv, tmp_path, capsys):
    import shlex

    out = tmp_path / "my runs" / "first try"
    assert main(tiny_argv("--max_steps=1", "--report_to=tensorboard", f"--output_dir={out}")) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if "curves: " in line)
    command = shlex.split(line.split("curves: ", 1)[1])
    assert command[command.index("--logdir") + 1] == str(out / "logs")
    assert (out / "logs").is_dir()


def test_a_bare_resume_trains_on_the_run_s_text_tokenizer_and_shape_and_downloads_nothing(tmp_path, cache_dir,
                                                                                         monkeypatch, capsys):
    """The resume names no text, tokenizer or shape (the defaults: the Chinese corpus, downloaded; char tokens; the
    tiny preset), so it must take the run's before any data is prepared. The download base is a closed port: an
    attempt would fail and fall back to the embedded poems, whose tokens the run was not trained on."""
    corpus = tmp_path / "my_poems.txt"
    shutil.copy(CLASSIC_POEMS, corpus)
    out = tmp_path / "out"
    monkeypatch.setenv("CHINESE_POETRY_BASE_URL", "http://127.0.0.1:9/nothing-here")
    assert main([f"--data_path={corpus}", f"--cache_dir={cache_dir}", f"--output_dir={out}",
                 "--tokenizer=sentencepiece", "--vocab_size=2000", *TINY_SHAPE, "--max_steps=3"]) == 0
    capsys.readouterr()
    assert main([f"--output_dir={out}", f"--cache_dir={cache_dir}", "--resume", "--max_steps=5",
                 "--report_to=none"]) == 0
    captured = capsys.readouterr()
    assert f"resumed from {out / 'checkpoints' / 'latest.pt'} at step 3" in captured.out
    assert "download" not in captured.err and "embedded Tang poems" not in captured.err
    config = json.loads((out / "config.json").read_text())
    assert (config["data_path"], config["corpus"], config["tokenizer"], config["vocab_size"]) == (
        str(corpus), "my_poems.txt", "sentencepiece", 2000)
    assert (config["n_layer"], config["n_head"], config["n_embd"], config["block_size"]) == (2, 2, 32, 16)
    assert checkpoint.load(out / "checkpoints" / "latest.pt")["trainer"]["step"] == 5


# ---- what a run says: the words for what was run (issue 31) -------------------------------------------------------
@pytest.mark.parametrize("command, usage", [
    ([str(Path(sys.executable).parent / "gpt-train")], "usage: gpt-train "),
    ([sys.executable, "-m", "gpt_trainer"], "usage: python -m gpt_trainer "),
    ([sys.executable, str(ROOT / "train_single_gpu.py")], "usage: train_single_gpu.py "),
    ([sys.executable, "-m", "gpt_trainer.demo"], "usage: python -m gpt_trainer.demo "),
])
def test_help_names_the_program_as_it_was_run(command, usage):
    done = subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(usage), done.stdout[:80]


def test_the_users_text_is_named_by_its_flag_even_when_its_folder_is_called_corpus(tiny_argv, tmp_path, capsys):
    (tmp_path / "corpus").mkdir()
    shutil.copy(CLASSIC_POEMS, tmp_path / "corpus" / "poems.txt")
    assert main(tiny_argv(f"--data_path={tmp_path / 'corpus'}", "--max_steps=1", "--eval_interval=1")) == 0
    out = capsys.readouterr().out
    assert "| --data_path corpus: " in out and "corpus corpus" not in out
    (tmp_path / "tiny.txt").write_text("春江花月夜\n", encoding="utf-8")
    assert main(tiny_argv(f"--data_path={tmp_path / 'tiny.txt'}", f"--output_dir={tmp_path / 'o2'}")) == 2
    assert f"--data_path {tmp_path / 'tiny.txt'} has " in capsys.readouterr().err


def test_a_resumed_run_s_closing_line_counts_the_steps_it_ran_and_says_which(tiny_argv, capsys):
    assert main(tiny_argv("--max_steps=4", "--eval_interval=2")) == 0
    assert "done: 4 steps in " in capsys.readouterr().out
    assert main(tiny_argv("--max_steps=7", "--eval_interval=2", "--resume")) == 0
    done = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("done: "))
    assert done.startswith("done: 3 steps in 0m ") and "s (steps 5-7 of 7, resumed at step 4); train loss" in done
