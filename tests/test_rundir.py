"""The run folder's rule, on real folders: what it accepts, what it refuses, and what --overwrite removes."""

import json

import pytest

from gpt_trainer.errors import UsageError
from gpt_trainer.rundir import MARKER, RunFolder


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


def test_clear_removes_every_own_entry_and_keeps_the_users_notes(tmp_path):
    folder = RunFolder(tmp_path)
    folder.mark()
    for name in ("config.json", "metrics.jsonl", "samples.txt"):
        (tmp_path / name).write_text("x")
    for name in ("checkpoints", "logs/run-a", "wandb/offline-run-1", "swanlog/run-1"):
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / "file").write_text("x")
    (tmp_path / "notes.txt").write_text("mine")
    removed = folder.clear()
    assert sorted(removed) == ["checkpoints", "config.json", "logs", "metrics.jsonl", "samples.txt", "swanlog",
                               "wandb"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [MARKER, "notes.txt"]
    assert (tmp_path / "notes.txt").read_text() == "mine"
