"""wandb with the real library, offline: where a key comes from (never the key), modes, no key, no network, no
package; the run files are read back record by record (tests/wandb_offline.py)."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from gpt_trainer.commands.train import main
from gpt_trainer.config import parse_args
from gpt_trainer.system.rundir import RunFolder
from gpt_trainer.tracking.base import RunInfo
from gpt_trainer.tracking.wandb import WandbBackend, log_lost_rows_again, wandb_key_source
from gpt_trainer.tracking.wandb_records import BLOCK
from tests.conftest import files_containing, scalars, script_env
from tests.wandb_offline import history_rows, run_files

ROOT = Path(__file__).resolve().parents[1]
FAKE_KEY = "FAKEKEY_" + "x7" * 20  # well-formed (40+ word characters) and easy to search for
pytestmark = pytest.mark.usefixtures("clean_wandb_env")


def test_no_key_and_no_terminal_logs_offline_and_prints_the_sync_command(poems_argv, tmp_path, capsys):
    assert main(poems_argv("--max_steps=2", "--report_to=wandb")) == 0
    err = capsys.readouterr().err
    assert "no API key" in err and "logs offline" in err
    sync = re.search(r"wandb sync (\S+)", err)
    assert sync and Path(sync.group(1)).is_dir() and run_files(Path(sync.group(1)).parent)



def test_an_offline_run_prints_the_sync_command_once(poems_argv):
    """wandb's own closing lines (which the tests' WANDB_SILENT hides, and pytest's capture misses) as a user sees
    them: a real process, wandb not silenced."""
    script = [sys.executable, str(ROOT / "train_single_gpu.py"), *poems_argv("--max_steps=1", "--report_to=wandb")]
    env = script_env(HOME=os.environ["HOME"], WANDB_SILENT="false", WANDB_CONFIG_DIR=os.environ["WANDB_CONFIG_DIR"])
    done = subprocess.run(script, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    output = done.stdout + done.stderr
    assert output.count("wandb sync") == 1 and "wandb: this run was logged offline. Upload it with:  wandb sync" \
        in output, output[-600:]
@pytest.mark.slow
def test_no_key_with_a_terminal_never_blocks_on_a_login_prompt(poems_argv, tmp_path):
    master, slave = os.openpty()
    output = []
    reader = threading.Thread(target=lambda: output.append(_drain(master)), daemon=True)
    reader.start()
    script = [sys.executable, str(ROOT / "train_single_gpu.py"), *poems_argv("--max_steps=2", "--report_to=wandb")]
    proc = subprocess.run(script, cwd=ROOT, env=script_env(HOME=os.environ["HOME"]), stdin=slave, stdout=slave,
                          stderr=slave, timeout=120)
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


@pytest.mark.slow
def test_a_key_but_no_network_falls_back_to_offline_quickly(poems_argv, tmp_path, monkeypatch, capsys):
    with socket.socket() as s:  # a port with nothing listening: connections are refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "3")
    started = time.time()
    assert main(poems_argv("--max_steps=2", "--report_to=wandb")) == 0
    assert time.time() - started < 60
    err = capsys.readouterr().err
    assert "wandb: could not start online" in err and "logging offline instead" in err and "wandb sync" in err
    assert run_files(tmp_path / "out") and files_containing(tmp_path / "out", FAKE_KEY) == []


def test_wandb_modes_are_honoured(poems_argv, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert main(poems_argv("--max_steps=1", "--report_to=wandb", "--output_dir=" + str(tmp_path / "a"))) == 0
    assert not (tmp_path / "a" / "wandb").exists()
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert main(poems_argv("--max_steps=1", "--report_to=wandb", "--wandb_mode=disabled",
                     "--output_dir=" + str(tmp_path / "b"))) == 0
    assert not (tmp_path / "b" / "wandb").exists()  # the flag beats the environment
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "elsewhere"))
    assert main(poems_argv("--max_steps=1", "--report_to=wandb", "--output_dir=" + str(tmp_path / "c"))) == 0
    assert run_files(tmp_path / "elsewhere") and not (tmp_path / "c" / "wandb").exists()


def test_without_wandb_installed_tensorboard_still_logs(poems_argv, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` fail as if it were not installed
    assert main(poems_argv("--max_steps=2")) == 0
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


def test_a_netrc_other_users_can_read_gets_a_warning_naming_chmod_600(capsys):
    netrc_file = Path(os.environ["HOME"]) / ".netrc"
    netrc_file.write_text(f"machine api.wandb.ai\n  login user\n  password {FAKE_KEY}\n")
    netrc_file.chmod(0o644)
    assert wandb_key_source() == str(netrc_file)
    out, err = capsys.readouterr()
    assert "can be read by other users of this machine (mode 644)" in err and f"chmod 600 {netrc_file}" in err
    assert FAKE_KEY not in out + err
    netrc_file.chmod(0o600)  # the control: a private file is used without a word
    assert wandb_key_source() == str(netrc_file)
    assert capsys.readouterr() == ("", "")


def wandb_cores(parent: int) -> list[int]:
    """The wandb-core processes `parent` started (wandb's Go service process, one per process that calls wandb.init)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            if ppid == parent and b"wandb-core" in (stat.parent / "cmdline").read_bytes():
                found.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):  # a process that ended while we looked
            continue
    return found


def logged_pairs(rows: list[dict], step_key: str) -> list[tuple[int, str]]:
    """(step, metric) for every metric of every row, sorted; wandb's own columns and the samples table left out."""
    return sorted((row[step_key], key) for row in rows for key in row
                  if not key.startswith(("_", "samples")) and key not in ("step", "global_step"))


@pytest.mark.slow
def test_a_slurm_sigterm_that_also_stops_wandb_core_loses_no_step(tiny_argv, tmp_path):
    """Slurm (requeue, preemption, scancel) sends SIGTERM to every process of the job step, wandb's own wandb-core
    too, which exits without writing the rows it held (wandb/wandb#9963). The resumed run continues the same wandb run
    and logs those rows again from metrics.jsonl: every step is in the run once."""
    steps = 120
    env = script_env(WANDB_MODE="offline", HOME=os.environ["HOME"])
    args = [sys.executable, str(ROOT / "train_single_gpu.py"),
            *tiny_argv(f"--max_steps={steps}", "--log_interval=1", "--eval_interval=100000", "--save_interval=100000",
                       "--report_to=wandb")]
    metrics = tmp_path / "out" / "metrics.jsonl"
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 40):
        time.sleep(0.05)
    cores = wandb_cores(proc.pid)
    for pid in [proc.pid, *cores]:  # the same moment, as Slurm does
        os.kill(pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and cores, err[-3000:]
    kept = {row["global_step"] for row in history_rows(run_files(tmp_path / "out")[0])}
    stopped_at = max(json.loads(line)["step"] for line in metrics.read_text().splitlines())
    assert stopped_at < steps and len(kept) < stopped_at  # the premise: the killed wandb-core lost the last rows

    resumed = subprocess.run([*args, "--resume"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    files = run_files(tmp_path / "out")
    assert len(files) == 2 and files[0].name == files[1].name  # one wandb run id, continued
    wandb_rows = [row for f in files for row in history_rows(f)]
    jsonl_rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    train_steps = sorted(row["global_step"] for row in wandb_rows if "train/loss" in row)
    assert train_steps == list(range(1, steps + 1))  # each step exactly once across the segments
    assert [row["step"] for row in jsonl_rows if "train/loss" in row] == list(range(1, steps + 1))
    assert logged_pairs(wandb_rows, "global_step") == logged_pairs(jsonl_rows, "step")  # every metric row, once
    assert re.search(rf"wandb: logged again the \d+ rows \(steps \d+-{stopped_at}\) that the earlier segment's wandb "
                     rf"process lost", resumed.stderr), resumed.stderr[-3000:]


def test_a_run_file_cut_off_anywhere_reads_back_up_to_the_cut(tmp_path):
    import wandb

    run = wandb.init(mode="offline", dir=tmp_path, settings=wandb.Settings(silent=True))
    for step in range(1, 401):
        run.log({"train/loss": 1 / step, "note": "x" * (step % 300), "global_step": step})  # records of many sizes
    run.finish()
    [path] = run_files(tmp_path)
    data, whole = path.read_bytes(), history_rows(path)
    assert len(data) > 3 * BLOCK and [row["global_step"] for row in whole] == list(range(1, 401))
    cut = path.with_name("cut.wandb")
    for size in [*range(0, len(data), 4099), BLOCK + BLOCK // 2]:  # inside records, headers and blocks
        cut.write_bytes(data[:size])
        rows = history_rows(cut)
        assert rows == whole[:len(rows)]
    assert len(rows) > 0  # the cut in the middle of the second block keeps the rows written before it


class StandInRun:
    """Stands in for an online wandb run resumed from a server (none is reachable here): wandb.init fills a resumed
    run's summary from the server, so summary["global_step"] is the last step the server received."""
    id, dir = "abc123", "/nonexistent/files"

    def __init__(self, summary: dict):
        self.summary, self.settings, self.logged = summary, SimpleNamespace(mode="online"), []

    def define_metric(self, *args, **kwargs):
        pass

    def log(self, row: dict):
        self.logged.append(row)


@pytest.mark.parametrize("summary, replayed", [({"global_step": 3}, [4, 4, 5]), ({}, []),
                                               ({"global_step": 5}, [])])
def test_online_a_resumed_run_logs_again_the_steps_after_the_servers_last(tmp_path, summary, replayed):
    folder = RunFolder(tmp_path)
    rows = [{"step": s, "train/loss": s / 10} for s in range(1, 6)] + [{"step": 4, "eval/loss": None},
                                                                        {"step": 6, "train/loss": 0.6}]
    folder.metrics_jsonl.write_text("".join(json.dumps(row) + "\n" for row in sorted(rows, key=lambda r: r["step"]))
                                    + '{"step": 7, "tr')  # the tail a kill cut short
    backend = WandbBackend(StandInRun(summary), None, log_model=False)
    run = RunInfo(parse_args([]), folder, "run", {}, start_step=5, resumed={"wandb_id": "abc123"})
    log_lost_rows_again(backend, run)  # step 6 is after the checkpoint (step 5): never part of the run
    assert [row["global_step"] for row in backend.run.logged] == replayed


def test_the_model_artifact_takes_a_sharded_checkpoint_s_folder_and_a_pt_file(tmp_path):
    """--wandb_log_model: a sharded checkpoint (an FSDP run's folder) goes into the artifact with its files under its
    name, a .pt file as itself. The artifact is wandb's own; the run is a stand-in that keeps what is logged (no
    server is reachable here)."""
    import wandb

    from gpt_trainer.tracking.base import RunSummary

    latest = tmp_path / "latest"
    latest.mkdir()
    for name in ("manifest.json", "state.json", "shard-00001-model-00001-of-00001.safetensors"):
        (latest / name).write_text(name)
    (tmp_path / "best.pt").write_bytes(b"a checkpoint")
    run, logged = StandInRun({}), []
    run.log_artifact = lambda artifact, aliases: logged.append(artifact)
    run.finish = lambda exit_code: None
    WandbBackend(run, wandb, log_model=True).close(RunSummary(checkpoints=[tmp_path / "best.pt", latest]))
    assert sorted(logged[0].manifest.entries) == ["best.pt", "latest/manifest.json",
                                                  "latest/shard-00001-model-00001-of-00001.safetensors",
                                                  "latest/state.json"]
