"""TensorBoard: scalars, sample text, and an HParams row with the final metrics, in output_dir/logs/<run name>."""

from __future__ import annotations

from pathlib import Path

from ..errors import notice
from .base import RunInfo, RunSummary


class TensorBoardBackend:
    name = "tensorboard"

    def __init__(self, logdir: Path, hparams: dict, purge_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops events a crashed run wrote after its last checkpoint, so resumed curves never go backwards
        self.writer = SummaryWriter(str(logdir), purge_step=purge_step)
        self.hparams = hparams

    def log(self, metrics: dict, step: int) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)

    def log_samples(self, samples: dict[str, str], step: int) -> None:
        for prompt, text in samples.items():
            self.writer.add_text(f"samples/{prompt}", text.replace("\n", "  \n"), step)  # markdown line breaks

    def close(self, summary: RunSummary) -> None:
        if summary.final:  # also writes the final metrics as scalars at `step`
            clean = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in self.hparams.items()}
            self.writer.add_hparams(clean, summary.final, run_name=".", global_step=summary.step)  # "." = this folder
        self.writer.close()


def start(run: RunInfo) -> TensorBoardBackend | None:
    try:
        return TensorBoardBackend(run.folder.tensorboard_run(run.name), run.hparams, purge_step=run.start_step + 1)
    except ImportError:
        notice("note: tensorboard is not installed, so TensorBoard logs are skipped (pip install tensorboard).")
        return None
