"""Reading wandb offline run files back: the reader lives in the package (gpt_trainer/tracking/wandb_records.py),
where a resumed run reads what its earlier segments logged."""

import sys
from pathlib import Path

from gpt_trainer.tracking.wandb_records import history_rows, read_records

__all__ = ["history_rows", "read_records", "run_files"]


def run_files(root: Path) -> list[Path]:
    """Offline run files under root, oldest first, once this process's wandb is done writing: `run.finish()` can
    return before wandb-core has written the last block (seen with 0.31 offline), and `wandb.teardown()` waits for it.
    A training subprocess waits for it on exit already."""
    if getattr(sys.modules.get("wandb"), "teardown", None):
        sys.modules["wandb"].teardown()
    return sorted(Path(root).glob("**/offline-run-*/run-*.wandb"))
