"""What we are running on: the device, the precision it supports, its peak throughput (for MFU) and its memory."""

from __future__ import annotations

import contextlib
import resource
import sys

import torch

from .config import TrainConfig
from .errors import UsageError

# Dense bf16/fp16 tensor throughput in TFLOP/s from vendor data sheets, matched against the device name.
PEAK_TFLOPS = {
    "H200": 989.0, "H100": 989.0, "A100": 312.0, "A10G": 125.0, "L40S": 362.0, "L4": 121.0, "4090": 165.0,
    "3090": 71.0, "V100": 125.0, "T4": 65.0, "MI300X": 1307.0, "MI250X": 383.0, "MI250": 362.0, "MI210": 181.0,
    "MI100": 92.0, "7900 XTX": 123.0,
}
CPU_TFLOPS_PER_THREAD = 0.08  # ~2.5 GHz x 32 fp32 FLOP/cycle (two AVX2 FMA units); pass --peak_tflops to be exact


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError(
            "--device cuda was asked for, but PyTorch sees no GPU (CUDA or ROCm). Check the driver and that the "
            "container got the GPU (--gpus all for NVIDIA; --device /dev/kfd --device /dev/dri for AMD), or use "
            "--device cpu."
        )
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def is_rocm() -> bool:
    return torch.version.hip is not None


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cpu":
        return cpu_has_bf16()
    if is_rocm():
        # torch answers True on every AMD card, but RDNA1/2 (gfx10xx) have no bf16 math
        return not torch.cuda.get_device_properties(device).gcnArchName.startswith("gfx10")
    return torch.cuda.is_bf16_supported(including_emulation=False)


def cpu_has_bf16() -> bool:
    """bf16 runs at useful speed only on CPUs with AVX512-BF16 or AMX; elsewhere it was 20x slower than fp32 here."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(cfg: TrainConfig, device: torch.device) -> str:
    asked = next((p for p in ("bf16", "fp16", "fp32") if getattr(cfg, p)), None)
    if asked == "bf16" and not bf16_supported(device):
        raise UsageError(
            f"--bf16 was asked for, but {device_name(device)} has no bfloat16 support. "
            + ("Use --fp32 (the CPU default)." if device.type == "cpu"
               else "Use --fp16 (mixed precision with a gradient scaler) or --fp32.")
        )
    if asked == "fp16" and device.type == "cpu":
        raise UsageError("--fp16 needs a GPU; on the CPU use --fp32 (the default).")
    if asked:
        return asked
    if device.type == "cpu":
        return "fp32"
    return "bf16" if bf16_supported(device) else "fp16"


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "the CPU"


def peak_tflops(device: torch.device, precision: str, override: float | None) -> tuple[float, str]:
    """The peak assumed for MFU and where the number came from."""
    if override:
        return override, "--peak_tflops"
    if device.type == "cpu":
        threads = torch.get_num_threads()
        source = f"assumed {CPU_TFLOPS_PER_THREAD * 1000:.0f} GFLOP/s x {threads} CPU threads"
        return CPU_TFLOPS_PER_THREAD * threads, source
    name = device_name(device)
    for key, value in PEAK_TFLOPS.items():
        if key in name:
            # fp32 without tensor cores is far slower; TF32 is about half the bf16 rate on recent parts
            return (value / 2 if precision == "fp32" else value), f"data sheet of {key}"
    return 100.0, f"unknown device {name!r}; pass --peak_tflops"


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return maxrss if sys.platform == "darwin" else maxrss * 1024


def gpu_memory_metrics(device: torch.device) -> dict:
    if device.type != "cuda":
        return {}
    return {"system/gpu_memory_allocated_gib": torch.cuda.memory_allocated(device) / 2**30,
            "system/gpu_memory_reserved_gib": torch.cuda.memory_reserved(device) / 2**30}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
