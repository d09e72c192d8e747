"""Precision choice. GPU answers are simulated (monkeypatched torch.cuda / torch.version) because no GPU runs here;
the CPU cases are real."""

from types import SimpleNamespace

import pytest
import torch

from gpt_trainer import hardware
from gpt_trainer.config import parse_args
from gpt_trainer.errors import UsageError

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
    assert hardware.peak_tflops(GPU, "bf16", None) == (989.0, "data sheet of H100")
    assert hardware.peak_tflops(GPU, "bf16", 123.0) == (123.0, "--peak_tflops")
    assert hardware.peak_tflops(CPU, "fp32", None)[0] == pytest.approx(0.08 * torch.get_num_threads())


def test_cuda_device_without_a_gpu_is_a_usage_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UsageError, match="sees no GPU"):
        hardware.pick_device("cuda")
    assert hardware.pick_device("auto") == CPU
