"""The run plan: every derived value resolved once, recorded the same way everywhere, and the learning rate as a
function of the plan and the step."""

import json

import pytest
import torch

from gpt_trainer.cli import main
from gpt_trainer.plan import lr_multiplier
from tests.conftest import plan_for


def test_learning_rate_warms_up_then_decays_to_the_minimum():
    assert lr_multiplier(0, warmup=10, total=100, min_ratio=0.1) == pytest.approx(0.1)
    assert lr_multiplier(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert lr_multiplier(55, 10, 100, 0.1) == pytest.approx(0.55)  # half-way through the decay
    assert lr_multiplier(100, 10, 100, 0.1) == pytest.approx(0.1)


def test_the_plan_resolves_what_the_flags_leave_open_and_the_configuration_keeps_what_was_asked(tiny_cfg):
    cfg = tiny_cfg("--batch_size=auto", "--global_batch_size=64", "--max_steps=30", "--warmup_steps=50")
    plan = plan_for(cfg)
    assert (plan.micro_batch, plan.accumulation, plan.global_batch) == (16, 4, 64)  # the CPU's auto micro-batch
    assert plan.tokens_per_step == 64 * 16 and plan.total_steps == 30
    assert plan.warmup_steps == 3 and "over 3 steps" in plan.warmup_note  # a tenth of the run, with the note
    assert (cfg.batch_size, cfg.gradient_accumulation_steps, cfg.warmup_steps) == (None, 1, 50)
    assert plan.flags()["batch_size"] == 16 and plan.flags()["warmup_steps"] == 3


def test_epochs_set_the_step_budget_from_the_windows_of_one_pass(tiny_cfg):
    one, two = plan_for(tiny_cfg("--epochs=1")), plan_for(tiny_cfg("--epochs=2", "--gradient_accumulation_steps=2"))
    windows = (one.train_tokens - 1) // 16  # block 16: non-overlapping windows in the training tokens
    assert one.total_steps == -(-windows // 4)  # micro-batch 4, rounded up
    assert two.total_steps == -(-2 * windows // 8)


def test_config_json_the_checkpoint_and_the_dry_run_describe_the_run_alike(tiny_argv, tmp_path, capsys):
    flags = ("--max_steps=3", "--eval_interval=3", "--batch_size=auto", "--wandb_run_name=same")
    assert main(tiny_argv(*flags, "--dry_run", f"--output_dir={tmp_path / 'dry'}")) == 0
    dry = json.loads(capsys.readouterr().out)
    assert main(tiny_argv(*flags)) == 0
    recorded = json.loads((tmp_path / "out" / "config.json").read_text())
    segments = recorded.pop("segments")
    assert [s["from_step"] for s in segments] == [0]
    saved = torch.load(tmp_path / "out" / "checkpoints" / "latest.pt", weights_only=False)
    assert saved["config"] == recorded
    assert {**dry, "output_dir": recorded["output_dir"], "dry_run": False} == recorded
    assert recorded["batch_size"] == 16 and recorded["global_batch_size"] == 16 and recorded["run_name"] == "same"


def test_a_resumed_run_follows_the_schedule_of_its_new_flags(tiny_argv, tmp_path):
    """The learning rate after a resume with a new peak is the new plan's at each step, as in a run that had those
    flags from the start (no scheduler state is carried over)."""
    def rates(out):
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["train/learning_rate"] for r in rows if "train/learning_rate" in r}

    common = ("--log_interval=1", "--eval_interval=100", "--warmup_steps=2")
    assert main(tiny_argv(*common, "--max_steps=4", "--learning_rate=1e-3")) == 0
    assert main(tiny_argv(*common, "--max_steps=8", "--learning_rate=2e-3", "--resume")) == 0
    assert main(tiny_argv(*common, "--max_steps=8", "--learning_rate=2e-3", f"--output_dir={tmp_path / 'ref'}")) == 0
    resumed, reference = rates(tmp_path / "out"), rates(tmp_path / "ref")
    assert {s: resumed[s] for s in range(5, 9)} == {s: reference[s] for s in range(5, 9)}
    assert resumed[4] != reference[4]  # the first segment ran on its own schedule


def test_a_run_announces_its_memory_plan_in_two_lines(tiny_argv, capsys):
    assert main(tiny_argv("--max_steps=1", "--eval_interval=1")) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("memory")]
    assert len(lines) == 2 and lines[0].startswith("memory per GPU (estimated: fp32, micro-batch")
    assert lines[1].endswith("on the CPU: not checked")
