"""The kinds of failure every layer raises: a `UsageError` is bad input (one paragraph, exit code 2, no traceback), a
`RunStopped` ends a run that cannot go on (exit code 1), a `TrainingFailure` ends training; a notice is a one-line note
that is not an error. Bad input carries its sentence from where it is found; a failure of the machine or the run
carries the facts (the typed errors below), and the commands turn these, and the failures the machine causes, into
sentences and exit codes in one place (gpt_trainer/commands/failures.py)."""

from __future__ import annotations

import re
import sys
from pathlib import Path


class UsageError(Exception):
    """Bad input from the user: printed as one paragraph, exit code 2, no traceback."""


class RunStopped(Exception):
    """A run that cannot go on: raised with its sentence (what happened, what was kept, what to try), or, by the
    subclasses below, with the facts that commands/failures.py words."""

    exit_code = 1


class CheckpointNotWritten(RunStopped):
    """The checkpoint `path` could not be written, for `reason` (the system's words); an earlier one there is kept
    (`earlier_kept`), since a save replaces it only once the new one is whole."""

    def __init__(self, path: Path, reason: str, earlier_kept: bool):
        super().__init__(f"could not write the checkpoint {path} ({reason})")
        self.path, self.reason, self.earlier_kept = path, reason, earlier_kept


class CheckpointNotFinished(RunStopped):
    """Several processes wrote the sharded checkpoint `path`, and the main one could not write its last files (its
    own error says why): the others stop with this."""

    def __init__(self, path: Path):
        super().__init__(f"the checkpoint {path} was not finished by the main process")
        self.path = path


class TrainingFailure(Exception):
    """Training cannot go on. It carries the facts; commands/failures.py words them with the run's plan."""


class Diverged(TrainingFailure):
    """`bad_in_a_row` optimizer steps had a non-finite loss or gradient; 0 when the validation loss was the first
    number to go non-finite."""

    def __init__(self, step: int, bad_in_a_row: int, last_good: tuple[int, float] | None, lr: float):
        super().__init__(f"diverged at step {step}")
        self.step, self.bad_in_a_row, self.last_good, self.lr = step, bad_in_a_row, last_good, lr


class OutOfMemory(TrainingFailure):
    """Training step `failed_step` ran out of memory; `saved_to`: the checkpoint of the step before (None: none was
    saved); `memory`: the device's memory in use then, in words."""

    def __init__(self, failed_step: int, saved_to: Path | None, memory: str = ""):
        super().__init__(f"out of memory in step {failed_step}")
        self.failed_step, self.saved_to, self.memory = failed_step, saved_to, memory


class WeightsNotFinite(TrainingFailure):
    def __init__(self, step: int):
        super().__init__(f"weights not finite at step {step}")
        self.step = step


def notice(message: str) -> None:
    """A one-line note for the user that is not an error (fallbacks, offline mode); stderr keeps stdout clean."""
    print(message, file=sys.stderr, flush=True)


# What the GPU libraries say when they cannot get memory of their own, outside PyTorch's allocator (its
# OutOfMemoryError says "CUDA out of memory" or, on ROCm, "HIP out of memory"): cuBLAS/cuBLASLt and hipBLAS(Lt) for
# their handles and workspaces, cuDNN 8 and 9 (host and device), MIOpen, and the runtimes' own error names
GPU_LIBRARY_OUT_OF_MEMORY = re.compile(
    r"\b(?:CUBLAS|HIPBLAS|CUDNN|HIPDNN|CUSOLVER|CUSPARSE|CUFFT)_STATUS_(?:ALLOC_FAILED"
    r"|INTERNAL_ERROR_(?:HOST|DEVICE)_ALLOCATION_FAILED)\b"
    r"|miopenStatusAllocFailed|hipErrorOutOfMemory|cudaErrorMemoryAllocation|\b(?:CUDA|HIP) error: out of memory")


def is_out_of_memory(error: BaseException) -> bool:
    """A failed allocation: PyTorch's OutOfMemoryError (GPUs), Python's MemoryError, the CPU allocator's
    RuntimeError, or a GPU library that could not allocate (a RuntimeError naming CUBLAS_STATUS_ALLOC_FAILED and the
    like: GPU_LIBRARY_OUT_OF_MEMORY)."""
    text = str(error)
    return (isinstance(error, MemoryError) or any(k.__name__ == "OutOfMemoryError" for k in type(error).__mro__)
            or (isinstance(error, RuntimeError) and ("can't allocate memory" in text or "not enough memory" in text
                                                     or GPU_LIBRARY_OUT_OF_MEMORY.search(text) is not None)))
