"""torch.compile where it pays (GPUs), and never a dead run for a speed option: what is compiled is run once before
training, and if that fails the run goes on uncompiled with one notice."""

from __future__ import annotations

import time
from typing import Callable

import torch

from ..errors import notice
from .hardware import keep_rng

BACKEND = "inductor"  # tests swap in a backend that fails, to exercise the fallback without a broken compiler


def wants_compile(setting: str, device: torch.device) -> bool:
    """--compile auto: on for CUDA and ROCm, where fused kernels cut step time; off on the CPU, where compiling took
    about a minute for a few percent (BENCHMARKS.md), more than short CPU runs earn back."""
    return device.type == "cuda" if setting == "auto" else setting == "true"


def compiled_or_eager(warm_up: Callable[[], None], undo: Callable[[], None], device: torch.device,
                      announce: bool = True) -> float | None:
    """The one fallback for every way of compiling (the whole model, or each block before sharding): torch.compile is
    lazy, so `warm_up` runs what was compiled on every shape and mode training uses and a failure surfaces here, not
    at step 1. Returns the seconds it took, or None after a failure, once `undo` has put the eager modules back. The
    random state is kept: compiled or not, training draws the same numbers."""
    started = time.perf_counter()
    try:
        with keep_rng(device):
            warm_up()
        return time.perf_counter() - started
    except Exception as e:  # noqa: BLE001 - any compiler failure (no C compiler, an unsupported op) means: run eager
        undo()
        torch._dynamo.reset()  # drop what the failed attempt cached
        if announce:
            notice(f"note: torch.compile failed ({root_cause(e)}); training goes on uncompiled, which is slower but "
                   f"gives the same results. Pass --compile=false to skip the attempt.")
        return None


def root_cause(error: BaseException) -> str:
    """The innermost error's type and first line: dynamo wraps the compiler's own error in BackendCompilerFailed."""
    while error.__cause__ is not None or getattr(error, "inner_exception", None) is not None:
        error = error.__cause__ or error.inner_exception
    lines = [line for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0].strip()[:300]}" if lines else type(error).__name__
