import time

import pytest
import torch

from gpt_trainer.metrics import ThroughputWindow, model_flops_utilisation


def test_the_window_reports_mean_loss_tokens_per_second_and_mfu_then_starts_afresh():
    window = ThroughputWindow(torch.device("cpu"), tokens_per_step=1000, flops_per_token=6e6, peak_tflops=1.0)
    for loss in (1.0, 2.0, 3.0):
        window.add(torch.tensor(loss))
    time.sleep(0.05)
    reading = window.read_and_reset()
    assert reading["loss"] == pytest.approx(2.0)
    seconds = 3 * 1000 / reading["tokens_per_sec"]
    assert 0.05 <= seconds < 1.0 and reading["step_time_ms"] == pytest.approx(1000 * seconds / 3)
    assert reading["mfu"] == pytest.approx(6e6 * reading["tokens_per_sec"] / 1e12)
    assert window.steps == 0 and window.loss_sum.item() == 0


def test_time_inside_paused_does_not_count():
    window = ThroughputWindow(torch.device("cpu"), tokens_per_step=100, flops_per_token=1.0, peak_tflops=1.0)
    window.add(torch.tensor(1.0))
    with window.paused():  # an evaluation or a checkpoint save
        time.sleep(0.3)
    assert window.read_and_reset()["step_time_ms"] < 250


def test_mfu_is_achieved_over_peak_flops():
    assert model_flops_utilisation(flops_per_token=1e9, tokens_per_sec=1e3, peak_tflops=2.0) == pytest.approx(0.5)
