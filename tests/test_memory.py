"""The memory plan (gpt_trainer/memory.py): its activation formula against the bytes a real forward pass saves for
backward, its weight/gradient/optimizer bytes against a real model and optimizer, the suggestion when a run does not
fit, and the plan printed by --dry_run. All on the CPU, in fp32 and with dropout 0: the CPU's dropout keeps fp32
masks and falls back to the math attention kernel, where a GPU keeps one-byte masks and uses the fused kernels."""

import dataclasses
import functools
import json

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from gpt_trainer.commands.train import main
from gpt_trainer.config import MODEL_PRESETS, ModelShape, parse_args
from gpt_trainer.model import gpt as model
from gpt_trainer.plan import memory
from gpt_trainer.plan.memory import GIB, estimate, kept_activation_bytes, parameter_count, plan_for_flags
from gpt_trainer.plan.resolve import resolve
from gpt_trainer.system.distributed import World
from gpt_trainer.train.optimizers import build_optimizer
from tests.conftest import GPT2_ADAMW

VOCAB, BATCH, BLOCK = 1000, 2, 128  # small enough that `small` (12 x 768) measures in seconds


def saved_bytes_by_hook(net: torch.nn.Module, idx: torch.Tensor, targets: torch.Tensor) -> int:
    """Our own measurement, used when model.saved_activation_bytes is not there: every distinct storage autograd saves
    for backward (parameters, idx and targets left out), at its full size."""
    exclude = {t.untyped_storage()._cdata for t in (*net.parameters(), idx, targets)}
    sizes = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage._cdata not in exclude:
            sizes[storage._cdata] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = net(idx, targets)
    del out
    return sum(sizes.values())


@functools.cache
def preset_model(preset: str) -> torch.nn.Module:
    shape = MODEL_PRESETS[preset]
    flags = {"block_size": BLOCK, "n_layer": shape.n_layer, "n_head": shape.n_head, "n_embd": shape.n_embd,
             "dropout": 0.0}
    torch.manual_seed(0)
    return model.build_model(flags, VOCAB, "cpu").train()


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "activation-checkpointing"])
@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_the_activation_estimate_is_within_20_percent_of_what_forward_saves(preset, checkpointing):
    net = preset_model(preset)
    if checkpointing and not hasattr(net.cfg, "activation_checkpointing"):
        pytest.skip("model.py has no activation checkpointing yet")
    net.cfg = dataclasses.replace(net.cfg, activation_checkpointing=checkpointing)  # the same weights either way
    measure = getattr(model, "saved_activation_bytes", saved_bytes_by_hook)
    tokens = torch.randint(VOCAB, (BATCH, BLOCK + 1), generator=torch.Generator().manual_seed(0))
    measured = measure(net, tokens[:, :-1], tokens[:, 1:])
    setup = memory.Setup(MODEL_PRESETS[preset], "fp32", BATCH, BLOCK, "ddp", 1, checkpointing, VOCAB, dropout=0.0)
    estimated = kept_activation_bytes(setup)
    print(f"{preset} checkpointing={checkpointing}: measured {measured:,} B, estimated {estimated:,} B")
    assert abs(estimated - measured) <= 0.2 * measured
    if checkpointing:  # the control: checkpointing really keeps less, and the estimate knows it
        plain = kept_activation_bytes(dataclasses.replace(setup, activation_checkpointing=False))
        assert estimated < plain / 3


def test_the_bf16_estimate_matches_what_an_autocast_forward_saves():
    """Under bf16 autocast (on the CPU here; CUDA's casts are the same) the forward saves bf16 activations beside the
    fp32 residual stream, and autocast's bf16 copies of the weight matrices: the plan's activations + weight copies."""
    net = preset_model("tiny")
    net.cfg = dataclasses.replace(net.cfg, activation_checkpointing=False)
    measure = getattr(model, "saved_activation_bytes", saved_bytes_by_hook)
    tokens = torch.randint(VOCAB, (BATCH, BLOCK + 1), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", torch.bfloat16):
        measured = measure(net, tokens[:, :-1], tokens[:, 1:])
    plan = estimate(MODEL_PRESETS["tiny"], "bf16", BATCH, BLOCK, vocab_size=VOCAB)
    estimated = kept_activation_bytes(plan.setup) + plan.compute_copies
    print(f"tiny bf16: measured {measured:,} B, estimated {estimated:,} B")
    assert abs(estimated - measured) <= 0.2 * measured


def test_weights_gradients_and_adamw_state_are_exact_for_ddp_and_divided_for_fsdp():
    shape = MODEL_PRESETS["tiny"]
    net = preset_model("tiny")
    count = parameter_count(shape, VOCAB, BLOCK)
    assert count == net.num_params()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
    tokens = torch.randint(VOCAB, (1, 9))
    net(tokens[:, :-1], tokens[:, 1:])[1].backward()
    optimizer.step()
    grad_bytes = sum(p.grad.nbytes for p in net.parameters())
    moment_bytes = sum(t.nbytes for state in optimizer.state.values() for k, t in state.items() if k != "step")
    optimizer.zero_grad(set_to_none=True)

    one = estimate(shape, "fp32", BATCH, BLOCK, "ddp", 1, vocab_size=VOCAB)
    assert (one.parameters, one.gradients, one.optimizer) == (count * 4, grad_bytes, moment_bytes)
    assert one.compute_copies == 0  # fp32: no half-precision copies
    ddp = estimate(shape, "bf16", BATCH, BLOCK, "ddp", 4, vocab_size=VOCAB)
    assert (ddp.parameters, ddp.optimizer) == (count * 4, moment_bytes)  # every process holds everything
    assert ddp.gradients == 2 * grad_bytes  # and DDP's buckets copy the gradients
    for n in (2, 4, 8):
        fsdp = estimate(shape, "bf16", BATCH, BLOCK, "fsdp", n, vocab_size=VOCAB)
        shard = -(-count // n)
        assert fsdp.parameters == shard * 4 and fsdp.optimizer == 2 * shard * 4
        # gathered: the root (kept from forward to the end of backward), the running block and the next one
        gathered = (VOCAB + BLOCK + 2) * shape.n_embd + 2 * memory.block_parameters(shape.n_embd)
        assert fsdp.gradients == shard * 4 + gathered * 4  # the shard, and the gathered units' before reduce-scatter
        assert fsdp.compute_copies == gathered * 2  # bf16
        assert fsdp.activations < ddp.activations  # FSDP's bf16 policy keeps the residual stream in bf16 too


def test_muon_s_state_is_what_its_optimizer_holds_and_shown_by_name(tiny_argv):
    """--optimizer muon: one momentum buffer for each block matrix, AdamW's two moments for the rest."""
    shape = MODEL_PRESETS["tiny"]
    net = preset_model("tiny")
    cfg = resolve(parse_args(tiny_argv("--optimizer=muon")), frozenset({"optimizer"}), World()).cfg
    optimizer = build_optimizer(net, cfg)
    tokens = torch.randint(VOCAB, (1, 9))
    net(tokens[:, :-1], tokens[:, 1:])[1].backward()
    optimizer.step()
    moment_bytes = sum(t.nbytes for state in optimizer.state.values() for k, t in state.items() if k != "step")
    muon = estimate(shape, "fp32", BATCH, BLOCK, "ddp", 1, vocab_size=VOCAB, optimizer="muon")
    assert muon.optimizer == moment_bytes < estimate(shape, "fp32", BATCH, BLOCK, vocab_size=VOCAB).optimizer
    assert "Muon+AdamW state" in muon.describe()[0]
    fsdp = estimate(shape, "bf16", BATCH, BLOCK, "fsdp", 2, vocab_size=VOCAB, optimizer="muon")
    assert fsdp.optimizer == pytest.approx(moment_bytes / 2, abs=8)


class PeakLiveBytes(TorchDispatchMode):
    """The peak, over the operations run under it, of the bytes of the storages they made that are still alive (the
    storages of `exclude`, the weights, left out): the memory the code under it allocates at its peak."""

    def __init__(self, exclude: list[torch.Tensor]):
        super().__init__()
        self.exclude = {t.untyped_storage()._cdata for t in exclude}
        self.alive: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for storage in (t.untyped_storage() for t in tree_leaves(out) if isinstance(t, torch.Tensor)):
            if storage._cdata not in self.exclude:
                self.alive[storage._cdata] = (StorageWeakRef(storage), storage.nbytes())
        self.alive = {key: entry for key, entry in self.alive.items() if not entry[0].expired()}
        self.peak = max(self.peak, sum(size for _, size in self.alive.values()))
        return out


@pytest.mark.parametrize("layers, width, heads, window, vocab", [(2, 64, 2, 64, 500), (4, 64, 4, 128, 300),
                                                                 (3, 96, 2, 32, 1000)])
def test_the_sampling_estimate_covers_what_generating_a_full_window_allocates(layers, width, heads, window, vocab):
    """Generating past a full window (the cache at its longest, then the window encoded again), measured as the peak
    of live tensors: the plan's sampling part (fp32, one process: no weight copies) is at least that, and not far
    above."""
    torch.manual_seed(0)
    net = model.GPT.create(model.GPTConfig(vocab, window, layers, heads, width)).eval()
    measured = PeakLiveBytes(exclude=list(net.parameters()))
    with torch.no_grad(), measured:
        net.generate(torch.randint(0, vocab, (1, 5)), window + 10, generator=torch.Generator().manual_seed(1))
    plan = estimate(ModelShape(layers, heads, width), "fp32", 1, window, vocab_size=vocab)
    print(f"generation: measured {measured.peak:,} B, estimated {plan.sampling:,} B")
    assert measured.peak <= plan.sampling <= 1.3 * measured.peak


def test_the_total_is_the_weights_and_adamw_state_with_a_step_or_sampling_whichever_is_larger():
    """Sampling runs between steps, when a step's gradients, activations and logits are gone: it counts only where it
    needs more (a long window, tiny batches, a small vocabulary), and DDP's gradient buckets stay beside it."""
    shape = ModelShape(48, 16, 256)
    for processes, parallel in ((1, "ddp"), (2, "ddp"), (4, "fsdp")):
        small_step = estimate(shape, "fp32", 1, 4096, parallel, processes, True, vocab_size=64)
        assert small_step.sampling > small_step.training_step  # the setup this test is about
        buckets = small_step.gradients // 2 if (processes, parallel) == (2, "ddp") else 0
        assert small_step.total == (small_step.parameters + small_step.optimizer + small_step.overhead + buckets
                                    + small_step.sampling)
        usual = estimate(shape, "fp32", 8, 256, parallel, processes, vocab_size=50257)
        assert usual.total == usual.parameters + usual.optimizer + usual.overhead + usual.training_step
    assert "sampling" in small_step.describe()[0]


def test_the_model_has_no_buffers_the_plan_would_miss():
    """The plan counts parameters, not buffers: a buffer added to the model must be added to the plan too."""
    net = preset_model("tiny")
    assert list(net.buffers()) == []


def flags_plan(flags: str, base: list[str], capacity: int, processes: int):
    """The plan of a command line (`base` plus the suggested `flags`), as a run would build it."""
    cfg = parse_args([*base, *flags.split()])
    return plan_for_flags(cfg, 50257, "bf16", cfg.batch_size, processes, cfg.gradient_accumulation_steps, capacity,
                          "a 24 GiB GPU")


@pytest.mark.parametrize("processes, expected", [
    (4, "--parallel fsdp --activation_checkpointing"),  # neither alone is enough for xl on 24 GiB
    (16, "--parallel fsdp --activation_checkpointing"),
    (1, None),  # one 24 GiB GPU cannot hold xl's weights, gradients and AdamW state: nothing fits
])
def test_a_run_that_does_not_fit_names_the_change_that_does(processes, expected):
    base = [*GPT2_ADAMW, "--model_size=xl", "--block_size=1024", "--batch_size=8", "--gradient_accumulation_steps=2",
            "--bf16"]
    capacity = 24 * GIB
    plan = flags_plan("", base, capacity, processes)
    lines = plan.describe()
    assert not plan.fits and "does NOT fit" in lines[1] and "24.0 GiB on a 24 GiB GPU" in lines[1]
    if expected is None:
        assert "no flag change fits" in lines[2] and "more GPUs" in lines[2]
        return
    flags, suggested = plan.suggestion()
    assert flags == expected and f"memory: {expected} would fit" in lines[2]
    again = flags_plan(flags, base, capacity, processes)  # the suggested flags, parsed as a user would give them
    assert again.total == suggested.total and again.total <= capacity and again.fits


def test_a_smaller_micro_batch_is_suggested_when_it_alone_is_enough():
    base = ["--model_size=small", "--block_size=1024", "--batch_size=64", "--gradient_accumulation_steps=2",
            "--activation_checkpointing", "--bf16"]
    plan = flags_plan("", base, 24 * GIB, 1)
    flags, suggested = plan.suggestion()
    assert flags.startswith("--batch_size ") and suggested.fits
    batch, accumulation = int(flags.split()[1]), int(flags.split()[3])
    assert batch * accumulation == 64 * 2  # the same sequences per optimizer step
    assert flags_plan(flags, base, 24 * GIB, 1).fits


def test_a_run_that_fits_says_so_and_the_cpu_is_not_checked():
    fits = estimate(MODEL_PRESETS["small"], "bf16", 8, 1024, capacity=80 * GIB, device="NVIDIA H100")
    lines = fits.describe()
    assert fits.fits and fits.suggestion() is None and len(lines) == 2
    assert lines[1].endswith("GiB of 80.0 GiB on NVIDIA H100: fits")
    assert "CUDA context and fragmentation 1.0 (assumed)" in lines[0]
    cpu = estimate(MODEL_PRESETS["small"], "fp32", 8, 256).describe()
    assert cpu[1].endswith("on the CPU: not checked") and len(cpu) == 2


def test_dry_run_prints_the_memory_plan(tiny_argv, tmp_path, capsys):
    assert main(tiny_argv("--dry_run", "--activation_checkpointing")) == 0
    out, err = capsys.readouterr()
    described = json.loads(out)  # stdout stays one JSON document
    assert described["memory_estimate_gib"] > 0
    assert "memory per GPU (estimated: fp32, micro-batch" in err and "activation checkpointing" in err
    assert "on the CPU: not checked" in err
    assert not (tmp_path / "out").exists()


def test_the_table_covers_every_preset_and_layout():
    text = memory.tables()
    for preset in MODEL_PRESETS:
        assert text.count(f"| {preset} |") == 2  # without and with activation checkpointing
    assert "FSDP x 8" in text and "(24 GB)" in text
    assert memory.main(["--table"]) == 0


@pytest.mark.parametrize("page", ["docs/memory.md", "docs/zh-CN/memory.md"])
def test_the_documented_tables_are_the_formula_s(page):
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / page).read_text(encoding="utf-8")
    assert memory.table(False) in text and memory.table(True) in text, f"{page} drifted: python -m gpt_trainer.memory"


# ---- --arch llama ---------------------------------------------------------------------------------------------------
@functools.cache
def llama_model(preset: str) -> torch.nn.Module:
    shape = MODEL_PRESETS[preset]
    flags = {"block_size": BLOCK, "n_layer": shape.n_layer, "n_head": shape.n_head, "n_embd": shape.n_embd,
             "dropout": 0.0, "arch": "llama"}
    torch.manual_seed(0)
    return model.build_model(flags, VOCAB, "cpu").train()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "activation-checkpointing"])
@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_the_llama_activation_estimate_is_within_20_percent_of_what_forward_saves(preset, checkpointing, precision):
    net = llama_model(preset)
    net.cfg = dataclasses.replace(net.cfg, activation_checkpointing=checkpointing)
    tokens = torch.randint(VOCAB, (BATCH, BLOCK + 1), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
        measured = model.saved_activation_bytes(net, tokens[:, :-1], tokens[:, 1:])
    plan = estimate(MODEL_PRESETS[preset], precision, BATCH, BLOCK, activation_checkpointing=checkpointing,
                    vocab_size=VOCAB, arch="llama")
    # autocast's weight copies are saved for backward unless the block is recomputed there
    estimated = kept_activation_bytes(plan.setup) + (0 if checkpointing else plan.compute_copies)
    print(f"llama {preset} {precision} checkpointing={checkpointing}: measured {measured:,} B, estimated "
          f"{estimated:,} B")
    assert abs(estimated - measured) <= 0.2 * measured
    gpt2 = kept_activation_bytes(dataclasses.replace(plan.setup, arch="gpt2"))
    assert kept_activation_bytes(plan.setup) != gpt2  # the control: the plan computes llama's block, not gpt2's


def test_llama_weights_gradients_and_adamw_state_are_exact_for_ddp_and_divided_for_fsdp():
    shape, net = MODEL_PRESETS["tiny"], llama_model("tiny")
    count = parameter_count(shape, VOCAB, BLOCK, "llama")
    assert count == net.num_params() and count != parameter_count(shape, VOCAB, BLOCK)
    assert list(net.buffers()) == []  # the rotary tables are made per forward, not buffers the plan would miss
    one = estimate(shape, "fp32", BATCH, BLOCK, vocab_size=VOCAB, arch="llama")
    assert (one.parameters, one.gradients, one.optimizer) == (count * 4, count * 4, 2 * count * 4)
    # under autocast every matrix but the embedding (read by index) is cast once: the untied output layer too
    assert estimate(shape, "bf16", BATCH, BLOCK, vocab_size=VOCAB, arch="llama").compute_copies == \
        2 * (count - VOCAB * shape.n_embd)
    fsdp = estimate(shape, "bf16", BATCH, BLOCK, "fsdp", 4, vocab_size=VOCAB, arch="llama")
    shard = -(-count // 4)
    root = 2 * VOCAB * shape.n_embd + shape.n_embd  # embedding, output layer, final norm
    gathered = root + 2 * memory.block_parameters(shape.n_embd, "llama", shape.n_head)
    assert fsdp.parameters == shard * 4 and fsdp.gradients == shard * 4 + gathered * 4
    assert fsdp.compute_copies == gathered * 2


def test_dry_run_plans_the_llama_it_would_train(tiny_argv, tmp_path, capsys):
    plans = {}
    for arch in ("gpt2", "llama"):
        assert main(tiny_argv("--dry_run", f"--arch={arch}", "--model_size=small", "--n_layer=12", "--n_head=12",
                              "--n_embd=768", "--block_size=256", "--batch_size=16")) == 0
        plans[arch] = json.loads(capsys.readouterr().out)
    assert plans["llama"]["arch"] == "llama"
    assert plans["llama"]["memory_estimate_gib"] != plans["gpt2"]["memory_estimate_gib"]
    assert not (tmp_path / "out").exists()
