"""GPU-only checks, marked `gpu`: skipped where PyTorch sees no CUDA or ROCm GPU, run where it does. In the image:

    docker run --rm --gpus all gpt-trainer:cuda python -m pytest -p no:cacheprovider /opt/gpt-trainer/tests/test_gpu.py
"""

import contextlib
import math
import re
import socket

import pytest
import torch
import torch.distributed as dist

from gpt_trainer.commands.doctor import main as doctor
from gpt_trainer.data.tokens import prepare_data
from gpt_trainer.model.gpt import GPT, GPTConfig
from gpt_trainer.system.distributed import shard
from gpt_trainer.system.hardware import autocast, bf16_supported, gpu_memory_metrics, is_rocm, resolve_precision
from gpt_trainer.train.trainer import Trainer
from tests.conftest import make_trainer
from tests.test_trainer import QUIET, train_watching_quiet_steps

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


AOTRITON_FLASH_ARCHS = ("gfx90a", "gfx942", "gfx950")  # MI200, MI300, MI350; RDNA parts only as an experiment


def flash_attention_missing() -> str | None:
    """Why this GPU has no flash-attention kernel for PyTorch to run, or None when it has one: NVIDIA from compute
    capability 8.0 (Ampere) on; AMD through AOTriton on the Instinct parts it is built for (AOTRITON_FLASH_ARCHS);
    never in a PyTorch built without it."""
    if not torch.backends.cuda.is_flash_attention_available():
        return f"this PyTorch ({torch.__version__}) was built without flash attention"
    if is_rocm():
        arch = torch.cuda.get_device_properties(GPU).gcnArchName.split(":")[0]
        return None if arch in AOTRITON_FLASH_ARCHS else f"{arch} has no AOTriton flash-attention kernel"
    major, minor = torch.cuda.get_device_capability(GPU)
    return None if (major, minor) >= (8, 0) else f"compute capability {major}.{minor} is below 8.0"


def test_attention_runs_on_the_flash_kernel():
    """Where the hardware has a flash kernel, the model's attention runs on it, asked for alone (no fallback)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    missing = flash_attention_missing()
    if missing:
        pytest.skip(f"no flash attention here: {missing}")
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
    from gpt_trainer.commands.failures import training_failure
    from gpt_trainer.errors import OutOfMemory

    # ~25 GB of activations per layer: more than any GPU holds
    trainer = gpu_trainer(tiny_cfg, "--batch_size=65536", "--block_size=256", "--n_embd=384", "--n_head=6",
                          "--compile=false", "--max_steps=2")
    with pytest.raises(OutOfMemory) as stopped:
        trainer.train()
    assert stopped.value.failed_step == 1 and stopped.value.saved_to is None
    assert re.search("out of memory in training step 1: .*--batch_size auto.*Nothing was saved",
                     training_failure(stopped.value, trainer))
    assert torch.cuda.memory_allocated(GPU) < 2**30  # what the failed step held is released


@contextlib.contextmanager
def one_process_group():
    """A NCCL process group of this one process, for FSDP on the GPU."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_fsdp_bf16_policy_computes_in_bf16_and_keeps_fp32_master_weights():
    """--parallel fsdp --bf16: FSDP's policy casts each gathered unit to bf16 for compute, the sharded parameters stay
    fp32 (a world of one process: the policy is the same on every process)."""
    if not bf16_supported(GPU):
        pytest.skip("this GPU has no bf16")
    with one_process_group():
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


def test_fsdp_materialises_on_the_gpu_and_generation_keeps_its_cache():
    """--parallel fsdp on a GPU (a world of one process): the model built on the meta device, sharded and materialised
    on the GPU has the weights one process draws for the seed, and generation keeps its key/value cache although
    FSDP's root moves a GPU forward's inputs to the device, rebuilding the lists among them."""
    cfg = GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=64)
    torch.manual_seed(0)
    whole = GPT.create(cfg, GPU).eval()
    with one_process_group():
        torch.manual_seed(0)
        with torch.device("meta"):
            model = GPT(cfg)
        shard(model, "fp32")
        model.materialise(GPU)
        model.eval()
        assert all(torch.equal(p.full_tensor(), whole.get_parameter(name)) for name, p in model.named_parameters())
        with torch.no_grad():
            for p in (*model.parameters(), *whole.parameters()):
                (p.to_local() if hasattr(p, "to_local") else p).mul_(20)  # each token's context changes the next
        prompt = torch.randint(0, 64, (1, 5), device=GPU)
        assert torch.equal(model.generate(prompt, 40, temperature=0), whole.generate(prompt, 40, temperature=0))
        model.reshard()


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


@pytest.mark.parametrize("precision", ["--fp32", "--bf16", "--fp16"])
def test_steps_that_neither_log_evaluate_nor_save_never_wait_for_the_gpu(tiny_cfg, precision):
    """What tests/test_trainer.py's counting stand-in shows on the CPU, on the GPU itself: CUDA's sync debug mode
    raises at any call that waits for the GPU, on from the start of each quiet step to the start of the next; from the
    second step (the first makes the optimizer's state and the allocator's first blocks, once). fp16 includes the
    gradient scaler's own skip and update."""
    if precision == "--bf16" and not bf16_supported(GPU):
        pytest.skip("this GPU has no bf16")
    trainer = gpu_trainer(tiny_cfg, precision, *QUIET, "--gradient_accumulation_steps=2", "--dropout=0.1")
    train_watching_quiet_steps(trainer, lambda on: torch.cuda.set_sync_debug_mode("error" if on else 0), from_step=2)
    assert trainer.step == 6 and trainer.health.read().bad_steps == 0


def test_a_checkpoint_keeps_this_gpu_s_rng_state_and_restores_one_of_an_8_gpu_node():
    """The state of the GPU this process draws on, alone; a checkpoint of the older format, with one state per GPU of
    an 8-GPU node (torch.cuda.get_rng_state_all), restores on this machine's GPU(s) without asking for the others."""
    from gpt_trainer.train import checkpoint

    torch.cuda.manual_seed(1234)
    saved = checkpoint.rng_states()
    assert len(saved["cuda"]) == 1 and torch.equal(saved["cuda"][0], torch.cuda.get_rng_state())
    expected = torch.rand(4, device=GPU)
    checkpoint.restore_rng_states({**saved, "cuda": [saved["cuda"][0], *[torch.cuda.get_rng_state()] * 7]})
    assert torch.equal(torch.rand(4, device=GPU), expected)


def test_the_process_group_s_time_out_is_changed_under_nccl():
    """settle_timeout's call on a NCCL group (a world of one process): taken without torch's warning that only nccl
    and gloo can change it, and the group still works."""
    import warnings

    from gpt_trainer.system.distributed import set_timeout

    with one_process_group(), warnings.catch_warnings():
        warnings.simplefilter("error")
        set_timeout(5.0)
        summed = torch.ones(1, device=GPU)
        dist.all_reduce(summed)
        assert summed.item() == 1


@pytest.mark.slow
def test_nccl_a_process_out_of_memory_ends_the_other_within_seconds_naming_it(tmp_path, cache_dir):
    """Two processes on two GPUs (NCCL), started by hand: rank 1 runs out of memory in its 4th step (a stand-in raises
    PyTorch's OutOfMemoryError) while rank 0 waits in the step's all-reduce, which NCCL alone would leave waiting
    for --dist_timeout. Rank 0's heartbeat thread aborts its communicator on rank 1's report, or ends the process
    after FAILED_PEER_GRACE_S: either way within seconds, naming rank 1 and why."""
    from gpt_trainer.system.distributed import FAILED_PEER_GRACE_S, HEARTBEAT_S
    from tests.test_distributed import out_of_memory_on_rank_1

    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    _, between = out_of_memory_on_rank_1(tmp_path, cache_dir, "--device=cuda", one_node=True)
    assert between < 2 * HEARTBEAT_S + FAILED_PEER_GRACE_S + 10


@pytest.mark.parametrize("precision", ["--fp32", "--bf16"])
def test_muon_steps_that_neither_log_evaluate_nor_save_never_wait_for_the_gpu(tiny_cfg, precision):
    """The same for --optimizer muon (its flags written out: tiny_cfg does not resolve muon's defaults), a bad step
    among the quiet ones: Muon's select and AdamW's found_inf both stay on the GPU."""
    if precision == "--bf16" and not bf16_supported(GPU):
        pytest.skip("this GPU has no bf16")
    trainer = gpu_trainer(tiny_cfg, precision, *QUIET, "--optimizer=muon", "--muon_learning_rate=0.02",
                          "--muon_momentum=0.95", "--muon_weight_decay=0", "--learning_rate=3e-3")
    forward = trainer.forward
    trainer.parallel.forward = lambda x, y: (lambda out: (out[0], out[1] * (math.nan if trainer.step == 3 else 1)))(
        forward(x, y))
    train_watching_quiet_steps(trainer, lambda on: torch.cuda.set_sync_debug_mode("error" if on else 0), from_step=2)
    assert trainer.step == 6 and trainer.health.read().bad_steps == 1
