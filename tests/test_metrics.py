"""The throughput window on a fake clock: every scenario takes a known number of seconds, so each reading is checked
against numbers worked out by hand for that scenario (MFU against a real measured step is in test_hardware.py)."""

import math
import types

import pytest
import torch

from gpt_trainer.train import metrics
from gpt_trainer.train.metrics import ThroughputWindow


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(metrics, "time", types.SimpleNamespace(perf_counter=fake))
    return fake


def window(tokens_per_step=1000, flops_per_token=2e9, peak_tflops=3.0):
    return ThroughputWindow(torch.device("cpu"), tokens_per_step, flops_per_token, peak_tflops)


def train(w, clock, losses, seconds_per_step):
    for loss in losses:
        clock.advance(seconds_per_step)
        w.add(torch.tensor(loss))


def test_three_steps_in_two_seconds(clock):
    w = window()
    train(w, clock, [1.0, 2.0, 6.0], 2.0 / 3)
    reading = w.read_and_reset()
    assert reading["loss"] == pytest.approx(3.0)
    assert reading["tokens_per_sec"] == pytest.approx(1500)  # 3,000 tokens in 2 s
    assert reading["step_time_ms"] == pytest.approx(666.667, abs=1e-3)
    assert reading["mfu"] == pytest.approx(1.0)  # 2 GFLOP/token x 1,500 tokens/s is the whole 3 TFLOP/s


def test_paused_time_is_left_out_exactly(clock):
    w = window()
    train(w, clock, [1.0], 0.5)
    with w.paused():  # an evaluation or a checkpoint save
        clock.advance(100.0)
    train(w, clock, [1.0], 0.5)
    reading = w.read_and_reset()
    assert reading["step_time_ms"] == pytest.approx(500) and reading["tokens_per_sec"] == pytest.approx(2000)


def test_a_window_of_skipped_steps_has_no_loss_but_still_its_time(clock):
    w = window()
    clock.advance(4.0)  # steps ran (and took time) but every one was skipped, say for a non-finite loss
    reading = w.read_and_reset()
    assert math.isnan(reading["loss"])
    assert reading["tokens_per_sec"] == 0 and reading["mfu"] == 0 and reading["step_time_ms"] == pytest.approx(4000)


def test_reading_starts_a_fresh_window(clock):
    w = window()
    train(w, clock, [10.0, 10.0], 5.0)
    w.read_and_reset()
    train(w, clock, [1.0, 3.0, 5.0, 7.0], 0.25)  # only these count now: neither the old steps, losses nor seconds
    reading = w.read_and_reset()
    assert reading["loss"] == pytest.approx(4.0)
    assert reading["tokens_per_sec"] == pytest.approx(4000) and reading["step_time_ms"] == pytest.approx(250)
