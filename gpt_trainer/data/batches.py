"""Batches from token ids: an epoch is one pass over the training tokens in shuffled, non-overlapping windows whose
whole state is (epoch, position), so a resume is exact; a step's windows are split between the processes, and the
next step's batch is on its way to the device while the current step runs (TrainBatches); the fixed validation
windows every evaluation measures."""

from __future__ import annotations

import numpy as np
import torch


def windows_in(tokens: np.ndarray, block_size: int) -> int:
    """How many non-overlapping training windows (block_size + 1 tokens, sharing one at the seams) the tokens hold."""
    return (len(tokens) - 1) // block_size


class EpochSampler:
    """Hands out training windows: each epoch is a fresh, seeded permutation of non-overlapping windows (with a
    random shift, so epochs see different boundaries). Its whole state is (epoch, position): resume is exact."""

    def __init__(self, tokens: np.ndarray, block_size: int, seed: int):
        self.tokens, self.block_size, self.seed = tokens, block_size, seed
        self.windows_per_epoch = windows_in(tokens, block_size)
        self.epoch, self.position = 0, 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch])
        slack = len(self.tokens) - 1 - self.windows_per_epoch * self.block_size
        shift = int(rng.integers(0, slack + 1))
        return shift + rng.permutation(self.windows_per_epoch) * self.block_size

    @property
    def epochs_done(self) -> float:
        return self.epoch + self.position / self.windows_per_epoch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._epoch_order(self.epoch)

    def next_offsets(self, count: int) -> np.ndarray:
        offsets = []
        for _ in range(count):
            if self.position == self.windows_per_epoch:
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._epoch_order(self.epoch)
            offsets.append(self._order[self.position])
            self.position += 1
        return np.asarray(offsets)


class TrainBatches:
    """This process's training batches, one step ahead: `prefetch` gathers the next step's windows from the token
    memmap, pins them and starts their copy to the device without blocking, so the host does it while the device runs
    the current step, and the step that takes the batch (`next`) waits for nothing. The state is the sampler's as of
    the batches handed out: a checkpoint never counts the prefetched batch, and a resume draws it again."""

    def __init__(self, tokens: np.ndarray, block_size: int, seed: int, windows_per_step: int, rank: int,
                 world_size: int, device: torch.device):
        self.sampler = EpochSampler(tokens, block_size, seed)
        self.tokens, self.block_size, self.windows_per_step = tokens, block_size, windows_per_step
        self.rank, self.world_size, self.device = rank, world_size, device
        self.ahead: tuple[dict, torch.Tensor] | None = None  # (the sampler's state before it, the prefetched batch)

    @property
    def windows_per_epoch(self) -> int:
        return self.sampler.windows_per_epoch

    @property
    def epoch(self) -> int:
        return self.state_dict()["epoch"]

    @property
    def epochs_done(self) -> float:
        state = self.state_dict()
        return state["epoch"] + state["position"] / self.windows_per_epoch

    def next(self) -> torch.Tensor:
        """The next step's batch, this process's windows of it: (windows, block_size + 1) on the device."""
        batch = self.ahead[1] if self.ahead else self.draw()
        self.ahead = None
        return batch

    def prefetch(self) -> None:
        """Start on the batch after the one handed out last; call it once the current step's work is enqueued."""
        if self.ahead is None:
            before = self.sampler.state_dict()
            self.ahead = (before, self.draw())

    def draw(self) -> torch.Tensor:
        offsets = share_of(self.sampler.next_offsets(self.windows_per_step), self.rank, self.world_size)
        return to_device(gather_windows(self.tokens, offsets, self.block_size), self.device)

    def state_dict(self) -> dict:
        return dict(self.ahead[0]) if self.ahead else self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)
        self.ahead = None  # drawn from the old position: drawn again from the new one


def gather_windows(tokens: np.ndarray, offsets: np.ndarray, block_size: int) -> torch.Tensor:
    """(N, block_size + 1) int64 tensor of the windows starting at offsets: inputs are [:, :-1], targets [:, 1:]."""
    rows = np.stack([tokens[o : o + block_size + 1] for o in offsets]).astype(np.int64)
    return torch.from_numpy(rows)


def to_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":  # pinned memory lets the copy overlap with compute instead of blocking it
        return batch.pin_memory().to(device, non_blocking=True)
    return batch.to(device)


def validation_windows(tokens: np.ndarray, block_size: int, count: int) -> torch.Tensor:
    """A fixed, evenly spread set of validation windows, so every evaluation measures the same thing."""
    last_start = len(tokens) - block_size - 1
    offsets = np.linspace(0, last_start, num=count).astype(np.int64)
    return gather_windows(tokens, offsets, block_size)


def share_of(offsets: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """This process's contiguous share of a step's windows: together the processes take each window once, and
    process r takes what micro-batches r*accum ... (r+1)*accum - 1 of one process would."""
    return offsets.reshape(world_size, -1)[rank]
