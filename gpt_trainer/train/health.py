"""Step health: which optimizer steps had a non-finite loss or gradient norm (each one skipped, never applied), how many
in a row, and the last good step and its loss; one small object the loop asks (the count of skipped steps travels in
the trainer's checkpoint part).

It lives on the device and is updated there without waiting for it: the loop reads it only at steps that wait anyway
(a log step, an evaluation, a save), so a step that does none of these never stops the host for the GPU. The skip
is decided on the device too: `step_unless` hands the optimizer a `found_inf` tensor, the one torch's GradScaler hands
fused optimizers, and their kernel leaves the weights and moments untouched and takes back its step count when it is 1.

Where the line is: an optimizer must take `found_inf`, as torch's fused ones do (AdamW, Adam, SGD and Adagrad with
fused=True), or say it honours it (`skips_on_device`, as train/optimizers.MuonAdamW does: torch.optim.Muon in torch
2.13 takes none). Any other is refused by `step_unless`. Zeroing the update through a learning rate tensor is no skip:
a NaN gradient still enters the moments."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class HealthReading:
    """StepHealth's counts as Python numbers, read at a step that waits for the device anyway."""

    bad_steps: int  # skipped over the whole run
    bad_in_a_row: int
    last_good: tuple[int, float] | None  # (step, loss) of the last applied step; None: none since this start


class StepHealth:
    def __init__(self, device: torch.device):
        def zero(dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros((), dtype=dtype, device=device)
        self.steps = zero(torch.int64)  # optimizer steps recorded: the 1-based number of the last one
        self.bad_steps, self.bad_in_a_row = zero(torch.int64), zero(torch.int64)
        self.last_good_step, self.last_good_loss = zero(torch.int64), zero(torch.float32)  # step 0: none yet
        self.last_ok = torch.ones((), dtype=torch.bool, device=device)  # whether the last step counts as good

    def record(self, ok: torch.Tensor, loss: torch.Tensor) -> None:
        """The outcome of the next optimizer step: `ok` a device bool, `loss` its mean loss."""
        self.last_ok = ok
        self.steps += 1
        self.bad_steps += ~ok
        self.bad_in_a_row.add_(1).mul_(~ok)  # back to 0 at a good step
        self.last_good_step.copy_(torch.where(ok, self.steps, self.last_good_step))
        self.last_good_loss.copy_(torch.where(ok, loss.detach().float(), self.last_good_loss))

    def read(self) -> HealthReading:
        """The counts (this waits for the device: call it only where the loop waits anyway)."""
        numbers = torch.stack([self.bad_steps.double(), self.bad_in_a_row.double(), self.last_good_step.double(),
                               self.last_good_loss.double()]).tolist()
        bad_steps, bad_in_a_row, last_good_step, last_good_loss = numbers
        last_good = (int(last_good_step), last_good_loss) if last_good_step else None
        return HealthReading(int(bad_steps), int(bad_in_a_row), last_good)

    def start_at(self, step: int, bad_steps: int) -> None:
        """Continue a resumed run: `step` steps done, `bad_steps` of them skipped (the last good one is not known)."""
        self.steps.fill_(step)
        self.bad_steps.fill_(bad_steps)
        self.bad_in_a_row.zero_()
        self.last_good_step.zero_()


def step_unless(optimizer: torch.optim.Optimizer, skip: torch.Tensor) -> None:
    """optimizer.step(), which leaves everything as it was where `skip` (a 0-dim float32 device tensor) is 1: decided
    on the device, nothing waits for it."""
    fused = all(group.get("fused") for group in optimizer.param_groups)
    if not (fused or getattr(optimizer, "skips_on_device", False)):
        raise TypeError(f"{type(optimizer).__name__} without fused=True takes no found_inf, so a bad step could not be "
                        f"skipped on the device: build it with fused=True, or give it an on-device select (see "
                        f"train/health.py)")
    optimizer.found_inf = skip
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf
