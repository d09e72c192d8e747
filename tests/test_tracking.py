"""Tracking with the real libraries: TensorBoard event files read back with TensorBoard's own EventAccumulator, and
wandb offline run files read back record by record (tests/wandb_offline.py)."""

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gpt_trainer import tracking
from gpt_trainer.cli import main
from gpt_trainer.config import parse_args
from gpt_trainer.tracking import Tracker, wandb_key_source
from tests.conftest import TINY_SHAPE
from tests.wandb_offline import history_rows, read_records, run_files

ROOT = Path(__file__).resolve().parents[1]
FAKE_KEY = "FAKEKEY_" + "x7" * 20  # well-formed (40+ word characters) and easy to search for
POEMS = "静夜思\n床前明月光，疑是地上霜。举头望明月，低头思故乡。\n\n春晓\n春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。\n\n" * 8


@pytest.fixture(autouse=True)
def clean_wandb_env(monkeypatch, tmp_path):
    """No credentials or modes leak in from the machine running the tests."""
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DIR", "WANDB_BASE_URL", "NETRC", "WANDB_PROJECT", "WANDB_ENTITY"):
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(home / ".config" / "wandb"))
    monkeypatch.setenv("WANDB_SILENT", "true")


@pytest.fixture
def argv(tmp_path, cache_dir):
    corpus = tmp_path / "poems.txt"
    corpus.write_text(POEMS, encoding="utf-8")
    base = [f"--data_path={corpus}", f"--cache_dir={cache_dir}", f"--output_dir={tmp_path / 'out'}", *TINY_SHAPE]
    return lambda *extra: [*base, "--report_to=all", "--log_interval=1", *extra]


def scalars(logdir: Path) -> dict:
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {tag: [e.step for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}, acc


def wandb_steps(run_file: Path) -> dict:
    steps: dict = {}
    for row in history_rows(run_file):
        for key in row:
            if not key.startswith(("_", "global_step", "samples")):
                steps.setdefault(key, []).append(row["global_step"])
    return steps


def files_containing(root: Path, needle: str) -> list:
    return [p for p in root.rglob("*") if p.is_file() and needle.encode() in p.read_bytes()]


def test_tensorboard_and_wandb_get_the_same_metrics_at_the_same_steps(argv, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    assert main(argv("--max_steps=12", "--eval_interval=6", "--wandb_log_model", "--wandb_tags=mine")) == 0
    out = tmp_path / "out"
    [logdir] = list((out / "logs").iterdir())
    assert re.fullmatch(r"tiny-poems\.txt-lr3e-4-bs4-\d{8}_\d{6}", logdir.name)
    tb, acc = scalars(logdir)
    [run_file] = run_files(out)
    wb = wandb_steps(run_file)
    assert tb == wb
    expected = {"train/loss", "train/perplexity", "train/learning_rate", "train/grad_norm", "train/tokens_per_sec",
                "train/mfu", "train/epoch", "train/tokens_seen", "system/step_time_ms", "eval/loss", "eval/perplexity",
                "eval/best_perplexity", "epoch/train_loss", "epoch/val_loss", "epoch/val_perplexity",
                "final/best_perplexity", "final/total_steps", "final/total_epochs"}
    assert set(tb) == expected
    assert tb["train/loss"] == list(range(1, 13)) and tb["eval/loss"] == [6, 12] and tb["final/total_steps"] == [12]
    assert "_hparams_/session_start_info" in acc.PluginTagToContent("hparams")
    assert {"samples/春江/text_summary", "samples/往事/text_summary"} <= set(acc.Tags()["tensors"])
    records = read_records(run_file)
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert {"tiny", "fp32", "single-gpu", "mine"} <= set(run.tags) and run.display_name == logdir.name
    assert any(r.artifact.name == f"model-{run.run_id}" for r in records if r.WhichOneof("record_type") == "artifact")
    assert any(row.get("samples/_type") == "table-file" for row in history_rows(run_file))
    assert files_containing(tmp_path / "out", FAKE_KEY) == []


def test_samples_go_to_tensorboard_text(argv, tmp_path):
    assert main(argv("--max_steps=2", "--eval_interval=2", "--report_to=tensorboard", "--sample_prompts=春眠,明月")) == 0
    [logdir] = list((tmp_path / "out" / "logs").iterdir())
    _, acc = scalars(logdir)
    assert {"samples/春眠/text_summary", "samples/明月/text_summary"} <= set(acc.Tags()["tensors"])
    text = acc.Tensors("samples/春眠/text_summary")[0].tensor_proto.string_val[0].decode()
    assert text.startswith("春眠")


def test_resumed_tensorboard_run_purges_steps_after_the_checkpoint(tmp_path):
    cfg = parse_args([f"--output_dir={tmp_path}", "--report_to=tensorboard"])
    first = Tracker(cfg, {}, "c")
    for step in range(1, 7):
        first.log({"train/loss": float(step)}, step)
    first.finish()
    second = Tracker(cfg, {}, "c", resume_state=first.state_dict(), start_step=3)  # the checkpoint was at step 3
    for step in range(4, 7):
        second.log({"train/loss": 100.0 + step}, step)
    second.finish()
    acc = EventAccumulator(str(tmp_path / "logs" / first.run_name))
    acc.Reload()
    events = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert events == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 104.0), (5, 105.0), (6, 106.0)]


def script_env(**changes) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") or k in changes}
    env.update({"WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1", **changes})
    return env


def test_sigterm_and_resume_keep_both_trackers_continuous(argv, tmp_path):
    env = script_env(WANDB_MODE="offline", WANDB_API_KEY=FAKE_KEY, HOME=os.environ["HOME"])
    args = argv("--max_steps=100000", "--eval_interval=100000", "--save_interval=100000")
    proc = subprocess.Popen([sys.executable, str(ROOT / "train_single_gpu.py"), *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "out" / "metrics.jsonl"
    deadline = time.time() + 90
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 4):
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=90)
    assert proc.returncode == 143, err
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
    assert files_containing(tmp_path / "out", FAKE_KEY) == []


def test_no_key_and_no_terminal_logs_offline_and_prints_the_sync_command(argv, tmp_path, capsys):
    assert main(argv("--max_steps=2", "--report_to=wandb")) == 0
    err = capsys.readouterr().err
    assert "no API key" in err and "logs offline" in err
    sync = re.search(r"wandb sync (\S+)", err)
    assert sync and Path(sync.group(1)).is_dir() and run_files(Path(sync.group(1)).parent)


def test_no_key_with_a_terminal_never_blocks_on_a_login_prompt(argv, tmp_path):
    master, slave = os.openpty()
    output = []
    reader = threading.Thread(target=lambda: output.append(_drain(master)), daemon=True)
    reader.start()
    proc = subprocess.run([sys.executable, str(ROOT / "train_single_gpu.py"), *argv("--max_steps=2", "--report_to=wandb")],
                          cwd=ROOT, env=script_env(HOME=os.environ["HOME"]), stdin=slave, stdout=slave, stderr=slave,
                          timeout=120)
    os.close(slave)
    reader.join(timeout=10)
    assert proc.returncode == 0
    assert "no API key" in "".join(output)


def _drain(fd: int) -> str:
    chunks = []
    while True:
        try:
            data = os.read(fd, 4096)
        except OSError:
            break
        if not data:
            break
        chunks.append(data.decode(errors="replace"))
    return "".join(chunks)


def test_a_key_but_no_network_falls_back_to_offline_quickly(argv, tmp_path, monkeypatch, capsys):
    with socket.socket() as s:  # a port with nothing listening: connections are refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "3")
    started = time.time()
    assert main(argv("--max_steps=2", "--report_to=wandb")) == 0
    assert time.time() - started < 60
    err = capsys.readouterr().err
    assert "could not reach the server" in err and "wandb sync" in err
    assert run_files(tmp_path / "out") and files_containing(tmp_path / "out", FAKE_KEY) == []


def test_wandb_modes_are_honoured(argv, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert main(argv("--max_steps=1", "--report_to=wandb", "--output_dir=" + str(tmp_path / "a"))) == 0
    assert not (tmp_path / "a" / "wandb").exists()
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert main(argv("--max_steps=1", "--report_to=wandb", "--wandb_mode=disabled", "--output_dir=" + str(tmp_path / "b"))) == 0
    assert not (tmp_path / "b" / "wandb").exists()  # the flag beats the environment
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "elsewhere"))
    assert main(argv("--max_steps=1", "--report_to=wandb", "--output_dir=" + str(tmp_path / "c"))) == 0
    assert run_files(tmp_path / "elsewhere") and not (tmp_path / "c" / "wandb").exists()


def test_without_wandb_installed_tensorboard_still_logs(argv, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` fail as if it were not installed
    assert main(argv("--max_steps=2")) == 0
    assert "wandb is not installed" in capsys.readouterr().err
    [logdir] = list((tmp_path / "out" / "logs").iterdir())
    assert scalars(logdir)[0]["train/loss"] == [1, 2]


def test_key_sources_in_wandb_order_without_reading_the_key_out(tmp_path, monkeypatch):
    home = Path(os.environ["HOME"])
    assert wandb_key_source() is None
    settings = home / ".config" / "wandb" / "settings"
    settings.parent.mkdir(parents=True)
    settings.write_text(f"[default]\napi_key = {FAKE_KEY}\n")
    assert wandb_key_source() == str(settings)
    netrc_file = home / ".netrc"
    netrc_file.write_text(f"machine api.wandb.ai\n  login user\n  password {FAKE_KEY}\n")
    netrc_file.chmod(0o444)  # a read-only mount, wider than netrc's usual 600
    if os.getuid() == 0:
        os.chown(netrc_file, 4242, 4242)  # and owned by another user, as a host file seen from a container
    assert wandb_key_source() == str(netrc_file)
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    assert wandb_key_source() == "WANDB_API_KEY"


def test_only_the_main_process_logs(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    tracker = Tracker(parse_args([f"--output_dir={tmp_path / 'out'}"]), {}, "c")
    tracker.log({"train/loss": 1.0}, 1)
    tracker.finish()
    assert tracker.backends == [] and not (tmp_path / "out").exists()


def test_learning_rates_format_compactly_in_run_names():
    assert [tracking.format_lr(x) for x in (3e-4, 1e-3, 2.5e-5, 0.01)] == ["3e-4", "1e-3", "2.5e-5", "1e-2"]
