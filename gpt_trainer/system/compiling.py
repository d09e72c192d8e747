"""torch.compile where it pays (GPUs), and never a dead run for a speed option: the model is compiled and run once
before training, and if that fails the run goes on uncompiled with one notice."""

from __future__ import annotations

import time
from typing import Callable

import torch

from ..errors import notice

BACKEND = "inductor"  # tests swap in a backend that fails, to exercise the fallback without a broken compiler


def wants_compile(setting: str, device: torch.device) -> bool:
    """--compile auto: on for CUDA and ROCm, where fused kernels cut step time; off on the CPU, where compiling took
    about a minute for a few percent (BENCHMARKS.md), more than short CPU runs earn back."""
    return device.type == "cuda" if setting == "auto" else setting == "true"


def compile_or_eager(model: torch.nn.Module, warm_up: Callable[[torch.nn.Module], None], device: torch.device,
                     announce: bool = True) -> tuple[torch.nn.Module, float | None]:
    """(the module to train with, seconds compiling took or None when it fell back to `model`). torch.compile is
    lazy: `warm_up` runs the compiled module on every shape and mode training uses, so a failure surfaces here, not
    at step 1. The random state is put back afterwards: compiled or not, training draws the same numbers."""
    rng = torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)
    started = time.perf_counter()
    compiled = torch.compile(model, backend=BACKEND)
    try:
        warm_up(compiled)
    except Exception as e:  # noqa: BLE001 - any compiler failure (no C compiler, an unsupported op) means: run eager
        if announce:
            notice(f"note: torch.compile failed ({root_cause(e)}); training goes on uncompiled, which is slower but "
                   f"gives the same results. Pass --compile=false to skip the attempt.")
        compiled = None
    finally:
        model.zero_grad(set_to_none=True)
        model.train()
        torch.set_rng_state(rng[0])
        if rng[1] is not None:
            torch.cuda.set_rng_state(rng[1], device)
    if compiled is None:
        torch._dynamo.reset()  # drop what the failed attempt cached
        return model, None
    return compiled, time.perf_counter() - started


def root_cause(error: BaseException) -> str:
    """The innermost error's type and first line: dynamo wraps the compiler's own error in BackendCompilerFailed."""
    while error.__cause__ is not None or getattr(error, "inner_exception", None) is not None:
        error = error.__cause__ or error.inner_exception
    lines = [line for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0].strip()[:300]}" if lines else type(error).__name__
