import os
import random
import re
import shlex
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt_trainer.commands import train as cli
from gpt_trainer.data.tokenizer import CharTokenizer
from gpt_trainer.errors import UsageError
from gpt_trainer.system.rundir import RunFolder
from gpt_trainer.train import checkpoint
from tests.conftest import make_trainer

FIXTURES = Path(__file__).parent / "fixtures"


def minimal_state(step: int) -> dict:
    """Every key a checkpoint has, most of them empty."""
    return {**{key: {} for key in checkpoint.PARTS}, "format_version": checkpoint.FORMAT_VERSION,
            "trainer": {"step": step}}


class RunsCode:
    """What an attacker plants in a checkpoint: unpickling this runs a shell command, one that creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def plant_code(path: Path, marker: Path) -> None:
    """Rewrite the real checkpoint at `path` as an attacker would: everything as it was, and the run name a value
    whose unpickling runs a command (a real torch.save zip, its CRCs intact). Then show that the payload is live:
    loading the file the unsafe way (weights_only=False, plain pickle) runs it and creates `marker`, removed again."""
    state = checkpoint.load(path)
    state["tracker"]["run_name"] = RunsCode(marker)
    torch.save(state, path)
    assert not marker.exists()
    torch.load(path, weights_only=False)
    assert marker.exists(), "the planted payload did not run: a test that it is refused would prove nothing"
    marker.unlink()


def nanogpt_checkpoint(path: Path) -> Path:
    """A checkpoint of the shape nanoGPT's train.py saves as ckpt.pt, for a one-layer character model: the weights
    under nanoGPT's names (the output layer tied to the embedding), an AdamW state after a real step, model_args,
    iter_num, best_val_loss (a tensor there) and its config."""
    n_embd, vocab, block = 16, 65, 8
    shapes = {"transformer.wte.weight": (vocab, n_embd), "transformer.wpe.weight": (block, n_embd),
              "transformer.h.0.ln_1.weight": (n_embd,), "transformer.h.0.attn.c_attn.weight": (3 * n_embd, n_embd),
              "transformer.h.0.attn.c_proj.weight": (n_embd, n_embd), "transformer.h.0.ln_2.weight": (n_embd,),
              "transformer.h.0.mlp.c_fc.weight": (4 * n_embd, n_embd),
              "transformer.h.0.mlp.c_proj.weight": (n_embd, 4 * n_embd), "transformer.ln_f.weight": (n_embd,)}
    weights = {name: torch.nn.Parameter(torch.randn(shape) * 0.02) for name, shape in shapes.items()}
    optimizer = torch.optim.AdamW(weights.values(), lr=1e-3, betas=(0.9, 0.99))
    sum(w.square().sum() for w in weights.values()).backward()
    optimizer.step()
    model = {name: w.detach() for name, w in weights.items()}
    model["lm_head.weight"] = model["transformer.wte.weight"]
    model_args = {"n_layer": 1, "n_head": 2, "n_embd": n_embd, "block_size": block, "bias": False,
                  "vocab_size": vocab, "dropout": 0.0}
    config = {"out_dir": "out-shakespeare-char", "dataset": "shakespeare_char", "batch_size": 64,
              "learning_rate": 1e-3, "max_iters": 5000, "init_from": "scratch", "compile": True, **model_args}
    torch.save({"model": model, "optimizer": optimizer.state_dict(), "model_args": model_args, "iter_num": 250,
                "best_val_loss": torch.tensor(1.4697), "config": config}, path)
    return path


def other_program_checkpoint(path: Path) -> Path:
    """A checkpoint of another program that also has `model` and `config` (what format 1 was once taken to be)."""
    torch.save({"model": {"fc.weight": torch.zeros(2, 2)}, "config": {"lr": 0.1}, "epoch": 3}, path)
    return path


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


def test_a_checkpoint_a_run_writes_is_plain_data(tiny_cfg, tmp_path):
    """A real run's checkpoint loads with torch's weights-only reader and nothing allowed beyond it: sentencepiece's
    model (bytes), AdamW's betas (a tuple), every RNG state and the GradScaler's state. The run is on the CPU, whose
    fp32 needs no scaler: the scaler's state is that of a CPU GradScaler after a real scaled step (the same class and
    state_dict an fp16 run on a GPU saves)."""
    make_trainer(tiny_cfg("--tokenizer=sentencepiece", "--vocab_size=2000", "--max_steps=2")).train()
    path = RunFolder(tmp_path / "out").latest
    scaler, weight = torch.amp.GradScaler("cpu"), torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.AdamW([weight])
    scaler.scale(weight.sum()).backward()
    scaler.step(optimizer)
    scaler.update()
    checkpoint.save_atomic({**torch.load(path, weights_only=True), "scaler": scaler.state_dict()}, path)
    saved = torch.load(path, weights_only=True)  # no allowance at all: what a run writes is plain data
    assert isinstance(saved["tokenizer"]["model_proto"], bytes) and saved["tokenizer"]["kind"] == "sentencepiece"
    assert saved["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.95)
    assert saved["scaler"] == scaler.state_dict() and saved["scaler"]["scale"] > 0
    assert isinstance(saved["rng"]["numpy"]["state"]["key"], list)
    state = checkpoint.load(path)
    assert state["trainer"]["step"] == 2
    checkpoint.restore_rng_states(state["rng"])
    drawn = (random.random(), np.random.rand(), torch.rand(1).item())
    checkpoint.restore_rng_states(state["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == drawn


def test_checkpoints_of_earlier_formats_load_with_only_numpy_s_array_allowed():
    """The fixtures hold numpy's RNG state as a tuple with an array, as checkpoints did until 2026-12-03: torch's
    reader refuses that array unless it is allowed, and the allowance builds arrays and nothing else of numpy's."""
    for name in ("checkpoint_v1.pt", "checkpoint_v2.pt"):
        with pytest.raises(Exception, match="numpy"):
            torch.load(FIXTURES / name, weights_only=True)
        state = checkpoint.load(FIXTURES / name)
        kind, key, *_ = state["rng"]["numpy"]
        assert kind == "MT19937" and key.dtype == np.uint32 and key.shape == (624,)
        checkpoint.restore_rng_states(state["rng"])
        drawn = np.random.rand()
        checkpoint.restore_rng_states(state["rng"])
        assert np.random.rand() == drawn


def test_a_numpy_object_other_than_an_array_is_refused(tmp_path):
    path = tmp_path / "numpy_state.pt"
    torch.save({**minimal_state(1), "rng": {"numpy": np.random.RandomState(1)}}, path)  # pickled by numpy's code
    with pytest.raises(checkpoint.RefusedCheckpoint, match=r"would call numpy\.random\S*"):
        checkpoint.load(path)


def test_a_checkpoint_that_would_run_code_is_refused_and_nothing_runs(tmp_path, capsys):
    """The payload runs when the file is loaded the unsafe way (plant_code shows it); checkpoint.load refuses the
    file, naming what it would call, and the marker the payload creates does not appear. With an intact best.pt
    beside it, --resume does not fall back: a planted file is not damage, and the user should know."""
    latest, best, marker = RunFolder(tmp_path).latest, RunFolder(tmp_path).best, tmp_path / "marker"
    latest.parent.mkdir()
    shutil.copy(FIXTURES / "checkpoint_v2.pt", latest)
    shutil.copy(FIXTURES / "checkpoint_v2.pt", best)
    plant_code(latest, marker)
    with pytest.raises(checkpoint.RefusedCheckpoint, match=r"latest\.pt was refused, and nothing in it was run: "
                                                          r"loading it would call posix\.system"):
        checkpoint.load(latest)
    with pytest.raises(checkpoint.RefusedCheckpoint):
        checkpoint.load_for_resume(latest)
    assert not marker.exists()
    assert "Resuming from" not in capsys.readouterr().err


def test_nanogpt_s_checkpoint_is_named_as_such(tmp_path):
    path = nanogpt_checkpoint(tmp_path / "ckpt.pt")
    assert {"model_args", "iter_num"} <= set(torch.load(path, weights_only=True))  # a real file of that shape
    with pytest.raises(UsageError, match=r"ckpt\.pt is nanoGPT's checkpoint \(it has model_args and iter_num\), not "
                                         r"one written by train_single_gpu\.py"):
        checkpoint.load(path)


def test_a_dict_with_model_and_config_from_another_program_is_refused_naming_its_keys(tmp_path):
    other_program_checkpoint(tmp_path / "other.pt")
    with pytest.raises(UsageError, match=r"other\.pt is not a checkpoint written by train_single_gpu\.py \(its keys: "
                                         r"config, epoch, model; a file of another program\?\)"):
        checkpoint.load(tmp_path / "other.pt")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(UsageError, match=r"not a checkpoint written by train_single_gpu\.py \(it holds Tensor"):
        checkpoint.load(tmp_path / "tensor.pt")


def cut_points(path: Path) -> dict[str, int]:
    """Where a copy or a save can stop: at nothing, after one byte, in the middle of the pickle, in the middle of a
    tensor, one byte short of the end."""
    with zipfile.ZipFile(path) as container:
        members = {Path(m.filename).name: m for m in container.infolist()}
    middle = {name: members[name].header_offset + 64 + members[name].compress_size // 2 for name in ("data.pkl", "0")}
    size = path.stat().st_size
    return {"empty": 0, "one byte": 1, "mid pickle": middle["data.pkl"], "mid tensor": middle["0"],
            "one byte short": size - 1}


@pytest.mark.parametrize("cut", ["empty", "one byte", "mid pickle", "mid tensor", "one byte short"])
def test_a_latest_pt_cut_short_falls_back_to_an_intact_best_pt(cut, tmp_path, capsys):
    latest, best = RunFolder(tmp_path).latest, RunFolder(tmp_path).best
    latest.parent.mkdir()
    shutil.copy(FIXTURES / "checkpoint_v2.pt", best)
    whole = (FIXTURES / "checkpoint_v2.pt").read_bytes()
    latest.write_bytes(whole[:cut_points(FIXTURES / "checkpoint_v2.pt")[cut]])
    with pytest.raises(checkpoint.UnreadableCheckpoint, match=r"latest\.pt is not a readable checkpoint \(.+\): it "
                                                             r"was cut short"):
        checkpoint.load(latest)
    capsys.readouterr()
    saved, used = checkpoint.load_for_resume(latest)
    assert used == best and saved["trainer"]["step"] == 3
    assert re.search(r"latest\.pt is not a readable checkpoint .* Resuming from \S+best\.pt \(step 3\) instead",
                     capsys.readouterr().err)


def test_a_cut_short_latest_pt_and_a_damaged_best_pt_stop_the_resume(tmp_path):
    latest, best = RunFolder(tmp_path).latest, RunFolder(tmp_path).best
    latest.parent.mkdir()
    latest.write_bytes((FIXTURES / "checkpoint_v2.pt").read_bytes()[:1000])
    best.write_bytes((FIXTURES / "checkpoint_v2.pt").read_bytes()[:-1])
    with pytest.raises(checkpoint.DamagedCheckpoint, match="There is no intact checkpoint to fall back to"):
        checkpoint.load_for_resume(latest)


def test_training_resumes_from_best_pt_when_latest_pt_was_cut_short(tiny_argv, tmp_path, capsys):
    argv = tiny_argv("--max_steps=4", "--eval_interval=4")
    assert cli.main(argv) == 0
    checkpoints = tmp_path / "out" / "checkpoints"
    (checkpoints / "latest.pt").write_bytes((checkpoints / "latest.pt").read_bytes()[:5000])
    capsys.readouterr()
    assert cli.main([*argv, "--resume", "--max_steps=6"]) == 0
    captured = capsys.readouterr()
    assert re.search(r"latest\.pt is not a readable checkpoint \(it is not the zip container torch\.save writes\)"
                     r".* Resuming from \S+best\.pt \(step 4\) instead", captured.err), captured.err
    assert f"resumed from {checkpoints / 'best.pt'} at step 4" in captured.out
    assert checkpoint.load(checkpoints / "latest.pt")["trainer"]["step"] == 6
