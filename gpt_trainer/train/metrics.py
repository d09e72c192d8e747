"""Throughput: the window of training steps between two reports, and what it yields (mean loss, tokens/s, MFU, step
time), for the whole job when several processes train. Only training time counts: evaluation, saving and sampling
run inside `paused()`. Adding a step never waits for the GPU; reading the window does, once per report."""

from __future__ import annotations

import contextlib
import math
import time

import torch

from ..system.distributed import World, all_reduce
from ..system.hardware import synchronize


def model_flops_utilisation(flops_per_token: float, tokens_per_sec: float, peak_tflops: float) -> float:
    return flops_per_token * tokens_per_sec / (peak_tflops * 1e12)


class ThroughputWindow:
    def __init__(self, device: torch.device, tokens_per_step: int, flops_per_token: float, peak_tflops: float,
                 world: World = World()):
        self.device, self.tokens_per_step, self.world = device, tokens_per_step, world
        self.flops_per_token, self.peak_tflops = flops_per_token, peak_tflops
        self.loss_sum = torch.zeros((), device=device)
        self.steps = torch.zeros((), device=device)  # the steps that count, on the device: adding never waits
        self.started = time.perf_counter()

    def add(self, loss: torch.Tensor, counts: torch.Tensor | None = None) -> None:
        """One step's loss; `counts` (a device bool, decided on the device) False leaves a skipped step's loss and
        tokens out without waiting for the device."""
        if counts is None:
            self.loss_sum += loss
            self.steps += 1
        else:
            self.loss_sum += torch.where(counts, loss, 0)
            self.steps += counts

    @contextlib.contextmanager
    def paused(self):
        paused_at = time.perf_counter()
        try:
            yield
        finally:
            self.started += time.perf_counter() - paused_at

    def read_and_reset(self) -> dict:
        """The window's numbers (it waits for the device to finish), then an empty window starting now."""
        all_reduce(self.loss_sum, self.world)  # the mean over every process (they take the same steps)
        self.loss_sum /= self.world.size
        synchronize(self.device)
        seconds = max(time.perf_counter() - self.started, 1e-9)
        loss_sum, counted = torch.stack([self.loss_sum, self.steps]).tolist()
        steps = max(counted, 1)
        tokens_per_sec = counted * self.tokens_per_step / seconds
        loss = loss_sum / counted if counted else math.nan  # every step of the window was skipped
        reading = {"loss": loss, "tokens_per_sec": tokens_per_sec,
                   "mfu": model_flops_utilisation(self.flops_per_token, tokens_per_sec, self.peak_tflops),
                   "step_time_ms": 1000 * seconds / steps}
        self.loss_sum.zero_()
        self.steps.zero_()
        self.started = time.perf_counter()
        return reading
