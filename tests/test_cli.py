import hashlib
import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpt_trainer.cli import main
from tests.conftest import TINY_SHAPE, interrupt_after_lines

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
    argv = ["--corpus=builtin", f"--cache_dir={root / 'cache'}", f"--output_dir={root / 'out'}", *TINY_SHAPE,
            "--max_steps=3", "--eval_interval=3", "--log_interval=1"]
    assert main(argv) == 0
    return root, argv


def test_a_run_leaves_checkpoints_metrics_config_and_samples(finished_run):
    root, _ = finished_run
    out = root / "out"
    assert {"latest.pt", "best.pt"} <= {p.name for p in (out / "checkpoints").iterdir()}
    assert torch.load(out / "checkpoints" / "latest.pt", weights_only=False)["trainer"]["step"] == 3
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
    assert resolved["n_layer"] == 2 and resolved["device"] == "cpu" and resolved["corpus"] == "builtin"
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
    argv = ["--corpus=builtin", f"--cache_dir={cache_dir}", f"--output_dir={tmp_path}", *TINY_SHAPE,
            "--max_steps=100000", "--log_interval=1", "--eval_interval=100000", "--save_interval=100000"]
    metrics = tmp_path / "metrics.jsonl"
    code, err = interrupt_after_lines([sys.executable, str(ROOT / "train_single_gpu.py"), *argv], metrics, 3, cwd=ROOT)
    assert code == 128 + signal.SIGTERM, err
    stopped_at = torch.load(tmp_path / "checkpoints" / "latest.pt", weights_only=False)["trainer"]["step"]
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


def test_training_resumes_from_a_format_1_checkpoint(tmp_path, cache_dir):
    """The committed fixture was written before checkpoints had a format version (1 layer, 16 wide, step 3)."""
    fixtures = ROOT / "tests" / "fixtures"
    (tmp_path / "checkpoints").mkdir()
    shutil.copy(fixtures / "checkpoint_v1.pt", tmp_path / "checkpoints" / "latest.pt")
    argv = [f"--data_path={fixtures / 'poems.txt'}", f"--cache_dir={cache_dir}", f"--output_dir={tmp_path}",
            "--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=8", "--batch_size=2", "--dropout=0.0",
            "--eval_steps=1", "--fp32", "--device=cpu", "--sample_tokens=4", "--report_to=none", "--log_interval=1",
            "--resume", "--max_steps=5"]
    assert main(argv) == 0
    saved = torch.load(tmp_path / "checkpoints" / "latest.pt", weights_only=False)
    assert saved["format_version"] == 2 and saved["trainer"]["step"] == 5
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps[:2] == [4, 5]
