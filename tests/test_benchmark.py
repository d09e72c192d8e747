import json

import pytest

from gpt_trainer.benchmark import main


def test_benchmark_prints_throughput_mfu_step_time_and_memory(capsys):
    argv = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=16", "--batch_size=2", "--vocab_size=100",
            "--steps=2", "--warmup=1", "--device=cpu"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    assert result["tokens_per_sec"] > 0 and result["step_time_s"] > 0 and result["peak_memory_gib"] > 0
    assert abs(result["tokens_per_sec"] * result["step_time_s"] - 2 * 16) < 1e-6  # tokens per step / step time
    assert "tokens/s" in out and "MFU" in out and result["peak_source"] in out


def test_benchmark_rejects_bad_flags(capsys):
    assert main(["--batch_size=0"]) == 2
    assert "--batch_size must be at least 1" in capsys.readouterr().err


@pytest.mark.slow
def test_benchmark_measures_the_cost_of_tracking(capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    argv = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=16", "--batch_size=2", "--vocab_size=100",
            "--steps=20", "--warmup=1", "--device=cpu", "--log_interval=10", "--tracking_overhead"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0 < result["tracking_call_overhead"] < 1 and result["step_time_tracked_s"] > 0


def test_benchmark_needs_a_timed_step(capsys):
    assert main(["--steps=0", "--device=cpu"]) == 2
    assert "--steps must be at least 1" in capsys.readouterr().err
