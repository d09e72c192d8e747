"""GPU-only checks, marked `gpu`: skipped where PyTorch sees no CUDA or ROCm GPU, run where it does. In the image:

    docker run --rm --gpus all gpt-trainer:cuda python -m pytest -p no:cacheprovider /opt/gpt-trainer/tests/test_gpu.py
"""

import math
import re

import pytest
import torch

from gpt_trainer.commands.doctor import main as doctor
from gpt_trainer.data.tokens import prepare_data
from gpt_trainer.model.gpt import GPT, GPTConfig
from gpt_trainer.system.hardware import autocast, bf16_supported, gpu_memory_metrics, resolve_precision
from gpt_trainer.train.trainer import Trainer
from tests.conftest import make_trainer

pytestmark = pytest.mark.gpu
GPU = torch.device("cuda")


def gpu_trainer(tiny_cfg, *flags: str) -> Trainer:
    cfg = tiny_cfg("--device=cuda", "--fp32=false", *flags)
    return make_trainer(cfg, device="cuda")


def run_steps(trainer: Trainer, steps: int = 3) -> list[float]:
    losses = [trainer.train_step()[0].item() for _ in range(steps)]
    assert all(math.isfinite(loss) for loss in losses), losses
    return losses


def test_one_bf16_step_keeps_fp32_master_weights(tiny_cfg):
    if not bf16_supported(GPU):
        pytest.skip("this GPU has no bf16")
    trainer = gpu_trainer(tiny_cfg, "--bf16")
    assert trainer.precision == "bf16" and not trainer.scaler.is_enabled()
    run_steps(trainer)
    assert all(p.dtype == torch.float32 and p.device.type == "cuda" for p in trainer.model.parameters())


def test_one_fp16_step_uses_the_gradient_scaler(tiny_cfg):
    trainer = gpu_trainer(tiny_cfg, "--fp16")
    assert trainer.scaler.is_enabled()
    run_steps(trainer)
    assert math.isfinite(trainer.scaler.get_scale()) and trainer.scaler.get_scale() > 0


def test_the_optimizer_is_fused_adamw(tiny_cfg):
    trainer = gpu_trainer(tiny_cfg)
    assert isinstance(trainer.optimizer, torch.optim.AdamW) and trainer.optimizer.defaults["fused"] is True


def test_compiled_training_steps(tiny_cfg):
    trainer = gpu_trainer(tiny_cfg, "--compile")
    assert isinstance(trainer.forward, torch._dynamo.eval_frame.OptimizedModule)
    run_steps(trainer)


def test_attention_runs_on_the_flash_kernel():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    precision = "bf16" if bf16_supported(GPU) else "fp16"
    model = GPT(GPTConfig(vocab_size=64, block_size=128, n_layer=2, n_head=4, n_embd=256)).to(GPU)
    idx = torch.randint(0, 64, (4, 128), device=GPU)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]), autocast(GPU, precision):  # raises if flash cannot run these inputs
        _, loss = model(idx[:, :-1], idx[:, 1:])
    loss.backward()
    assert math.isfinite(loss.item())


def test_gpu_memory_metrics_are_reported(tiny_cfg):
    trainer = gpu_trainer(tiny_cfg)
    run_steps(trainer, 1)
    metrics = gpu_memory_metrics(GPU)
    assert metrics["system/gpu_memory_allocated_gib"] > 0
    assert metrics["system/gpu_memory_reserved_gib"] >= metrics["system/gpu_memory_allocated_gib"]


def test_doctor_lists_the_gpu(tmp_path, capsys):
    assert doctor([f"--output_dir={tmp_path}", "--require_gpu"]) == 0
    out = capsys.readouterr().out
    assert f"GPU 0:         {torch.cuda.get_device_name(0)}" in out and "bf16:" in out


def test_compile_auto_compiles_on_a_gpu(tiny_cfg):
    trainer = gpu_trainer(tiny_cfg, "--compile=auto")
    assert trainer.compile_seconds is not None and isinstance(trainer.forward, torch._dynamo.eval_frame.OptimizedModule)
    run_steps(trainer)


def test_float32_matmuls_use_tf32_on_a_gpu(tiny_cfg):
    torch.set_float32_matmul_precision("highest")  # the setting is global: an earlier test's trainer may have set it
    try:
        trainer = gpu_trainer(tiny_cfg, "--fp32", "--compile=false")
        assert trainer.precision == "fp32" and torch.backends.cuda.matmul.fp32_precision == "tf32"
    finally:
        torch.set_float32_matmul_precision("high")


def test_batch_size_auto_finds_a_micro_batch_that_trains(tiny_cfg):
    from gpt_trainer.plan.autobatch import settle_batch
    from gpt_trainer.system.distributed import World

    cfg = tiny_cfg("--device=cuda", "--fp32=false", "--batch_size=auto", "--global_batch_size=2048")
    precision = resolve_precision(cfg, GPU)
    chosen = settle_batch(cfg, prepare_data(cfg).tokenizer.vocab_size, GPU, precision, World())
    micro = chosen.micro_batch
    assert micro & (micro - 1) == 0 and micro * chosen.accumulation == 2048 and "fits in" in chosen.how
    trainer = make_trainer(cfg, device="cuda")
    assert trainer.plan.micro_batch == micro  # the plan made the same choice
    run_steps(trainer, 1)


def test_a_real_out_of_memory_stops_with_the_fixes(tiny_cfg):
    from gpt_trainer.commands.train import explain
    from gpt_trainer.train.trainer import OutOfMemory

    # ~25 GB of activations per layer: more than any GPU holds
    trainer = gpu_trainer(tiny_cfg, "--batch_size=65536", "--block_size=256", "--n_embd=384", "--n_head=6",
                          "--compile=false", "--max_steps=2")
    with pytest.raises(OutOfMemory) as stopped:
        trainer.train()
    assert stopped.value.failed_step == 1 and stopped.value.saved_to is None
    assert re.search("out of memory in training step 1: .*--batch_size auto.*Nothing was saved",
                     explain(stopped.value, trainer))
    assert torch.cuda.memory_allocated(GPU) < 2**30  # what the failed step held is released


def test_fsdp_bf16_policy_computes_in_bf16_and_keeps_fp32_master_weights():
    """--parallel fsdp --bf16: FSDP's policy casts each gathered unit to bf16 for compute, the sharded parameters stay
    fp32 (a world of one process: the policy is the same on every process)."""
    import socket

    import torch.distributed as dist

    from gpt_trainer.system.distributed import shard

    if not bf16_supported(GPU):
        pytest.skip("this GPU has no bf16")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=64)).to(GPU)
        shard(model, "bf16")
        seen = []
        model.blocks[0].mlp.fc.register_forward_hook(lambda module, args, out: seen.append(args[0].dtype))
        idx = torch.randint(0, 64, (2, 32), device=GPU)
        _, loss = model(idx, idx)
        loss.backward()
        assert seen == [torch.bfloat16]
        assert all(p.to_local().dtype == torch.float32 for p in model.parameters())
        assert all(p.grad is not None and p.grad.to_local().dtype == torch.float32 for p in model.parameters())
    finally:
        dist.destroy_process_group()


def test_peak_memory_of_a_training_step_is_near_the_plan(tiny_cfg):
    """The memory plan's allocated parts (all but its assumed context overhead) against the allocator's peak over a
    few bf16 steps of the tiny preset at its own block: within 35 %."""
    if not bf16_supported(GPU):
        pytest.skip("this GPU has no bf16")
    trainer = gpu_trainer(tiny_cfg, "--bf16", "--model_size=tiny", "--n_layer=6", "--n_head=6", "--n_embd=384",
                          "--block_size=256", "--batch_size=16", "--dropout=0.0", "--compile=false")
    torch.cuda.reset_peak_memory_stats(GPU)
    run_steps(trainer, 3)
    peak = torch.cuda.max_memory_allocated(GPU)
    plan = trainer.plan.memory
    planned = plan.total - plan.overhead
    assert abs(peak - planned) <= 0.35 * planned, f"peak {peak / 2**20:.0f} MiB, plan {planned / 2**20:.0f} MiB"
