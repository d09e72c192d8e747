"""Step health: which optimizer steps had a non-finite loss or gradient norm (each one skipped, never applied), how many
in a row, and the last good step; one small object the loop asks (the count of skipped steps travels in the trainer's
checkpoint part)."""

from __future__ import annotations

import torch


class StepHealth:
    def __init__(self):
        self.bad_steps = 0  # skipped over the whole run
        self.bad_in_a_row = 0
        self.last_good: tuple[int, torch.Tensor] | None = None  # (step, loss) of the last applied step

    def record(self, ok: bool, step: int, loss: torch.Tensor) -> None:
        """The outcome of optimizer step `step` (1-based)."""
        if ok:
            self.bad_in_a_row, self.last_good = 0, (step, loss.detach())
        else:
            self.bad_steps, self.bad_in_a_row = self.bad_steps + 1, self.bad_in_a_row + 1

    def last_good_loss(self) -> tuple[int, float] | None:
        return (self.last_good[0], self.last_good[1].item()) if self.last_good else None
