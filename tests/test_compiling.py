"""--compile auto/true/false and the fallback to eager. Compiling with inductor takes about a minute on two CPU cores,
so these tests run dynamo for real with backends that cost nothing: one that fails as a broken compiler would (no C
compiler, an inductor error), and dynamo's own "eager" backend for the path where compiling succeeds. Inductor itself
runs in the container stage (--compile inside the image) and in tests/test_gpu.py."""

import pytest
import torch

from gpt_trainer.commands.train import main
from gpt_trainer.system import compiling
from gpt_trainer.system.compiling import wants_compile
from gpt_trainer.train.trainer import Trainer
from tests.conftest import make_trainer


@pytest.mark.parametrize("setting, device, expected", [
    ("auto", "cpu", False), ("auto", "cuda", True),  # a cuda device object stands for a GPU without needing one
    ("true", "cpu", True), ("false", "cuda", False),
])
def test_auto_means_on_for_gpus_and_off_on_the_cpu(setting, device, expected):
    assert wants_compile(setting, torch.device(device)) is expected


def broken_compiler(graph_module, example_inputs):
    raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found (simulated)")


def losses(trainer: Trainer, steps: int = 3) -> list[float]:
    return [trainer.train_step()[0].item() for _ in range(steps)]


def trainer_for(tiny_cfg, *flags) -> Trainer:
    cfg = tiny_cfg("--dropout=0.1", *flags)  # dropout on: the fallback must leave the random stream untouched
    return make_trainer(cfg)


def test_a_failing_compiler_gives_one_notice_and_the_eager_losses(tiny_cfg, monkeypatch, capsys):
    eager = losses(trainer_for(tiny_cfg, "--compile=false"))
    monkeypatch.setattr(compiling, "BACKEND", broken_compiler)
    trainer = trainer_for(tiny_cfg, "--compile")
    assert trainer.compile_seconds is None and trainer.forward is trainer.model
    assert losses(trainer) == eager
    err = capsys.readouterr().err
    assert err.count("torch.compile failed") == 1 and "No working C++ compiler found" in err
    assert "goes on uncompiled" in err


def test_a_run_whose_compiler_fails_finishes(tiny_argv, monkeypatch, capsys):
    monkeypatch.setattr(compiling, "BACKEND", broken_compiler)
    assert main(tiny_argv("--compile", "--max_steps=3")) == 0
    captured = capsys.readouterr()
    assert captured.err.count("torch.compile failed") == 1 and "done: 3 steps" in captured.out


def test_a_compiled_model_reports_its_compile_time_and_trains_the_same(tiny_cfg, monkeypatch, capsys):
    eager = losses(trainer_for(tiny_cfg, "--compile=false"))
    monkeypatch.setattr(compiling, "BACKEND", "eager")  # dynamo captures the graphs; no code generation
    trainer = trainer_for(tiny_cfg, "--compile=true")
    assert isinstance(trainer.forward, torch._dynamo.eval_frame.OptimizedModule)
    assert trainer.compile_seconds > 0
    assert losses(trainer) == pytest.approx(eager, rel=1e-5)
    assert "torch.compile failed" not in capsys.readouterr().err


def test_compile_auto_resolves_off_on_the_cpu_in_config_json(tiny_argv, tmp_path):
    import json

    assert main(tiny_argv("--max_steps=1")) == 0
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["compile"] is False


@pytest.mark.parametrize("flags, message", [
    (["--compile", "--no_compile"], "--compile and --no_compile contradict each other"),
    (["--compile=maybe"], "expected auto, true or false, got 'maybe'"),
])
def test_bad_compile_flags_are_refused(tiny_argv, flags, message, capsys):
    assert main(tiny_argv(*flags)) == 2
    assert message in capsys.readouterr().err


def test_a_compiled_llama_trains_the_same_losses_as_eager(tiny_cfg, monkeypatch):
    """--arch llama's rotary positions and norms go through dynamo's capture as gpt2's blocks do."""
    eager = losses(trainer_for(tiny_cfg, "--arch=llama", "--compile=false"))
    monkeypatch.setattr(compiling, "BACKEND", "eager")
    trainer = trainer_for(tiny_cfg, "--arch=llama", "--compile=true")
    assert isinstance(trainer.forward, torch._dynamo.eval_frame.OptimizedModule)
    assert losses(trainer) == pytest.approx(eager, rel=1e-5)
