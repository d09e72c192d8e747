"""--batch_size auto and --global_batch_size. No GPU runs here, so the GPU's memory is simulated: a step's peak memory
grows with the micro-batch and the "GPU" raises PyTorch's own OutOfMemoryError past its capacity. The real search on
a GPU is in tests/test_gpu.py."""

import json

import pytest
import torch

from gpt_trainer.commands.train import main
from gpt_trainer.config import CPU_AUTO_BATCH_SIZE
from gpt_trainer.errors import UsageError
from gpt_trainer.plan import autobatch
from gpt_trainer.plan.autobatch import largest_that_fits, settle_batch
from gpt_trainer.system.distributed import World

GIB = 2**30
CPU, GPU = torch.device("cpu"), torch.device("cuda")  # a cuda device object needs no GPU until a tensor uses it


def simulated_gpu(capacity: int, base: int, per_sequence: int, tried: list):
    """A step's peak memory: `base` (weights, optimizer) + `per_sequence` per sequence; beyond `capacity`, OOM."""
    def peak_bytes_of(batch: int) -> int:
        tried.append(batch)
        peak = base + batch * per_sequence
        if peak > capacity:
            raise torch.OutOfMemoryError(f"CUDA out of memory (simulated): tried to allocate {peak} bytes")
        return peak
    return peak_bytes_of


@pytest.mark.parametrize("limit, capacity, expected", [
    (9 * GIB, 16 * GIB, 16),  # 1 + 16 x 0.5 = 9 GiB fits the limit; 32 needs 17
    (40 * GIB, 12 * GIB, 16),  # the margin would allow 64, but 32 already runs out of memory
    (0.5 * GIB, 16 * GIB, 0),  # not even one sequence
    (1000 * GIB, 1000 * GIB, autobatch.LARGEST_TRIED),
])
def test_the_search_picks_the_largest_power_of_two_under_the_limit(limit, capacity, expected):
    tried = []
    fits = largest_that_fits(simulated_gpu(capacity, GIB, GIB // 2, tried), limit)
    assert fits == expected
    assert tried == [2**i for i in range(len(tried))]  # powers of two from 1, stopping at the first that fails
    assert max(tried) <= autobatch.LARGEST_TRIED


def on_simulated_gpu(monkeypatch, free: int, capacity: int, per_sequence: int = GIB // 2) -> list:
    tried = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 80 * GIB))
    monkeypatch.setattr(autobatch, "step_peak_bytes", lambda *args: (
        simulated_gpu(capacity, GIB, per_sequence, tried), 0))
    return tried


def test_auto_on_a_gpu_keeps_a_margin_and_derives_the_accumulation(tiny_cfg, monkeypatch):
    tried = on_simulated_gpu(monkeypatch, free=20 * GIB, capacity=20 * GIB)  # limit 18 GiB: 32 sequences (17 GiB)
    cfg = tiny_cfg("--batch_size=auto", "--global_batch_size=256")
    chosen = settle_batch(cfg, 100, GPU, "bf16", World())
    assert (chosen.micro_batch, chosen.accumulation) == (32, 8)
    assert tried == [1, 2, 4, 8, 16, 32, 64]
    assert "micro-batch 32" in chosen.how and "8 accumulation steps" in chosen.how and "18.0 GiB" in chosen.how


def test_auto_lowers_the_micro_batch_to_divide_the_global_batch(tiny_cfg, monkeypatch):
    on_simulated_gpu(monkeypatch, free=20 * GIB, capacity=20 * GIB)
    cfg = tiny_cfg("--batch_size=auto", "--global_batch_size=48")
    chosen = settle_batch(cfg, 100, GPU, "bf16", World())
    assert "32 lowered" in chosen.how and (chosen.micro_batch, chosen.accumulation) == (24, 2)


def test_auto_refuses_a_gpu_where_nothing_fits(tiny_cfg, monkeypatch):
    on_simulated_gpu(monkeypatch, free=GIB, capacity=GIB)
    with pytest.raises(UsageError, match="not even one sequence .* smaller --model_size or --block_size"):
        settle_batch(tiny_cfg("--batch_size=auto"), 100, GPU, "bf16", World())


@pytest.mark.parametrize("flags, world, expected", [
    (["--batch_size=auto"], 1, (CPU_AUTO_BATCH_SIZE, 1)),
    (["--batch_size=auto", "--global_batch_size=64"], 1, (16, 4)),
    (["--batch_size=8", "--global_batch_size=48"], 1, (8, 6)),
    (["--batch_size=auto", "--global_batch_size=64"], 2, (16, 2)),  # 32 per process
    (["--batch_size=4"], 1, (4, 1)),  # plain numbers stay as given
])
def test_settle_batch_on_the_cpu(tiny_cfg, flags, world, expected):
    chosen = settle_batch(tiny_cfg(*flags), 100, CPU, "fp32", World(0, 0, world))
    assert (chosen.micro_batch, chosen.accumulation) == expected


@pytest.mark.parametrize("flags, world, message", [
    (["--batch_size=16", "--global_batch_size=40"], 1, "not a multiple of --batch_size 16 x 1 process"),
    (["--global_batch_size=63"], 2, "does not divide among 2 processes"),
    (["--global_batch_size=64", "--gradient_accumulation_steps=2"], 1, "give one of them, not both"),
])
def test_contradicting_batch_flags_are_refused(tiny_cfg, flags, world, message):
    with pytest.raises(UsageError, match=message):
        settle_batch(tiny_cfg(*flags), 100, CPU, "fp32", World(0, 0, world))


def test_the_chosen_batch_is_printed_and_stored_in_config_json(tiny_argv, tmp_path, capsys):
    assert main(tiny_argv("--batch_size=auto", "--global_batch_size=32", "--max_steps=2")) == 0
    assert "batch: micro-batch 16 (the CPU default) x 2 accumulation steps" in capsys.readouterr().out
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (saved["batch_size"], saved["gradient_accumulation_steps"], saved["global_batch_size"]) == (16, 2, 32)
    assert saved["batch_size_choice"].startswith("micro-batch 16")


def test_a_bad_global_batch_changes_no_file(tiny_argv, tmp_path, capsys):
    assert main(tiny_argv("--batch_size=16", "--global_batch_size=40")) == 2
    assert "--global_batch_size 40 is not a multiple" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_auto_under_fsdp_takes_the_memory_plan_not_a_full_replica(tiny_cfg, monkeypatch):
    """--parallel fsdp: a trial step here would run an unsharded replica (N times each process's weights, gradients
    and AdamW state), so the search takes the memory plan's estimate of the sharded step instead."""
    from gpt_trainer.plan.memory import plan_for_flags

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (20 * GIB, 80 * GIB))
    monkeypatch.setattr(autobatch, "step_peak_bytes", lambda *args: pytest.fail("measured an unsharded replica"))
    monkeypatch.setattr(autobatch, "all_reduce", lambda tensor, world, op: tensor)  # one GPU stands for all four
    cpu_tensor = torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda value, device=None: cpu_tensor(value))  # no CUDA here
    cfg = tiny_cfg("--batch_size=auto", "--parallel=fsdp", "--n_layer=48", "--n_head=25", "--n_embd=1600",  # xl
                   "--block_size=1024")
    chosen = settle_batch(cfg, 50257, GPU, "bf16", World(0, 0, 4))
    limit = 18 * GIB  # 90 % of the free 20 GiB
    total = lambda b: plan_for_flags(cfg, 50257, "bf16", b, 4).total  # noqa: E731
    assert total(chosen.micro_batch) <= limit < total(2 * chosen.micro_batch)
    assert "FSDP training step by the memory plan's estimate fits in 18.0 GiB" in chosen.how
    replica = plan_for_flags(cfg, 50257, "bf16", chosen.micro_batch, 4).with_setup(parallel="ddp")
    assert replica.total > limit  # the DDP-style full replica would not have fitted at this micro-batch


def failing_gpu_library(capacity: int, message: str, tried: list):
    """Stand-in for a GPU library that cannot get its workspace past `capacity`: the RuntimeError PyTorch raises
    with the library's status text (constructed here; no GPU runs), not PyTorch's own OutOfMemoryError."""
    def peak_bytes_of(batch: int) -> int:
        tried.append(batch)
        if GIB + batch * GIB // 2 > capacity:
            raise RuntimeError(message)
        return GIB + batch * GIB // 2
    return peak_bytes_of


@pytest.mark.parametrize("message", [
    "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
    "cuDNN error: CUDNN_STATUS_INTERNAL_ERROR_DEVICE_ALLOCATION_FAILED",
    "HIPBLAS_STATUS_ALLOC_FAILED when calling `hipblasLtMatmul( handle, ...)`",
    "HIP error: out of memory",
])
def test_a_gpu_library_out_of_memory_ends_the_search_like_the_allocators(message):
    tried = []
    assert largest_that_fits(failing_gpu_library(12 * GIB, message, tried), 40 * GIB) == 16
    assert tried == [1, 2, 4, 8, 16, 32]


def test_another_error_in_a_trial_step_is_not_taken_for_out_of_memory():
    with pytest.raises(RuntimeError, match="CUBLAS_STATUS_EXECUTION_FAILED"):
        largest_that_fits(failing_gpu_library(12 * GIB, "CUDA error: CUBLAS_STATUS_EXECUTION_FAILED when calling "
                                                        "`cublasGemmEx(...)`", []), 40 * GIB)


def test_the_search_and_the_printed_plan_measure_against_the_same_memory(tiny_cfg, monkeypatch):
    """Stand-ins for the GPU's numbers (no GPU here): 20 GiB free, 2 GiB held by this process's allocator. The memory
    plan's capacity and the search's limit are one figure, 90 % of the 22 GiB this process can have."""
    from gpt_trainer.plan.memory import plan_for_run

    tried = on_simulated_gpu(monkeypatch, free=20 * GIB, capacity=40 * GIB)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 2 * GIB)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    cfg = tiny_cfg("--batch_size=auto")
    chosen = settle_batch(cfg, 100, GPU, "bf16", World())
    plan = plan_for_run(cfg, 100, GPU, "bf16", chosen.micro_batch, 1)
    assert plan.capacity == int(22 * GIB * 0.9) and "19.8 GiB" in chosen.how
    assert chosen.micro_batch == 32 and tried[-1] == 64  # 1 + 32 x 0.5 = 17 GiB fits 19.8; 64 needs 33
    assert plan.describe()[1].endswith(f"of 19.8 GiB on NVIDIA H100 80GB HBM3 (its free memory less 10%): "
                                       f"{'fits' if plan.fits else 'does NOT fit'}")
