"""wandb with the real library, offline: where a key comes from (never the key), modes, no key, no network, no
package; the run files are read back record by record (tests/wandb_offline.py)."""

import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from gpt_trainer.cli import main
from gpt_trainer.tracking.wandb import wandb_key_source
from tests.conftest import files_containing, scalars, script_env
from tests.wandb_offline import run_files

ROOT = Path(__file__).resolve().parents[1]
FAKE_KEY = "FAKEKEY_" + "x7" * 20  # well-formed (40+ word characters) and easy to search for
pytestmark = pytest.mark.usefixtures("clean_wandb_env")


def test_no_key_and_no_terminal_logs_offline_and_prints_the_sync_command(poems_argv, tmp_path, capsys):
    assert main(poems_argv("--max_steps=2", "--report_to=wandb")) == 0
    err = capsys.readouterr().err
    assert "no API key" in err and "logs offline" in err
    sync = re.search(r"wandb sync (\S+)", err)
    assert sync and Path(sync.group(1)).is_dir() and run_files(Path(sync.group(1)).parent)


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
