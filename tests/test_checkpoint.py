import random
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt_trainer import checkpoint
from gpt_trainer.errors import UsageError
from gpt_trainer.rundir import RunFolder
from gpt_trainer.tokenizer import CharTokenizer


FIXTURES = Path(__file__).parent / "fixtures"


def minimal_state(step: int) -> dict:
    return {"format_version": checkpoint.FORMAT_VERSION, "model": {}, "config": {}, "trainer": {"step": step}}


def test_a_crash_mid_write_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "latest.pt"
    checkpoint.save_atomic(minimal_state(step=1), path)

    def crash(state, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # the process dies mid-write
    monkeypatch.setattr(checkpoint.torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_atomic(minimal_state(step=2), path)
    monkeypatch.undo()
    assert checkpoint.load(path)["trainer"]["step"] == 1
    assert [p.name for p in path.parent.iterdir()] == ["latest.pt"]  # no temporary left behind


def test_a_truncated_file_is_a_clear_error(tmp_path):
    (tmp_path / "broken.pt").write_bytes(b"\x80\x02garbage")
    with pytest.raises(UsageError, match="not a readable checkpoint"):
        checkpoint.load(tmp_path / "broken.pt")


def test_rng_states_round_trip():
    saved = checkpoint.rng_states()
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    checkpoint.restore_rng_states(saved)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_shape_mismatch_names_each_difference(tiny_cfg):
    cfg = tiny_cfg()
    tokenizer = CharTokenizer.train("abc")
    saved = {"config": {**cfg.to_dict(), "n_layer": 4, "n_embd": 64}, "vocab_size": 3, "tokenizer": tokenizer.to_dict()}
    with pytest.raises(UsageError, match="n_layer: checkpoint 4, now 2; n_embd: checkpoint 64, now 32"):
        checkpoint.check_same_shape(saved, cfg, tokenizer, "ckpt.pt")
    other = CharTokenizer.train("xyz")
    saved["config"] = cfg.to_dict()
    with pytest.raises(UsageError, match="different tokens"):
        checkpoint.check_same_shape(saved, cfg, other, "ckpt.pt")


def test_resume_finds_latest_or_reports_a_missing_path(tmp_path):
    here = RunFolder(tmp_path / "out")
    assert checkpoint.find_resume_checkpoint("latest", here) is None  # nothing yet: start fresh
    (tmp_path / "run").mkdir()
    checkpoint.save_atomic({}, RunFolder(tmp_path / "run").latest)
    assert checkpoint.find_resume_checkpoint(str(tmp_path / "run"), here) == RunFolder(tmp_path / "run").latest
    with pytest.raises(UsageError, match="no checkpoint there"):
        checkpoint.find_resume_checkpoint(str(tmp_path / "nowhere.pt"), here)


def test_a_format_1_checkpoint_loads_as_the_current_format():
    """tests/fixtures/checkpoint_v1.pt was written by the trainer before checkpoints had a format version."""
    state = checkpoint.load(FIXTURES / "checkpoint_v1.pt")
    assert state["format_version"] == checkpoint.FORMAT_VERSION
    assert state["trainer"]["step"] == 3 and state["sampler"]["position"] > 0
    assert state["tracker"] == {"run_name": "fixture-v1", "wandb_id": None}
    assert state["config"]["n_layer"] == 1 and state["tokenizer"]["kind"] == "char"
    assert {"model", "optimizer", "scaler", "rng"} <= set(state) and "scheduler" not in state


def test_a_foreign_or_newer_file_is_a_clear_error(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    with pytest.raises(UsageError, match="not a checkpoint written by train_single_gpu.py"):
        checkpoint.load(tmp_path / "foreign.pt")
    torch.save({**minimal_state(1), "format_version": 99}, tmp_path / "future.pt")
    with pytest.raises(UsageError, match="checkpoint format 99, but this gpt-trainer reads formats 1 to 3"):
        checkpoint.load(tmp_path / "future.pt")
