import json
import types

import pytest

from gpt_trainer.commands import benchmark
from gpt_trainer.commands.benchmark import CPU_SUITE, main
from gpt_trainer.train.trainer import Trainer

TINY = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=16", "--batch_size=2", "--vocab_size=100",
        "--device=cpu"]


def test_benchmark_prints_throughput_mfu_step_time_and_memory(capsys):
    assert main([*TINY, "--steps=2", "--warmup=1"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    assert result["tokens_per_sec"] > 0 and result["step_time_s"] > 0 and result["peak_memory_gib"] > 0
    assert "tokens/s" in out and "MFU" in out and result["peak_source"] in out


@pytest.mark.parametrize("accumulation, tokens_per_sec", [(1, 64), (2, 128)])
def test_benchmark_reports_the_median_timed_step(capsys, monkeypatch, accumulation, tokens_per_sec):
    """Real steps on a fake clock: the warm-up step takes 30 s (compiling), the timed ones 0.5, 0.4 and 2.0 s. The
    median, 0.5 s, is the step time; a step is 2 x 16 tokens per micro-batch, times the accumulation steps."""
    clock, durations = types.SimpleNamespace(now=0.0), iter([30.0, 0.5, 0.4, 2.0])
    real_step = Trainer.train_step

    def step_on_the_clock(trainer):
        result = real_step(trainer)
        clock.now += next(durations)
        return result
    monkeypatch.setattr(Trainer, "train_step", step_on_the_clock)
    monkeypatch.setattr(benchmark, "time", types.SimpleNamespace(perf_counter=lambda: clock.now))
    assert main([*TINY, "--steps=3", "--warmup=1", f"--gradient_accumulation_steps={accumulation}"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    assert result["step_time_s"] == 0.5 and result["tokens_per_sec"] == pytest.approx(tokens_per_sec)
    assert "500.0 ms (median of 3)" in out and f"{tokens_per_sec} tokens/s" in out


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


def test_the_suite_prints_a_markdown_table_of_the_standard_matrix(capsys, monkeypatch):
    # Each row runs in its own process. Inductor needs about a minute per compiled row on two CPU cores, so here
    # PyTorch's own switch turns torch.compile into a pass-through; tests/test_compiling.py covers compiling.
    monkeypatch.setenv("TORCH_COMPILE_DISABLE", "1")
    tiny = ["--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=16", "--vocab_size=100", "--device=cpu",
            "--steps=2", "--warmup=1"]
    assert main(["--suite", *tiny]) == 0
    captured = capsys.readouterr()
    header, rule, *rows = captured.out.strip().splitlines()
    assert header.split("|")[1:-1] == [" model ", " device ", " precision ", " compile ", " micro-batch x block ",
                                       " tokens/s ", " MFU ", " step time ", " peak memory "]
    assert len(rows) == len(CPU_SUITE) == 2 and rule.startswith("|---")
    cells = [[c.strip() for c in row.split("|")[1:-1]] for row in rows]
    assert [c[3].split()[0] for c in cells] == ["off", "on"]
    for c in cells:
        assert c[4] == "16 x 16"  # --batch_size auto on the CPU, and the block size given after the row's own
        assert float(c[5].replace(",", "")) > 0 and float(c[8].split()[0]) > 0
        assert float(c[6].rstrip("%")) >= 0 and c[7].endswith(" ms")  # a tiny model on a busy CPU may round to 0.0%
    assert "[1/2]" in captured.err and "[2/2]" in captured.err


def test_the_suite_checks_its_flags_before_the_first_row(capsys):
    assert main(["--suite", "--block_size=0"]) == 2
    captured = capsys.readouterr()
    assert "--block_size must be at least 1" in captured.err and "[1/" not in captured.err
