import base64
import hashlib
import json
import math
import os
import pickle
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
from tests.conftest import GPT2_ADAMW, make_trainer

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


class StandInGPUs:
    """Stands in for torch.cuda's RNG functions on a machine with `count` GPUs (no GPU runs here): one state per GPU,
    this process on GPU `current`; a GPU the machine lacks raises IndexError, as torch.cuda.default_generators[i]
    does. get_rng_state_all and set_rng_state_all behave as torch's own (one state per visible GPU, in order)."""

    def __init__(self, monkeypatch, count: int, current: int = 0):
        self.states, self.current = [torch.full((8,), i, dtype=torch.uint8) for i in range(count)], current
        for name in ("get_rng_state", "set_rng_state", "get_rng_state_all", "set_rng_state_all"):
            monkeypatch.setattr(torch.cuda, name, getattr(self, name))
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)

    def index(self, device) -> int:
        return self.current if device == "cuda" else int(device)

    def get_rng_state(self, device="cuda") -> torch.Tensor:
        return self.states[self.index(device)].clone()

    def set_rng_state(self, state: torch.Tensor, device="cuda") -> None:
        self.states[self.index(device)] = state.clone()

    def get_rng_state_all(self) -> list[torch.Tensor]:
        return [state.clone() for state in self.states]

    def set_rng_state_all(self, states: list[torch.Tensor]) -> None:
        for i, state in enumerate(states):
            self.set_rng_state(state, i)


def test_a_checkpoint_from_an_8_gpu_node_resumes_on_2_gpus(monkeypatch):
    """A checkpoint of the format before 2026-12 holds the main process's get_rng_state_all(): 8 GPU states on an 8-GPU
    node. Resumed on 2 GPUs (stand-ins), this process's GPU gets the state the main process drew with (the first),
    and no GPU the machine lacks is asked for."""
    old = {**checkpoint.rng_states(), "cuda": [torch.full((8,), 100 + i, dtype=torch.uint8) for i in range(8)]}
    gpus = StandInGPUs(monkeypatch, count=2, current=1)  # rank 1 of the new job
    checkpoint.restore_rng_states(old)
    assert torch.equal(gpus.states[1], old["cuda"][0])
    assert torch.equal(gpus.states[0], torch.zeros(8, dtype=torch.uint8))  # GPU 0 is not this process's


def test_a_process_saves_the_rng_state_of_its_own_gpu_only(monkeypatch, tmp_path):
    """On an 8-GPU node (stand-ins) the process on GPU 3 saves GPU 3's state alone; through a checkpoint file it
    resumes on a machine with one GPU."""
    StandInGPUs(monkeypatch, count=8, current=3)
    saved = checkpoint.rng_states()
    assert len(saved["cuda"]) == 1 and torch.equal(saved["cuda"][0], torch.full((8,), 3, dtype=torch.uint8))
    torch.save({"rng": saved}, tmp_path / "rng.pt")
    one = StandInGPUs(monkeypatch, count=1)
    checkpoint.restore_rng_states(torch.load(tmp_path / "rng.pt", weights_only=True)["rng"])
    assert torch.equal(one.states[0], torch.full((8,), 3, dtype=torch.uint8))


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


# ---- sharded checkpoints (--parallel fsdp) --------------------------------------------------------------------------
CONSTANT_LR = ("--learning_rate=1e-3", "--min_lr=1e-3", "--warmup_steps=0", "--log_interval=1")


def sharded_run(cfg, trainer=None) -> RunFolder:
    """A tiny run whose checkpoints are written sharded, in this one process: the code an FSDP run saves and loads
    with, here with one process holding whole tensors where each process of an FSDP run holds its slices (a stand-in
    that needs no torchrun; tests/test_fsdp.py runs the real thing)."""
    trainer = trainer or make_trainer(cfg)
    trainer.checkpointer.sharded = True
    trainer.train()
    return RunFolder(Path(cfg.output_dir))


def rewrite(folder: Path, name: str, data: bytes) -> None:
    """Replace a file of a sharded checkpoint and record it in the manifest, as someone changing it on purpose would
    (so that it is no damage: the reader meets the new bytes)."""
    (folder / name).write_bytes(data)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def shard_of(folder: Path) -> Path:
    [shard] = folder.glob("shard-*.safetensors")
    return shard


def test_a_sharded_checkpoint_is_safetensors_and_json_and_a_resume_from_it_is_exact(tiny_cfg, tmp_path):
    """A resume from a sharded checkpoint trains the losses of a run never interrupted; the checkpoint is a folder of
    safetensors and JSON files (nothing pickled) whose manifest records each file's size and SHA-256; sample and export
    read its model whole, the tied output layer restored."""
    steps = lambda n: tiny_cfg(*CONSTANT_LR, *GPT2_ADAMW, f"--max_steps={n}", "--eval_interval=2")  # noqa: E731
    uninterrupted = {row["step"]: row["train/loss"] for row in make_trainer(steps(5)).train().history}
    shutil.rmtree(tmp_path / "out")
    first = make_trainer(steps(3))
    run = sharded_run(steps(3), first)
    latest = run.checkpoints / "latest"
    assert sorted(p.name for p in latest.iterdir()) == ["manifest.json", "shard-00001-model-00001-of-00001.safetensors",
                                                        "state.json"]
    manifest = json.loads((latest / "manifest.json").read_text())
    assert manifest["files"] == {path.name: {"bytes": path.stat().st_size,
                                             "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
                                 for path in latest.iterdir() if path.name != "manifest.json"}
    assert manifest["step"] == 3 and manifest["layout"] == {"parallel": "fsdp", "processes": 1}
    for path in latest.iterdir():
        assert path.read_bytes()[:1] not in (b"\x80", b"P")  # neither a pickle nor torch.save's zip
    json.loads((latest / "state.json").read_text())
    from safetensors.torch import load_file
    tensors = load_file(shard_of(latest))
    assert "model.wte.weight" in tensors and "model.lm_head.weight" not in tensors  # tied: stored once
    assert {f"optimizer.wte.weight.{key}" for key in ("exp_avg", "exp_avg_sq", "step")} <= set(tensors)

    state = checkpoint.load(latest)
    assert state["trainer"]["step"] == 3 and state["optimizer"].plain["param_groups"][0]["betas"] == (0.9, 0.95)
    assert state["model"].keys() == first.model.state_dict().keys()
    assert all(torch.equal(state["model"][k], v) for k, v in first.model.state_dict().items())
    assert state["model"]["lm_head.weight"] is state["model"]["wte.weight"]

    resumed = make_trainer(steps(5))
    resumed.restore(checkpoint.load(latest, lazy=True))
    assert resumed.step == 3 and resumed.batches.state_dict() == first.batches.state_dict()
    for mine, theirs in zip(resumed.optimizer.state_dict()["state"].values(),
                            first.optimizer.state_dict()["state"].values()):
        assert all(torch.equal(mine[key], theirs[key]) for key in theirs)
    continued = {row["step"]: row["train/loss"] for row in resumed.train().history}
    assert continued == {step: loss for step, loss in uninterrupted.items() if step > 3}
    # the resumed run is unsharded: its latest checkpoint is a .pt now, and the sharded one is gone, not left stale
    assert run.latest.is_file() and not latest.exists()
    assert [path for path in run.checkpoint_kinds("best") if path.exists()] == [checkpoint.newest(run, "best")]


def test_a_sharded_checkpoint_is_split_into_small_files_each_listed_and_checked(tiny_cfg, tmp_path, monkeypatch):
    """Each process writes its state in files of about SHARD_FILE_BYTES (the writer builds a whole file in memory): a
    small size gives several files, tensors numbered in order and none split; all are in the manifest, a resume from
    them is exact, and damage in any one of them is found."""
    monkeypatch.setattr(checkpoint, "SHARD_FILE_BYTES", 64 << 10)
    steps = lambda n: tiny_cfg(*CONSTANT_LR, *GPT2_ADAMW, f"--max_steps={n}", "--eval_interval=2")  # noqa: E731
    uninterrupted = {row["step"]: row["train/loss"] for row in make_trainer(steps(5)).train().history}
    shutil.rmtree(tmp_path / "out")
    latest = sharded_run(steps(3)).checkpoints / "latest"
    files = sorted(latest.glob("shard-*.safetensors"))
    assert len(files) > 3 and all(path.stat().st_size < 2 * (64 << 10) + (1 << 20) for path in files)
    assert [path.name for path in files] == [f"shard-00001-model-{n:05d}-of-{len(files):05d}.safetensors"
                                             for n in range(1, len(files) + 1)]
    assert set(json.loads((latest / "manifest.json").read_text())["files"]) == \
        {path.name for path in files} | {"state.json"}
    resumed = make_trainer(steps(5))
    resumed.restore(checkpoint.load(latest, lazy=True))
    assert {row["step"]: row["train/loss"] for row in resumed.train().history} == \
        {step: loss for step, loss in uninterrupted.items() if step > 3}


def test_file_numbers_fill_files_in_order_and_never_split_a_tensor(monkeypatch):
    monkeypatch.setattr(checkpoint, "SHARD_FILE_BYTES", 100)
    tensors = {"model": {"a": torch.zeros(10), "b": torch.zeros(20)},  # 40 and 80 bytes
               "optimizer": {"a": {"exp_avg": torch.zeros(5), "step": torch.tensor(1.0)},
                             "c": {"big": torch.zeros(60)}}}
    assert checkpoint.file_numbers(tensors) == {"model.a": 1, "model.b": 2, "optimizer.a.exp_avg": 2,  # 100 fits
                                                "optimizer.a.step": 3, "optimizer.c.big": 4}


def test_rng_states_and_plain_data_round_trip_through_state_json():
    saved = {"rng": checkpoint.rng_states(), "model": b"\x00\xffsentencepiece", "betas": (0.9, 0.95),
             "numbered": {0: {"step": 1}, 3: None}, "tag": {"__tuple__": [1]}, "loss": math.inf,
             "bf16": torch.arange(6, dtype=torch.bfloat16).reshape(2, 3), "empty": torch.zeros(0, 4)}
    read = json.loads(json.dumps(checkpoint.to_json(saved)), object_hook=checkpoint.from_json)
    assert read.keys() == saved.keys()
    assert read["model"] == saved["model"] and read["betas"] == (0.9, 0.95) and read["numbered"] == saved["numbered"]
    assert read["tag"] == {"__tuple__": [1]} and read["loss"] == math.inf
    for key in ("bf16", "empty"):
        assert read[key].dtype == saved[key].dtype and torch.equal(read[key], saved[key])
    assert torch.equal(read["rng"]["torch"], saved["rng"]["torch"]) and read["rng"]["python"] == saved["rng"]["python"]
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    checkpoint.restore_rng_states(read["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def zero_a_block(path: Path) -> None:
    data = bytearray(path.read_bytes())
    start = len(data) // 2
    assert any(data[start:start + 4096])
    data[start:start + 4096] = bytes(4096)
    path.write_bytes(bytes(data))


DAMAGE = {
    "a block of zeros in a shard": (lambda latest: zero_a_block(shard_of(latest)),
                                    r"shard-00001-model-00001-of-00001\.safetensors does not match the SHA-256"),
    "a shard cut short": (lambda latest: shard_of(latest).write_bytes(shard_of(latest).read_bytes()[:-100]),
                          r"shard-00001-model-00001-of-00001\.safetensors has [\d,]+ bytes, [\d,]+ when it was "
                          r"written"),
    "a shard missing": (lambda latest: shard_of(latest).unlink(), r"shard-\S+ is missing"),
    "a changed byte in state.json": (lambda latest: (latest / "state.json").write_bytes(
        (latest / "state.json").read_bytes().replace(b'"step": 3', b'"step": 9')), r"state\.json does not match"),
    "a shard of another checkpoint beside": (
        lambda latest: shutil.copy(shard_of(latest), latest / "shard-00002-model-00001-of-00001.safetensors"),
        r"it holds shard-00002-model-00001-of-00001\.safetensors, which its manifest\.json does not list"),
    "no manifest": (lambda latest: (latest / "manifest.json").unlink(),
                    r"not a readable checkpoint \(it has no manifest\.json, which a save writes last\)"),
    "a manifest cut short": (lambda latest: (latest / "manifest.json").write_text('{"files": {"sta'),
                             r"its manifest\.json is not the one a save writes"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_sharded_checkpoint_is_found_and_a_resume_falls_back_to_best(damage, tiny_cfg, capsys):
    run = sharded_run(tiny_cfg("--max_steps=3", "--eval_interval=2"))
    latest, best = run.checkpoints / "latest", run.checkpoints / "best"
    do, message = DAMAGE[damage]
    do(latest)
    with pytest.raises(checkpoint.DamagedCheckpoint, match=message):
        checkpoint.load(latest)
    capsys.readouterr()
    saved, used = checkpoint.load_for_resume(latest)
    assert used == best and saved["trainer"]["step"] == checkpoint.load(best)["trainer"]["step"]
    assert re.search(message + r".* Resuming from \S+best \(step \d\) instead", capsys.readouterr().err)


def test_a_state_json_that_is_not_a_checkpoint_s_is_a_sentence_and_its_bytes_stay_bytes(tiny_cfg, tmp_path):
    """JSON builds numbers, strings, lists and dicts, and the reader turns its tags into tuples, bytes and tensors of
    plain dtypes, nothing else: a pickle hidden in state.json (which would run a command if unpickled) is read as the
    bytes it is, and what is not a checkpoint's state.json is refused in a sentence (the manifest is rewritten each
    time, as someone changing the files on purpose would)."""
    latest = sharded_run(tiny_cfg("--max_steps=2", "--eval_interval=2")).checkpoints / "latest"
    state = json.loads((latest / "state.json").read_text())
    marker = tmp_path / "marker"
    payload = pickle.dumps(RunsCode(marker))
    state["tracker"]["wandb_id"] = {"__bytes__": base64.b64encode(payload).decode()}
    rewrite(latest, "state.json", json.dumps(state).encode())
    assert checkpoint.load(latest)["tracker"]["wandb_id"] == payload and not marker.exists()
    for bad, why in ((b'{"format_version": 3, "config": {', "JSONDecodeError"),
                     (json.dumps({**state, "rng": {"__tensor__": {"dtype": "object", "shape": [1], "data": ""}}}),
                      "KeyError: 'object'"),
                     (json.dumps({**state, "model": {"tied": {"lm_head.weight": 3}}}),
                      "ValueError: the tied names are not"),
                     (json.dumps({**state, "optimizer": {}}), "KeyError: 'param_groups'"),
                     (b"[1, 2]", "TypeError")):
        rewrite(latest, "state.json", bad.encode() if isinstance(bad, str) else bad)
        with pytest.raises(UsageError, match=rf"latest is not a checkpoint written by train_single_gpu\.py: its "
                                             rf"state\.json cannot be read as one \({why}"):
            checkpoint.load(latest)
    state.pop("trainer")
    rewrite(latest, "state.json", json.dumps(state).encode())
    with pytest.raises(UsageError, match=r"latest is not a checkpoint written by train_single_gpu\.py \(its keys"):
        checkpoint.load(latest)


def test_shards_that_cannot_be_read_as_a_checkpoint_s_are_a_sentence_before_anything_is_read(tiny_cfg):
    """A safetensors header that is not one (the manifest rewritten to match), or a tie to a tensor the files do not
    hold: refused in a sentence when the checkpoint is loaded, also for a resume, before any tensor is read."""
    latest = sharded_run(tiny_cfg("--max_steps=2", "--eval_interval=2")).checkpoints / "latest"
    state = json.loads((latest / "state.json").read_text())
    rewrite(latest, "state.json", json.dumps({**state, "model": {"tied": {"lm_head.weight": "wte.weights"}}}).encode())
    with pytest.raises(UsageError, match=r"latest is not a checkpoint written by train_single_gpu\.py: its tensors "
                                         r"cannot be read as one \(KeyError: .the tied wte\.weights is not among"):
        checkpoint.load(latest, lazy=True)
    rewrite(latest, "state.json", json.dumps(state).encode())
    rewrite(latest, shard_of(latest).name, len(b"{nope").to_bytes(8, "little") + b"{nope")
    for lazy in (True, False):
        with pytest.raises(UsageError, match=r"latest is not a checkpoint written by train_single_gpu\.py: its "
                                             r"tensors cannot be read as one \(SafetensorError: "):
            checkpoint.load(latest, lazy=lazy)


def test_a_kill_at_any_moment_of_a_sharded_save_leaves_one_checkpoint_that_loads(tiny_cfg, monkeypatch):
    """A save killed while writing its manifest leaves a staging folder no reader takes for a checkpoint; one killed
    between its two renames leaves the previous checkpoint set aside, which is found, loaded and put back; one killed
    between writing one kind and removing the other (a resume in another layout) leaves two, of which the newer
    counts. remove_interrupted_saves (a run's start) leaves one checkpoint of each name."""
    cfg = tiny_cfg("--max_steps=2", "--eval_interval=2")
    trainer = make_trainer(cfg)
    run = sharded_run(cfg, trainer)
    latest, aside = run.checkpoint_kinds("latest")[1:]

    def killed(path, data):
        path.write_bytes(data[:10])
        raise KeyboardInterrupt  # the process dies while the manifest is written
    monkeypatch.setattr(checkpoint, "write_synced", lambda path, data: (
        killed(path, data) if path.name == "manifest.json" else path.write_bytes(data)))
    with pytest.raises(KeyboardInterrupt):
        trainer.checkpointer.save(run.latest, 7)
    monkeypatch.undo()
    assert (run.checkpoints / ".latest.tmp-7" / "manifest.json").exists()  # the half-written save is there ...
    assert checkpoint.newest(run, "latest") == latest and checkpoint.load(latest)["trainer"]["step"] == 2  # ... unused
    os.replace(latest, aside)  # killed between the two renames of the next save
    assert checkpoint.newest(run, "latest") == aside and checkpoint.load_for_resume(aside)[1] == aside
    assert checkpoint.remove_interrupted_saves(run) == [".latest.tmp-7"]
    assert checkpoint.newest(run, "latest") == latest and not aside.exists()
    shutil.copy(FIXTURES / "checkpoint_v2.pt", run.latest)  # written, and the sharded one not yet removed
    assert checkpoint.newest(run, "latest") == run.latest
    os.utime(run.latest, ns=(0, 0))  # ... or the other way round
    assert checkpoint.newest(run, "latest") == latest
    assert checkpoint.remove_interrupted_saves(run) == ["latest.pt"]
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["best", "latest"]
    assert checkpoint.find_resume_checkpoint("latest", run) == latest
    assert checkpoint.find_resume_checkpoint(str(run.path), RunFolder(Path("elsewhere"))) == latest


def private_bytes() -> int:
    """This process's resident memory that is its own (anonymous), not pages of files it maps (Linux)."""
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"RssAnon:\s+(\d+) kB", status).group(1)) * 1024


def test_a_resume_maps_a_pt_file_instead_of_copying_it_into_each_process(tmp_path):
    """load(lazy=True), what a resume reads with: the tensors of a .pt stay the pages of the file (the OS keeps one
    copy for every process of a machine that maps it); load() reads them into the process's own memory."""
    path = tmp_path / "latest.pt"
    checkpoint.save_atomic({**minimal_state(1), "model": {"weight": torch.ones(16 << 20)}}, path)  # 64 MiB
    grown = {}
    for lazy in (True, False):
        before = private_bytes()
        state = checkpoint.load(path, lazy=lazy)
        assert state["model"]["weight"].sum().item() == 16 << 20  # every page read
        grown[lazy] = private_bytes() - before
        del state
    assert grown[True] < 0.1 * (64 << 20) < 0.9 * (64 << 20) < grown[False], grown
