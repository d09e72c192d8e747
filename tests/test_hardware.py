"""Precision choice, and the C heap handing memory back. GPU answers are simulated (monkeypatched torch.cuda /
torch.version) because no GPU runs here; the CPU cases are real."""

import platform
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from gpt_trainer.config import parse_args
from gpt_trainer.errors import UsageError
from gpt_trainer.system import hardware

CPU, GPU = torch.device("cpu"), torch.device("cuda")


def test_cpu_defaults_to_fp32_and_refuses_fp16():
    assert hardware.resolve_precision(parse_args([]), CPU) == "fp32"
    with pytest.raises(UsageError, match="--fp16 needs a GPU.*--fp32"):
        hardware.resolve_precision(parse_args(["--fp16"]), CPU)


@pytest.mark.parametrize("has_bf16", [True, False])
def test_cpu_bf16_only_where_the_cpu_has_it(monkeypatch, has_bf16):
    monkeypatch.setattr(hardware, "cpu_has_bf16", lambda: has_bf16)
    if has_bf16:
        assert hardware.resolve_precision(parse_args(["--bf16"]), CPU) == "bf16"
    else:
        with pytest.raises(UsageError, match="no bfloat16 support. Use --fp32"):
            hardware.resolve_precision(parse_args(["--bf16"]), CPU)


def test_gpu_without_bf16_defaults_to_fp16_and_bf16_is_an_error_naming_fp16(monkeypatch):
    monkeypatch.setattr(hardware, "bf16_supported", lambda device: False)  # simulated: a T4-class GPU
    monkeypatch.setattr(hardware, "device_name", lambda device: "Tesla T4")
    assert hardware.resolve_precision(parse_args([]), GPU) == "fp16"
    with pytest.raises(UsageError, match="Tesla T4 has no bfloat16 support. Use --fp16"):
        hardware.resolve_precision(parse_args(["--bf16"]), GPU)


def test_gpu_with_bf16_defaults_to_bf16(monkeypatch):
    monkeypatch.setattr(hardware, "bf16_supported", lambda device: True)  # simulated
    assert hardware.resolve_precision(parse_args([]), GPU) == "bf16"
    assert hardware.resolve_precision(parse_args(["--fp32"]), GPU) == "fp32"


@pytest.mark.parametrize("arch, expected", [("gfx1030", False), ("gfx1100", True), ("gfx942:sramecc+:xnack-", True)])
def test_rocm_bf16_depends_on_the_architecture(monkeypatch, arch, expected):
    monkeypatch.setattr(torch.version, "hip", "6.3")  # simulated ROCm build
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(gcnArchName=arch))
    assert hardware.bf16_supported(GPU) is expected


def test_mfu_peak_is_looked_up_by_name_or_overridden(monkeypatch):
    monkeypatch.setattr(hardware, "device_name", lambda device: "NVIDIA H100 80GB HBM3")
    assert hardware.peak_tflops(GPU, "bf16", None) == (989.4, "data sheet of H100, dense bf16")
    assert hardware.peak_tflops(GPU, "fp32", None) == (494.7, "data sheet of H100, dense TF32")  # allow_tf32 is on
    assert hardware.peak_tflops(GPU, "bf16", 123.0) == (123.0, "--peak_tflops")
    monkeypatch.setattr(hardware, "device_name", lambda device: "Tesla V100-SXM2-16GB")
    assert hardware.peak_tflops(GPU, "fp32", None) == (15.7, "data sheet of V100, dense FP32")  # no TF32 on Volta
    monkeypatch.setattr(hardware, "device_name", lambda device: "Some Future GPU")
    assert hardware.peak_tflops(GPU, "bf16", None) == (100.0, "unknown device 'Some Future GPU'; pass --peak_tflops")


AVX2_ONLY = "processor\t: 0\ncpu MHz\t\t: 2500.000\nflags\t\t: fpu sse2 avx fma avx2\n"
SAPPHIRE_RAPIDS = "processor\t: 0\ncpu MHz\t\t: 2599.998\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"


@pytest.mark.parametrize("cpuinfo, precision, per_thread, unit", [
    (AVX2_ONLY, "fp32", 2.5 * 32, "avx2"), (AVX2_ONLY, "bf16", 2.5 * 32, "avx2"),
    (SAPPHIRE_RAPIDS, "fp32", 2.6 * 64, "avx512f"), (SAPPHIRE_RAPIDS, "bf16", 2.6 * 1024, "amx_bf16"),
    ("", "fp32", 2.5 * 32, "guessed"),  # macOS, or no /proc
])
def test_the_cpu_peak_follows_the_vector_units_and_clock_cpuinfo_reports(monkeypatch, tmp_path, cpuinfo, precision,
                                                                        per_thread, unit):
    monkeypatch.setattr(hardware, "cpu_info", lambda: cpuinfo)
    monkeypatch.setattr(hardware, "CPU_MAX_FREQ_FILE", tmp_path / "absent")  # as in a virtual machine
    tflops, source = hardware.peak_tflops(CPU, precision, None)
    assert tflops == pytest.approx(per_thread * torch.get_num_threads() / 1000, rel=1e-3) and unit in source
    assert hardware.cpu_has_bf16() is ("amx_bf16" in cpuinfo)


def test_the_cpu_clock_is_the_highest_a_core_may_reach(monkeypatch, tmp_path):
    max_freq = tmp_path / "cpuinfo_max_freq"
    max_freq.write_text("3500000\n")  # kHz: 3.5 GHz with turbo, while an idle core shows 800 MHz
    monkeypatch.setattr(hardware, "CPU_MAX_FREQ_FILE", max_freq)
    assert hardware.cpu_max_ghz("cpu MHz\t\t: 800.000\n") == 3.5
    monkeypatch.setattr(hardware, "CPU_MAX_FREQ_FILE", tmp_path / "absent")
    assert hardware.cpu_max_ghz("cpu MHz\t\t: 800.000\ncpu MHz\t\t: 3100.500\n") == pytest.approx(3.1005)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_real_cpu_step_never_measures_above_the_assumed_peak(precision):
    """On this machine, whatever it is. The old fixed 80 GFLOP/s per thread measured 125 % (fp32) and 200 % (bf16) with
    this matmul-heavy shape on a 2-core Xeon with AVX-512 and AMX."""
    from gpt_trainer.commands.benchmark import benchmark

    if precision == "bf16" and not hardware.cpu_has_bf16():
        pytest.skip("this CPU has no bf16 (it is refused here)")
    result = benchmark(["--n_layer=2", "--n_head=8", "--n_embd=512", "--block_size=128", "--batch_size=8",
                        "--vocab_size=512", "--steps=3", "--warmup=1", "--device=cpu", f"--{precision}"])
    assert 0 < result["mfu"] < 1, result["peak_source"]


# What torch.cuda.get_device_name() returns on real parts (from public nvidia-smi output, PyTorch collect_env reports
# and issue threads; on ROCm the marketing names come from libdrm's amdgpu.ids), and the row each must find.
REPORTED_NAMES = {
    "NVIDIA GB200": "GB200", "NVIDIA B200": "B200", "NVIDIA GH200 480GB": "GH200", "NVIDIA H200 NVL": "H200 NVL",
    "NVIDIA H200": "H200", "NVIDIA H100 NVL": "H100 NVL", "NVIDIA H100 PCIe": "H100 PCIe",
    "NVIDIA H100 80GB HBM3": "H100", "NVIDIA H100": "H100", "NVIDIA A100-SXM4-80GB": "A100",
    "NVIDIA A100-SXM4-40GB": "A100", "NVIDIA A100-PCIE-40GB": "A100", "NVIDIA A100 80GB PCIe": "A100",
    "NVIDIA A10G": "A10", "NVIDIA A10": "A10", "NVIDIA L40S": "L40S", "NVIDIA L4": "L4",
    "NVIDIA GeForce RTX 4090": "RTX 4090", "NVIDIA GeForce RTX 3090": "RTX 3090", "Tesla V100-SXM2-16GB": "V100",
    "Tesla V100-PCIE-32GB": "V100", "Tesla T4": "T4", "AMD Instinct MI355X": "MI355X", "AMD Instinct MI350X": "MI350X",
    "AMD Instinct MI325X": "MI325X", "AMD Instinct MI300X": "MI300X", "AMD Instinct MI300X VF": "MI300X",
    "AMD Instinct MI300A": "MI300A", "AMD Instinct MI250X/MI250": "MI250X", "AMD Instinct MI250X / MI250": "MI250X",
    "AMD Instinct MI250": "MI250", "AMD Instinct MI210": "MI210", "AMD Instinct MI100": "MI100",
    "AMD Radeon RX 7900 XTX": "RX 7900 XTX",
}


@pytest.mark.parametrize("reported, row", REPORTED_NAMES.items())
def test_each_reported_device_name_finds_its_row(reported, row):
    assert hardware.find_peak(reported).name == row


def test_every_row_of_the_peak_table_is_found_by_a_real_name():
    assert {peak.name for peak in hardware.PEAKS} == set(REPORTED_NAMES.values())
    for peak in hardware.PEAKS:
        assert 0 < peak.fp32 < peak.half, peak  # the 16-bit tensor rate is always the higher one


def test_tf32_is_allowed_for_float32_matmuls_on_a_gpu_only():
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        hardware.allow_tf32(CPU)
        assert torch.backends.cuda.matmul.fp32_precision == "ieee"
        hardware.allow_tf32(GPU)  # sets PyTorch's flags; no GPU is needed for that
        assert torch.backends.cuda.matmul.fp32_precision == "tf32" and torch.backends.cuda.matmul.allow_tf32
        assert torch.backends.cudnn.conv.fp32_precision == "tf32"  # PyTorch's default for convolutions
    finally:
        torch.set_float32_matmul_precision(before)


def test_cuda_device_without_a_gpu_is_a_usage_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UsageError, match="sees no GPU"):
        hardware.pick_device("cuda")
    assert hardware.pick_device("auto") == CPU


def test_usable_gpu_memory_is_the_free_memory_and_this_process_s_own_less_the_margin(monkeypatch):
    """Stand-ins for the driver's numbers (no GPU here): of an 80 GiB GPU another process holds 50 GiB and this one's
    allocator 4 GiB, 26 GiB are free; the run may plan for the 30 GiB it can have, less the margin."""
    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (26 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 4 * gib)
    assert hardware.usable_gpu_memory(torch.device("cuda")) == int(30 * gib * (1 - hardware.MEMORY_MARGIN))


# ---- glibc's heap: return_freed_memory trims it, return_large_blocks_when_freed maps large blocks on their own -----
# in a fresh process: pytest's own heap (thousands of tests' freed memory) would serve the blocks from its free lists
C_HEAP = """
import ctypes, ctypes.util, os, sys
from gpt_trainer.system import hardware

def resident():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]

def touched_then_freed(size, count):
    \"\"\"`count` blocks of `size` bytes, written to (so resident), then freed but the last, which keeps the heap's
    top, so that freeing the others below it cannot shrink the heap.\"\"\"
    blocks = [libc.malloc(size) for _ in range(count)]
    for block in blocks:
        ctypes.memset(block, 1, size)
    for block in blocks[:-1]:
        libc.free(block)
"""
HEAP_SCRIPT = C_HEAP + """
before = resident()
touched_then_freed(16 * 1024, 8192)  # 128 MiB below the mmap threshold: in the heap
held = resident()
trimmed = hardware.return_freed_memory()
print(held - before, held - resident(), trimmed)
"""
GLIBC_ONLY = pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                                reason="malloc_trim and mallopt are glibc's")


@GLIBC_ONLY
def test_memory_freed_into_the_heap_goes_back_to_the_system():
    done = subprocess.run([sys.executable, "-c", HEAP_SCRIPT], capture_output=True, text=True, check=True)
    kept_after_free, returned, trimmed = done.stdout.split()
    assert int(kept_after_free) > 100 * 2**20  # free alone kept the pages: what follows is the trim's doing
    assert trimmed == "True" and int(returned) > 100 * 2**20, f"only {int(returned) / 2**20:.0f} MiB went back"


# ---- return_large_blocks_when_freed: blocks of a MiB or more go back when freed, without a trim -------------------
LARGE_BLOCKS_SCRIPT = C_HEAP + """
fixed = sys.argv[1] == "fixed" and hardware.return_large_blocks_when_freed()
libc.free(libc.malloc(16 * 2**20))  # glibc's own rule: a freed 16 MiB block raises its mmap threshold past it
before = resident()
touched_then_freed(2 * 2**20, 64)  # 128 MiB of 2 MiB blocks, a gradient's size
print(fixed, resident() - before)
"""


@GLIBC_ONLY
@pytest.mark.parametrize("threshold", ["fixed", "glibc's"])
def test_large_blocks_go_back_to_the_system_when_freed_once_asked(threshold):
    """What a CPU FSDP process asks for (parallelize): its freed gradients and gathered weights leave at once. The
    control, glibc as it comes, keeps them resident after they are freed."""
    done = subprocess.run([sys.executable, "-c", LARGE_BLOCKS_SCRIPT, threshold], capture_output=True, text=True,
                          check=True)
    fixed, kept = done.stdout.split()
    if threshold == "fixed":
        assert fixed == "True" and int(kept) < 16 * 2**20, f"{int(kept) / 2**20:.0f} MiB stayed resident"
    else:
        assert int(kept) > 100 * 2**20  # the control: without it, freed blocks stay
