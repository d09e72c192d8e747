"""SwanLab with the real library, offline (no SwanLab server can be reached here): the local record read back with
SwanLab's own reader (tests/swanlab_offline.py) against TensorBoard's event files; where a key comes from (never the
key); no key, no server, no package, a failing SwanLab; resume."""

import os
import re
import socket
import sys
from pathlib import Path

import pytest

from gpt_trainer.commands.train import main
from gpt_trainer.tracking.swanlab import swanlab_key_source
from tests.conftest import files_containing, scalars
from tests.swanlab_offline import finish_states, media_steps, read_records, run_folders, scalar_steps, start_record

FAKE_KEY = "FAKEKEY_swanlab_" + "q9" * 16
pytestmark = pytest.mark.usefixtures("clean_wandb_env")  # also clears every SWANLAB_ variable; HOME is a temp folder


def closed_port() -> int:
    with socket.socket() as s:  # nothing listens there once it is closed: connections are refused at once
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tensorboard_wandb_and_swanlab_get_the_same_metrics_at_the_same_steps(poems_argv, tmp_path, monkeypatch,
                                                                              capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    argv = poems_argv("--max_steps=12", "--eval_interval=6", "--report_to=tensorboard,wandb,swanlab",
                      "--wandb_tags=mine")
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert captured.err.count("swanlab: no API key") == 1 and "logs offline" in captured.err
    out = tmp_path / "out"
    [logdir] = list((out / "logs").iterdir())
    tb, _ = scalars(logdir)
    [folder] = run_folders(out / "swanlog")
    records = read_records(folder)
    assert scalar_steps(records) == tb  # every metric name, at every step
    assert tb["train/loss"] == list(range(1, 13)) and tb["eval/loss"] == sorted({6, 12, *tb["epoch/val_loss"]})
    assert media_steps(records) == {"samples/春江": [6, 12], "samples/往事": [6, 12]}
    start = start_record(records)
    assert start.name == logdir.name and start.project == "gpt-training"  # the run name, as for TensorBoard and wandb
    assert {"tiny", "fp32", "mine"} <= set(start.tags)
    config = (folder / "files" / "config.yaml").read_text(encoding="utf-8")
    assert "precision" in config and "global_batch_size" in config  # the resolved config, not only the flags
    assert finish_states(records) == ["RUN_STATE_FINISHED"]
    sync = re.search(r"swanlab sync -i (\S+) (\S+)", captured.err)
    assert sync and sync.group(1) == start.id and Path(sync.group(2)) == folder
    assert "swanlab:" not in captured.out  # offline, SwanLab's own lines would only repeat ours


def test_a_planted_key_with_no_reachable_server_logs_offline_and_is_written_nowhere(poems_argv, tmp_path, monkeypatch,
                                                                                    capsys):
    monkeypatch.setenv("SWANLAB_API_KEY", FAKE_KEY)
    monkeypatch.setenv("SWANLAB_API_HOST", f"http://127.0.0.1:{closed_port()}")
    assert main(poems_argv("--max_steps=3", "--report_to=swanlab")) == 0
    captured = capsys.readouterr()
    assert "did not answer" in captured.err and "logs offline" in captured.err
    out = tmp_path / "out"
    assert run_folders(out / "swanlog") and files_containing(out, FAKE_KEY) == []
    assert FAKE_KEY not in captured.out + captured.err
    (out / "control.txt").write_text(FAKE_KEY)  # positive control: the search finds the key where it is
    assert files_containing(out, FAKE_KEY) == [out / "control.txt"]


def test_key_sources_in_swanlab_order_without_reading_the_key_out(tmp_path, monkeypatch):
    assert swanlab_key_source() is None
    login_file = Path(os.environ["HOME"]) / ".swanlab" / ".netrc"  # where `swanlab login` writes
    login_file.parent.mkdir()
    login_file.write_text(f"machine https://api.example\n  login https://example\n  password {FAKE_KEY}\n")
    assert swanlab_key_source() == str(login_file)
    monkeypatch.setenv("SWANLAB_ROOT", str(tmp_path / "elsewhere"))  # SwanLab's own setting moves the login file
    assert swanlab_key_source() is None
    monkeypatch.setenv("SWANLAB_API_KEY", FAKE_KEY)
    assert swanlab_key_source() == "SWANLAB_API_KEY"


def test_without_swanlab_installed_one_notice_and_training_goes_on(poems_argv, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "swanlab", None)  # makes `import swanlab` fail as if it were not installed
    assert main(poems_argv("--max_steps=2", "--report_to=tensorboard,swanlab")) == 0
    assert capsys.readouterr().err.count("swanlab is not installed") == 1
    [logdir] = list((tmp_path / "out" / "logs").iterdir())
    assert scalars(logdir)[0]["train/loss"] == [1, 2]


def test_a_swanlab_error_while_logging_never_stops_training(poems_argv, tmp_path, monkeypatch, capsys):
    from swanlab.sdk.internal.run import Run

    def broken_log(self, *args, **kwargs):
        raise ConnectionError("the SwanLab server went away (simulated)")
    monkeypatch.setattr(Run, "log", broken_log)
    assert main(poems_argv("--max_steps=4", "--report_to=tensorboard,swanlab")) == 0
    err = capsys.readouterr().err
    assert err.count("swanlab: logging failed (ConnectionError") == 1 and "SwanLab is off for the rest" in err
    [logdir] = list((tmp_path / "out" / "logs").iterdir())
    assert scalars(logdir)[0]["train/loss"] == [1, 2, 3, 4]


def test_resume_continues_the_same_swanlab_id_and_the_sync_command_names_every_folder(poems_argv, tmp_path, capsys):
    assert main(poems_argv("--max_steps=3", "--report_to=swanlab", "--save_interval=3")) == 0
    assert main(poems_argv("--max_steps=6", "--report_to=swanlab", "--resume")) == 0
    first, second = run_folders(tmp_path / "out" / "swanlog")
    assert first.name.split("-")[-1] == second.name.split("-")[-1]  # offline, a resumed run is a second folder
    run_id = start_record(read_records(first)).id
    assert start_record(read_records(second)).id == run_id
    steps = scalar_steps(read_records(first))["train/loss"] + scalar_steps(read_records(second))["train/loss"]
    assert steps == [1, 2, 3, 4, 5, 6]  # every step once, none backwards
    assert f"swanlab sync -i {run_id} {first} {second}" in capsys.readouterr().err


def test_swanlab_modes_are_honoured(poems_argv, tmp_path, monkeypatch):
    monkeypatch.setenv("SWANLAB_MODE", "disabled")
    assert main(poems_argv("--max_steps=1", "--report_to=swanlab", f"--output_dir={tmp_path / 'a'}")) == 0
    assert not (tmp_path / "a" / "swanlog").exists()
    monkeypatch.setenv("SWANLAB_MODE", "cloud")
    assert main(poems_argv("--max_steps=1", "--report_to=swanlab", "--swanlab_mode=disabled",
                           f"--output_dir={tmp_path / 'b'}")) == 0
    assert not (tmp_path / "b" / "swanlog").exists()  # the flag beats the environment
    monkeypatch.setenv("SWANLAB_MODE", "")  # compose passes an unset setting as an empty string
    monkeypatch.setenv("SWANLAB_WORKSPACE", "")
    assert main(poems_argv("--max_steps=1", "--report_to=swanlab", f"--output_dir={tmp_path / 'c'}")) == 0
    assert run_folders(tmp_path / "c" / "swanlog")


def test_a_project_name_swanlab_would_refuse_is_refused_before_anything_is_written(poems_argv, tmp_path, capsys):
    assert main(poems_argv("--report_to=swanlab", "--swanlab_project=my project")) == 2
    assert "SwanLab accepts 1 to 100 letters, digits and _ - + . only" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
