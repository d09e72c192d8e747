"""TensorBoard with the real library: event files read back with TensorBoard's own EventAccumulator."""

import dataclasses

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gpt_trainer.commands.train import main
from gpt_trainer.tracking import RunSummary, start_tracking
from tests.conftest import plan_for, scalars

pytestmark = pytest.mark.usefixtures("clean_wandb_env")


def test_samples_go_to_tensorboard_text(poems_argv, tmp_path):
    assert main(poems_argv("--max_steps=2", "--eval_interval=2", "--report_to=tensorboard",
                     "--sample_prompts=春眠,明月")) == 0
    [logdir] = list((tmp_path / "out" / "logs").iterdir())
    _, acc = scalars(logdir)
    assert {"samples/春眠/text_summary", "samples/明月/text_summary"} <= set(acc.Tags()["tensors"])
    text = acc.Tensors("samples/春眠/text_summary")[0].tensor_proto.string_val[0].decode()
    assert text.startswith("春眠")


def test_resumed_tensorboard_run_purges_steps_after_the_checkpoint(tiny_cfg, tmp_path):
    plan = dataclasses.replace(plan_for(tiny_cfg(f"--output_dir={tmp_path}", "--report_to=tensorboard")),
                               run_name="run")
    first = start_tracking(plan)
    for step in range(1, 7):
        first.log({"train/loss": float(step)}, step)
    first.close(RunSummary())
    second = start_tracking(dataclasses.replace(plan, start_step=3), first.state_dict())  # checkpoint at step 3
    for step in range(4, 7):
        second.log({"train/loss": 100.0 + step}, step)
    second.close(RunSummary())
    acc = EventAccumulator(str(tmp_path / "logs" / first.run_name))
    acc.Reload()
    events = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert events == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 104.0), (5, 105.0), (6, 106.0)]
