"""The run folder's rule, on real folders: what it accepts, what it refuses, and what --overwrite removes."""

import json
import re
import shutil
from pathlib import Path

import pytest

from gpt_trainer.commands import train as cli
from gpt_trainer.errors import UsageError
from gpt_trainer.system.rundir import MARKER, RunFolder
from gpt_trainer.train import checkpoint


def test_a_new_or_empty_folder_is_accepted(tmp_path):
    RunFolder(tmp_path / "not-yet").check_writable(resuming=False, overwrite=False)
    (tmp_path / "empty").mkdir()
    RunFolder(tmp_path / "empty").check_writable(resuming=False, overwrite=False)


def test_a_folder_with_a_users_file_is_refused_naming_it(tmp_path):
    (tmp_path / "thesis.tex").write_text("mine")
    (tmp_path / "config.json").write_text('{"mine": true}')  # a config.json of the user's, not a run's
    with pytest.raises(UsageError, match=r"did not write \(config.json, thesis.tex\)"):
        RunFolder(tmp_path).check_writable(resuming=False, overwrite=True)
    assert (tmp_path / "thesis.tex").read_text() == "mine"


def test_a_marked_run_folder_accepts_foreign_files_beside_the_run(tmp_path):
    folder = RunFolder(tmp_path)
    folder.mark()
    assert json.loads((tmp_path / MARKER).read_text())["written_by"] == "gpt-trainer"
    (tmp_path / "notes.txt").write_text("lr 3e-4 looked good")
    assert folder.foreign_entries() == []
    folder.check_writable(resuming=True, overwrite=False)


def test_a_run_folder_of_a_version_before_the_marker_is_recognised(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"run_name": "old", "segments": [{"from_step": 0}]}))
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    (tmp_path / "samples.txt").write_text("=== step 1 ===\n")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "logs").mkdir()
    folder = RunFolder(tmp_path)
    assert not folder.marker.exists() and folder.foreign_entries() == []
    folder.check_writable(resuming=True, overwrite=False)


def write(path: Path, text: str = "x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_clear_removes_exactly_the_runs_files_and_keeps_the_users_byte_for_byte(tmp_path):
    folder = RunFolder(tmp_path)
    folder.mark()
    folder.write_config({"run_name": "run-a"}, 0, {})
    run = [write(tmp_path / name) for name in (
        "metrics.jsonl", "samples.txt", ".metrics.jsonl.tmp", "checkpoints/latest.pt", "checkpoints/best.pt",
        "checkpoints/.latest.pt.tmp-4242", "logs/run-a/events.out.tfevents.1.host.1.0",
        "logs/run-a/events.out.tfevents.2.host.1.1", "wandb/offline-run-1/run-1.wandb", "swanlog/run-1/run-1.swanlab")]
    users = {path: path.read_bytes() for path in (
        write(tmp_path / "notes.txt", "mine"), write(tmp_path / "checkpoints/keep-step6.pt", "a copy of step 6"),
        write(tmp_path / "logs/my_notes.txt", "lr 3e-4 looked good"), write(tmp_path / "logs/run-a/plot.png", "png"),
        write(tmp_path / "logs/by-hand/events.out.tfevents.9.host.1.0", "another run's curves"))}
    removed, kept = folder.clear()
    assert sorted(removed) == sorted(["config.json", "metrics.jsonl", "samples.txt", ".metrics.jsonl.tmp",
                                      "checkpoints/latest.pt", "checkpoints/best.pt",
                                      "checkpoints/.latest.pt.tmp-4242", "logs/run-a/ (2 TensorBoard event files)",
                                      "wandb/", "swanlog/"])
    assert kept == ["notes.txt", "checkpoints/keep-step6.pt", "logs/my_notes.txt", "logs/run-a/plot.png",
                    "logs/by-hand/ (1 TensorBoard event file)"]
    assert not any(path.exists() for path in [*run, folder.config_json, tmp_path / "wandb", tmp_path / "swanlog"])
    assert {path: path.read_bytes() for path in users} == users
    assert folder.marker.exists() and folder.foreign_entries() == []


def test_clear_removes_the_folders_it_empties(tmp_path):
    folder = RunFolder(tmp_path)
    folder.mark()
    folder.write_config({"run_name": "run-a"}, 0, {})
    for name in ("checkpoints/latest.pt", "logs/run-a/events.out.tfevents.1.host.1.0", "samples.txt"):
        write(tmp_path / name)
    assert folder.clear()[1] == []
    assert sorted(p.name for p in tmp_path.iterdir()) == [MARKER]


def test_clear_removes_sharded_checkpoints_complete_set_aside_or_half_written_and_keeps_the_users(tmp_path):
    """An --parallel fsdp run's checkpoints are folders: their files (manifest, state, shards) go, and the folders with
    them; a file of the user's inside one stays, and its folder with it. A sharded latest is a run to resume too."""
    folder = RunFolder(tmp_path)
    folder.mark()
    run = [write(tmp_path / "checkpoints" / name / file) for name in ("latest", "best", ".latest.previous")
           for file in ("manifest.json", "state.json", "shard-00001-model-00001-of-00001.safetensors")]
    run.append(write(tmp_path / "checkpoints" / ".best.tmp-12" / "shard-00002-model-00001-of-00001.safetensors"))
    mine = write(tmp_path / "checkpoints" / "best" / "my-notes.txt", "keep")
    with pytest.raises(UsageError, match=r"already holds a training run \(\S+checkpoints/latest\)"):
        folder.check_writable(resuming=False, overwrite=False)
    removed, kept = folder.clear()
    assert "checkpoints/latest/shard-00001-model-00001-of-00001.safetensors" in removed and len(removed) == len(run)
    assert kept == ["checkpoints/best/my-notes.txt"] and mine.read_text() == "keep"
    assert sorted(p.name for p in folder.checkpoints.iterdir()) == ["best"]


def test_every_run_name_the_folder_used_is_cleared_not_only_config_jsons(tmp_path):
    """A run name config.json no longer names (a --resume from another folder's run took that run's name): the marker
    recorded it, so its TensorBoard events go too."""
    folder = RunFolder(tmp_path)
    folder.mark()
    folder.write_config({"run_name": "first"}, 0, {})
    folder.write_config({"run_name": "second"}, 0, {})
    assert json.loads(folder.config_json.read_text())["run_name"] == "second"
    events = [write(tmp_path / "logs" / name / "events.out.tfevents.1.host.1.0") for name in ("first", "second")]
    folder.clear()
    assert not any(event.exists() for event in events) and not folder.logs.exists()


def test_a_hand_edited_marker_cannot_send_clear_outside_the_logs_folder(tmp_path):
    out = tmp_path / "out"
    folder = RunFolder(out)
    out.mkdir()
    folder.write_marker({"written_by": "gpt-trainer", "run_names": ["../..", "..", "/etc", "a/../../.."]})
    outside = write(tmp_path / "events.out.tfevents.1.host.1.0", "not the run's")
    assert folder.run_names() == []
    folder.clear()
    assert outside.read_text() == "not the run's"


def test_overwrite_keeps_the_users_files_in_checkpoints_and_logs_and_says_what_it_removed_and_kept(tiny_argv,
                                                                                                   tmp_path, capsys):
    out = tmp_path / "out"
    argv = tiny_argv("--max_steps=2", "--eval_interval=2", "--report_to=tensorboard")
    assert cli.main(argv) == 0
    [first_run] = folder_names(out / "logs")
    users = {path: path.read_bytes() for path in (
        shutil.copy(out / "checkpoints" / "latest.pt", out / "checkpoints" / "keep-step2.pt"),
        write(out / "logs" / "my_notes.txt", "the lr was too high"),
        write(out / "checkpoints" / "notes.md", "step 2 sounded best"))}
    capsys.readouterr()
    assert cli.main([*argv, "--overwrite", "--wandb_run_name=second"]) == 0
    said = capsys.readouterr().err
    assert {path: path.read_bytes() for path in users} == users
    assert folder_names(out / "logs") == ["second"]  # the first run's TensorBoard folder is gone, events and all
    assert re.search(r"--overwrite: removed the earlier run's .*checkpoints/latest\.pt, checkpoints/best\.pt, "
                     + re.escape(f"logs/{first_run}/ (2 TensorBoard event files)") + r" from \S+; kept what no run "
                     r"wrote: checkpoints/keep-step2\.pt, checkpoints/notes\.md, logs/my_notes\.txt", said), said
    assert checkpoint.load(out / "checkpoints" / "latest.pt")["tracker"]["run_name"] == "second"


def folder_names(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.is_dir())
