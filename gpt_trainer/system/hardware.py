"""What we are running on: the device, the precision it supports, its peak throughput (for MFU) and its memory."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import re
import resource
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import TrainConfig
from ..errors import UsageError


@dataclass(frozen=True)
class Peak:
    """A part's dense (no sparsity) peak TFLOP/s from its vendor's data sheet or whitepaper, for MFU."""
    name: str
    pattern: str  # a regular expression for the names the part reports (torch.cuda.get_device_name), any case
    half: float  # bf16 tensor cores with fp32 accumulation (fp16 on parts without bf16)
    fp32: float  # float32 matmuls: the TF32 tensor-core rate where the part has TF32 (allow_tf32 turns it on)
    tf32: bool = True  # False: the part has no TF32 and fp32 is its plain FP32 (matrix) rate


# Most specific first: the first pattern that matches wins (GH200 before H200, H100 NVL before H100, L40S before L4).
# tests/test_hardware.py holds the names real parts report and checks that each finds its row.
PEAKS = [
    Peak("GB200", r"\bGB200\b", 2500.0, 1250.0),
    Peak("B200", r"\bB200\b", 2250.0, 1125.0),
    Peak("GH200", r"\bGH200\b", 989.4, 494.7),
    Peak("H200 NVL", r"\bH200 NVL\b", 835.5, 417.5),
    Peak("H200", r"\bH200\b", 989.4, 494.7),
    Peak("H100 NVL", r"\bH100 NVL\b", 835.5, 417.5),
    Peak("H100 PCIe", r"\bH100 PCIe\b", 756.5, 378.0),
    Peak("H100", r"\bH100\b", 989.4, 494.7),  # SXM
    Peak("A100", r"\bA100\b", 312.0, 156.0),
    Peak("A10", r"\bA10G?\b", 125.0, 62.5),  # A10G: AWS's A10, no separate data sheet
    Peak("L40S", r"\bL40S\b", 362.0, 183.0),
    Peak("L4", r"\bL4\b", 121.0, 60.0),
    Peak("RTX 4090", r"\bRTX 4090\b", 165.2, 82.6),
    Peak("RTX 3090", r"\bRTX 3090\b", 71.0, 35.6),
    Peak("V100", r"\bV100\b", 125.0, 15.7, tf32=False),
    Peak("T4", r"\bT4\b", 65.0, 8.1, tf32=False),
    Peak("MI355X", r"\bMI355X\b", 2516.6, 157.3, tf32=False),  # CDNA4 has no TF32 hardware
    Peak("MI350X", r"\bMI350X\b", 2307.0, 144.2, tf32=False),
    Peak("MI325X", r"\bMI325X\b", 1307.4, 653.7),
    Peak("MI300X", r"\bMI300X\b", 1307.4, 653.7),
    Peak("MI300A", r"\bMI300A\b", 980.6, 490.3),
    Peak("MI250X", r"\bMI250X\b", 191.5, 47.9, tf32=False),  # per GCD: PyTorch sees each half as one device
    Peak("MI250", r"\bMI250\b", 181.0, 45.3, tf32=False),  # per GCD
    Peak("MI210", r"\bMI210\b", 181.0, 45.3, tf32=False),
    Peak("MI100", r"\bMI100\b", 92.3, 46.1, tf32=False),
    Peak("RX 7900 XTX", r"\b7900 XTX\b", 122.8, 61.4, tf32=False),
]
UNKNOWN_DEVICE_TFLOPS = 100.0
# FLOP per cycle of one core by the widest unit /proc/cpuinfo reports, best first; the precision None means any. These
# are upper bounds (two FMA units, the highest clock), so an MFU on the CPU is never above 100 %. The bf16 rows are also
# what makes --bf16 worth allowing on a CPU.
CPU_UNITS = [
    ("amx_bf16", "bf16", 1024),  # AMX tile multiply (Xeon Sapphire Rapids and later): 1,024 bf16 FLOP/cycle
    ("avx512_bf16", "bf16", 128),  # two 512-bit units x 16 bf16 pairs x 2
    ("avx512f", None, 64),  # two 512-bit FMA units x 16 fp32 lanes x 2
    ("avx2", None, 32),  # two 256-bit FMA units x 8 fp32 lanes x 2; also the guess where cpuinfo says nothing
]
CPU_MAX_FREQ_FILE = Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")  # kHz, turbo included
CPU_DEFAULT_GHZ = 2.5  # where neither it nor cpuinfo gives a clock


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


def cpu_info() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:  # not Linux
        return ""


def cpu_has_bf16() -> bool:
    """bf16 runs at useful speed only on CPUs with AVX512-BF16 or AMX; elsewhere it was 20x slower than fp32 here."""
    flags = set(cpu_info().split())
    return any(unit in flags for unit, speeds_up, _ in CPU_UNITS if speeds_up == "bf16")


def cpu_peak_tflops(precision: str, threads: int) -> tuple[float, str]:
    info = cpu_info()
    flags = set(info.split())
    known = [(unit, flop) for unit, speeds_up, flop in CPU_UNITS if unit in flags and speeds_up in (None, precision)]
    unit, flop = known[0] if known else ("guessed: no x86 flags", CPU_UNITS[-1][2])
    ghz = cpu_max_ghz(info)
    return (threads * ghz * flop / 1000,
            f"assumed {ghz:.1f} GHz x {flop} FLOP/cycle ({unit}) x {threads} CPU threads; --peak_tflops to be exact")


def cpu_max_ghz(info: str) -> float:
    """The highest clock a core may run at: cpufreq's maximum where the kernel has it (cpuinfo shows the current clock,
    which an idle core lowers), else the fastest core cpuinfo shows (virtual machines)."""
    with contextlib.suppress(OSError, ValueError):
        return int(CPU_MAX_FREQ_FILE.read_text()) / 1e6
    clocks = [float(mhz) for mhz in re.findall(r"^cpu MHz\s*:\s*([\d.]+)", info, re.M)]
    return max(clocks) / 1000 if clocks else CPU_DEFAULT_GHZ


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


def keep_rng(device: torch.device):
    """A block whose random draws leave training's random state as it was (the one way a run isolates them, as
    compiling's warm-up does): the CPU generator, and the device's own on a GPU."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "the CPU"


def find_peak(name: str) -> Peak | None:
    return next((peak for peak in PEAKS if re.search(peak.pattern, name, re.IGNORECASE)), None)


def peak_tflops(device: torch.device, precision: str, override: float | None) -> tuple[float, str]:
    """The peak assumed for MFU (for the precision that actually runs) and where the number came from."""
    if override:
        return override, "--peak_tflops"
    if device.type == "cpu":
        return cpu_peak_tflops(precision, torch.get_num_threads())
    name = device_name(device)
    peak = find_peak(name)
    if peak is None:
        return UNKNOWN_DEVICE_TFLOPS, f"unknown device {name!r}; pass --peak_tflops"
    if precision != "fp32":
        return peak.half, f"data sheet of {peak.name}, dense {precision}"
    return peak.fp32, f"data sheet of {peak.name}, dense {'TF32' if peak.tf32 else 'FP32'}"


def allow_tf32(device: torch.device) -> None:
    """float32 matmuls on TF32 tensor cores (10-bit mantissa, fp32 range): the fp32 path and everything outside
    autocast run up to 8x faster on Ampere and later (and on MI300, through hipBLASLt), at a precision training does
    not notice. Convolutions already default to TF32. This call, unlike the newer fp32_precision flags, keeps
    PyTorch's old and new TF32 settings consistent, so code reading either works."""
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")


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


def empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


@functools.cache
def c_library() -> ctypes.CDLL:
    """The C library, looked up once (finding it runs ldconfig, about a millisecond)."""
    return ctypes.CDLL(ctypes.util.find_library("c"))


def return_freed_memory() -> bool:
    """Give the pages the C heap holds free back to the system (glibc's malloc_trim); False where there is no such
    call (macOS, musl). Once a large tensor has been freed, glibc raises its mmap threshold and keeps the memory of
    later freed tensors in its heap, so a process that restored or wrote a checkpoint would hold the size of that
    moment's temporaries until it exits. Called after those moments, a trim costs one pass over the heap there and
    nothing in the steps between."""
    trim = getattr(c_library(), "malloc_trim", None)
    if trim is None:
        return False
    trim(0)
    return True


M_MMAP_THRESHOLD = -3  # mallopt's parameter number (glibc's malloc.h)
LARGE_BLOCK_BYTES = 2**20


def return_large_blocks_when_freed() -> bool:
    """From now on every block of LARGE_BLOCK_BYTES or more is mapped on its own and given back to the system the
    moment it is freed (glibc's mallopt: a fixed mmap threshold). For the processes of a CPU FSDP job, which share
    one machine's memory: with glibc's rising threshold, the gathered weights, reduce-scatter buffers and gradients
    a backward pass frees stay resident in each heap, and each of a medium model's two processes was resident for
    0.75 GiB more at the end of the backward pass (docs/memory.md). The price is a page fault for each page of each
    large block, about a tenth of such a step's time, which is why a single-process CPU run (the demo, a small
    model) keeps glibc's default. False where there is no such call."""
    mallopt = getattr(c_library(), "mallopt", None)
    return mallopt is not None and mallopt(M_MMAP_THRESHOLD, LARGE_BLOCK_BYTES) == 1


MEMORY_MARGIN = 0.10  # of the memory a run may use, kept back for what no estimate or trial step sees


def usable_gpu_memory(device: torch.device) -> int:
    """The bytes a run may plan to use on this GPU, the one figure the memory plan and --batch_size auto both measure
    against: what is free now plus what this process's allocator already holds (free memory, not the total: the CUDA
    context and any other process on the GPU hold the rest), less MEMORY_MARGIN for the allocator's fragmentation,
    compiled kernels' workspaces and the temporary buffers of single kernels."""
    free, _ = torch.cuda.mem_get_info(device)
    return int((free + torch.cuda.memory_reserved(device)) * (1 - MEMORY_MARGIN))


def memory_in_use(device: torch.device) -> str:
    """For an out-of-memory message: what this process holds and what the device has."""
    if device.type != "cuda":
        return f"peak resident memory of this process {peak_memory_bytes(device) / 2**30:.1f} GiB"
    free, total = torch.cuda.mem_get_info(device)
    return (f"{torch.cuda.memory_allocated(device) / 2**30:.1f} GiB allocated by PyTorch "
            f"({torch.cuda.memory_reserved(device) / 2**30:.1f} GiB reserved), {free / 2**30:.1f} of "
            f"{total / 2**30:.1f} GiB free on {device_name(device)}")
