"""The memory plan: an estimate, before anything is allocated, of the bytes one GPU needs at its peak - the weights,
their gradients, AdamW's state, what the forward pass keeps for the backward pass, the logits of the loss, sampling text
between steps, and a fixed allowance for the CUDA context - and, when that is more than the GPU holds, the change of
flags that fits.

The activation formula follows gpt_trainer/model/gpt.py operation by operation (tests/test_memory.py compares it with
the bytes a real forward pass saves). Per token and block, with C the width, H the heads, a the bytes of an activation
(2 under bf16/fp16 autocast, 4 in fp32) and r = 4 (the residual stream stays fp32 under autocast):
  ln_1 and ln_2 keep their inputs (2 x r x C) and their mean and 1/std (4 x 4 bytes); the qkv, proj, fc and MLP proj
  Linears keep their inputs (ln_1's output C, the attention output C, ln_2's output C, the GELU output 4C, x a);
  attention keeps q, k, v (the qkv output, 3C x a), its output (C x a: the proj input shares it) and the log-sum-exp
  (H x 4 bytes) - the fused kernels never store the T x T attention matrix -; GELU keeps its input (4C x a); each
  dropout with p > 0 keeps a one-byte mask (2 per block, one after the embeddings). Together 2rC + 14aC + 16 + 4H
  bytes (+ 2C with dropout): 64C + 4H + 16 in fp32, 36C + 4H + 16 in bf16 (32C + ... under FSDP's bf16 policy, where
  the residual stream is bf16 too: r = 2).
--arch llama's block, with h the SwiGLU width (8/3 C rounded up) and n = 4 where the norms normalise an fp32 copy of a
narrower input (n = 0 where the input is fp32 already): the RMSNorms ln_1 and ln_2 keep their inputs (2 x r x C), the
normalised values the gain multiplies (2 x r x C) and 1/rms (2 x 4 bytes); QK-norm keeps the same of q and k over each
head (2 x a x C, 2H x 4 bytes, and their fp32 copies 2 x n x C); qkv keeps its input (a x C) and its output (3C x a:
v is a view of it); attention keeps the rotated q and k (2 x a x C), its output (C x a) and the log-sum-exp (H x 4);
the MLP keeps ln_2's output once per Linear that reads it (a x C, twice under autocast, which casts it for each), and
the gate's output, the SiLU's, the up projection's and their product (4h x a). Rotary positions add one cos and one sin
table per forward (T x head_dim x 4 bytes each, shared by every block).
Outside the blocks: the token ids (8 bytes), ln_f's input and output, and the fp32 log-probabilities the loss keeps
(4V bytes per token, V the vocabulary: often the largest single tensor). While the loss is back-propagated two more
fp32 B x T x V tensors exist (the gradients of the log-probabilities and of the logits), and the caller holds the
logits: the "logits" line of the plan adds those.
With activation checkpointing each block keeps only its input (r x C per token); during the backward pass one block is
recomputed at a time, so one block's full set is added back once.

Under FSDP the root unit (the token and position embeddings, the tied output layer, the final norm) stays gathered from
the forward pass to the end of the backward pass, beside the block that runs and the next one being gathered; their
gradients exist whole until they are reduce-scattered. Sampling (at evaluations and at the end) runs between optimizer
steps, when the step's gradients, activations and logits are freed: one sequence with a key/value cache of up to
block_size positions in every block, plus the weights its forward gathers (FSDP) or casts (autocast). The plan counts
the larger of a step and sampling. The model has no buffers (tests/test_memory.py checks), and saving a checkpoint
adds nothing on the GPU: each FSDP process writes its own shards (torch.distributed.checkpoint), and torch.save copies
each tensor to the host as it writes.

An estimate, not a measurement: the CUDA context and the caching allocator's fragmentation are an assumed fixed
OVERHEAD_BYTES, compiled steps usually need less than this, and temporary buffers of single kernels are left out."""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass

import torch

from ..config import (ARCHITECTURES, DEFAULT_ARCH, DEFAULT_OPTIMIZER, MODEL_PRESETS, OPTIMIZERS, ModelShape,
                      TrainConfig)
from ..model.gpt import swiglu_hidden
from ..system.hardware import MEMORY_MARGIN, device_name, usable_gpu_memory

GIB = 2**30
OVERHEAD_BYTES = GIB  # ASSUMED: the CUDA context (~0.3-0.6 GiB) plus the caching allocator's fragmentation
FP32 = 4
RESIDUAL_BYTES = FP32  # the residual stream (embeddings + block outputs) stays fp32 under autocast
MASK_BYTES = 1  # a dropout mask on a GPU is bool


@dataclass(frozen=True)
class Setup:
    """What an estimate depends on: the model's shape and the flags that change memory."""
    shape: ModelShape
    precision: str  # fp32, bf16 or fp16
    micro_batch: int
    block_size: int
    parallel: str  # ddp or fsdp
    processes: int
    activation_checkpointing: bool
    vocab_size: int
    dropout: float = 0.0
    accumulation: int = 1  # micro-batches per optimizer step: memory does not depend on it, suggestions keep it
    arch: str = "gpt2"  # --arch
    optimizer: str = "adamw"  # --optimizer: muon keeps one moment for the block matrices instead of two

    @property
    def sharded(self) -> bool:
        return self.parallel == "fsdp" and self.processes > 1

    @property
    def activation_bytes(self) -> int:
        return FP32 if self.precision == "fp32" else 2

    @property
    def residual_bytes(self) -> int:
        """fp32 under autocast (DDP, one process); under FSDP's bf16 policy every module computes in bf16."""
        return self.activation_bytes if self.sharded else RESIDUAL_BYTES


def parameter_count(shape: ModelShape, vocab_size: int, block_size: int, arch: str = "gpt2") -> int:
    """The parameters of gpt_trainer.model.gpt.GPT: gpt2's output projection is tied to the token embedding and it
    has a position table; llama has an output projection of its own and no position table."""
    C, blocks = shape.n_embd, shape.n_layer * block_parameters(shape.n_embd, arch, shape.n_head)
    if arch == "llama":
        return 2 * vocab_size * C + blocks + C
    return vocab_size * C + block_size * C + blocks + 2 * C


def block_parameters(C: int, arch: str = "gpt2", n_head: int = 1) -> int:
    """One block. gpt2: two LayerNorms (2C each), qkv (3C x C + 3C), proj (C x C + C), fc (4C x C + 4C), proj
    (4C x C + C). llama: two RMSNorms (C each), qkv (3C x C), the q and k norms (C / n_head each), proj (C x C), and
    SwiGLU's gate, up and down (3 x C x h)."""
    if arch == "llama":
        return 4 * C * C + 3 * C * swiglu_hidden(C) + 2 * C + 2 * (C // n_head)
    return 12 * C * C + 13 * C


def block_matrix_parameters(C: int, arch: str = "gpt2") -> int:
    """One block's 2-D weights, Muon's, each with one momentum buffer instead of two moments. gpt2: qkv, proj, fc,
    proj; llama: qkv, proj, gate, up, down."""
    return 4 * C * C + 3 * C * swiglu_hidden(C) if arch == "llama" else 12 * C * C


def block_activation_bytes(s: Setup) -> int:
    """What one block's forward keeps for its backward, per micro-batch (the formulas in the module's docstring)."""
    C, H, a, r = s.shape.n_embd, s.shape.n_head, s.activation_bytes, s.residual_bytes
    if s.arch == "llama":
        copies = 2 * FP32 * C * (a != FP32) + 2 * FP32 * C * (r != FP32)  # norms' fp32 copies of narrower inputs
        ln_2_out = a * C * (1 if a == FP32 else 2)  # cast once for the gate and once for the up projection
        per_token = (4 * r * C + 2 * a * C + 2 * FP32 + 3 * H * FP32 + copies + 7 * a * C + ln_2_out
                     + 4 * a * swiglu_hidden(C))
    else:
        per_token = 2 * r * C + 14 * a * C + 2 * 2 * FP32 + H * FP32
    if s.dropout > 0:
        per_token += 2 * MASK_BYTES * C
    return s.micro_batch * s.block_size * per_token


def kept_activation_bytes(s: Setup) -> int:
    """What the whole forward keeps for the backward (the log-probabilities of the loss included): the number
    tests/test_memory.py compares with the bytes a real forward saves. With activation checkpointing, only each
    block's input is kept (the recomputed block is added by `estimate`)."""
    C, tokens = s.shape.n_embd, s.micro_batch * s.block_size
    mask = tokens * MASK_BYTES * C if s.dropout > 0 else 0
    logprobs = FP32 * s.vocab_size + 8
    if s.arch == "llama":  # the rotary tables; ln_f keeps its input, the normalised values and 1/rms
        embeddings = tokens * 8 + 2 * s.block_size * (C // s.shape.n_head) * FP32 + mask
        head = tokens * (2 * s.residual_bytes * C + FP32 + s.activation_bytes * C + logprobs)
    else:  # ids, positions; ln_f keeps its input, mean and 1/std
        embeddings = tokens * 8 + s.block_size * 8 + mask
        head = tokens * (s.residual_bytes * C + 2 * FP32 + s.activation_bytes * C + logprobs)
    if s.activation_checkpointing:
        blocks = s.shape.n_layer * tokens * s.residual_bytes * C
    else:
        blocks = s.shape.n_layer * block_activation_bytes(s)
    return embeddings + blocks + head


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per GPU, by part. `capacity`: the GPU's memory (None on the CPU: not checked)."""
    setup: Setup
    parameters: int  # fp32 master weights (this process's shard under FSDP)
    compute_copies: int  # bf16/fp16 copies of the weights: autocast's cache (DDP) or the gathered FSDP units
    gradients: int  # fp32 (under DDP with several processes: and the copy in DDP's buckets)
    optimizer: int  # AdamW: two fp32 moments per parameter; Muon: one for each block matrix
    activations: int  # kept by the forward for the backward (+ one recomputed block with checkpointing)
    logits: int  # the logits held by the caller and the two fp32 gradients of the loss's backward
    sampling: int  # generating text between steps: the key/value cache and the weights gathered or cast for it
    overhead: int = OVERHEAD_BYTES
    capacity: int | None = None
    device: str = "the CPU"

    @property
    def training_step(self) -> int:
        """What a training step adds to the weights and AdamW's state."""
        return self.compute_copies + self.gradients + self.activations + self.logits

    @property
    def between_steps(self) -> int:
        """What sampling adds, with DDP's gradient buckets (allocated once, half of `gradients`) still there."""
        s = self.setup
        buckets = self.gradients // 2 if s.processes > 1 and not s.sharded else 0
        return buckets + self.sampling

    @property
    def total(self) -> int:
        return self.parameters + self.optimizer + self.overhead + max(self.training_step, self.between_steps)

    @property
    def fits(self) -> bool:
        return self.capacity is None or self.total <= self.capacity

    def with_setup(self, **changes) -> MemoryPlan:
        """The same GPU with some flags changed."""
        return estimate(**{**dataclasses.asdict(self.setup), "shape": self.setup.shape, **changes},
                        capacity=self.capacity, device=self.device)

    def suggestion(self) -> tuple[str, MemoryPlan] | None:
        """The first change of flags whose estimate fits, tried in this order: --parallel fsdp (several processes),
        --activation_checkpointing, a smaller micro-batch (halved until it fits; the accumulation doubled so the batch
        per step stays), then the combinations of those. (flags, the plan with them), or None when the plan fits or
        nothing does."""
        if self.fits:
            return None
        s = self.setup
        changes: list[tuple[str, dict]] = []
        if s.processes > 1 and s.parallel != "fsdp":
            changes.append(("--parallel fsdp", {"parallel": "fsdp"}))
        if not s.activation_checkpointing:
            changes.append(("--activation_checkpointing", {"activation_checkpointing": True}))
        tried = [([flag], change) for flag, change in changes]
        if len(changes) == 2:
            tried.append(([changes[0][0], changes[1][0]], {**changes[0][1], **changes[1][1]}))
        for flags, change in [([], {}), *tried]:  # a smaller micro-batch alone, then with each of the above
            batch, factor = s.micro_batch // 2, 2
            while batch >= 1:
                tried.append(([*flags, f"--batch_size {batch} --gradient_accumulation_steps {s.accumulation * factor}"],
                              {**change, "micro_batch": batch}))
                batch, factor = batch // 2, factor * 2
        for flags, change in tried:
            plan = self.with_setup(**change)
            if plan.fits:
                return " ".join(flags), plan
        return None

    def describe(self) -> list[str]:
        """Two lines (three when it does not fit): the parts, the total against the GPU, and what fits instead."""
        s = self.setup
        where = f"{s.parallel}, {s.processes} process{'es' if s.processes > 1 else ''}"
        if s.activation_checkpointing:
            where += ", activation checkpointing"
        copies = f", {gib(self.compute_copies)} {s.precision} copies" if self.compute_copies else ""
        lines = [f"memory per GPU (estimated: {s.precision}, micro-batch {s.micro_batch} x block {s.block_size}, "
                 f"{where}): weights {gib(self.parameters)} GiB fp32{copies}, gradients {gib(self.gradients)}, "
                 f"{OPTIMIZER_NAMES[s.optimizer]} state {gib(self.optimizer)}, activations {gib(self.activations)}, "
                 f"logits {gib(self.logits)}, sampling {gib(self.sampling)} (between steps: the larger of it and a "
                 f"step counts), CUDA context and fragmentation {gib(self.overhead)} (assumed)"]
        if self.capacity is None:
            lines.append(f"memory total {gib(self.total)} GiB (what one GPU would need); on {self.device}: not checked")
            return lines
        verdict = "fits" if self.fits else "does NOT fit"
        lines.append(f"memory total {gib(self.total)} GiB of {gib(self.capacity)} GiB on {self.device}: {verdict}")
        if not self.fits:
            found = self.suggestion()
            if found:
                flags, plan = found
                lines.append(f"memory: {flags} would fit (estimated {gib(plan.total)} GiB)")
            else:
                lines.append("memory: no flag change fits on this GPU, even with --parallel fsdp, "
                             "--activation_checkpointing and micro-batch 1: use more GPUs (fsdp shards across them) "
                             "or a smaller --model_size / --block_size")
        return lines


def gib(n: int) -> str:
    return f"{n / GIB:.1f}"


OPTIMIZER_NAMES = {"adamw": "AdamW", "muon": "Muon+AdamW"}


def estimate(shape: ModelShape, precision: str, micro_batch: int, block_size: int, parallel: str = "ddp",
             processes: int = 1, activation_checkpointing: bool = False, vocab_size: int = 50257,
             dropout: float = 0.0, capacity: int | None = None, device: str = "the CPU",
             accumulation: int = 1, arch: str = "gpt2", optimizer: str = "adamw") -> MemoryPlan:
    """Bytes per GPU of one training step (forward, backward, AdamW step) of gpt_trainer.model.GPT.

    DDP (and one process): every process holds all weights, gradients and optimizer state, and with several processes
    DDP's gradient buckets are a second copy of the gradients. FSDP with N processes: weights, gradients and optimizer
    state divided by N, plus the gathered units (gathered_parameters) whole: their weights in the compute precision
    and their fp32 gradients before they are reduce-scattered. bf16/fp16 under DDP: autocast caches a half-precision
    copy of every weight matrix during the step (and again during each token's forward when sampling)."""
    s = Setup(shape, precision, micro_batch, block_size, parallel, processes, activation_checkpointing, vocab_size,
              dropout, accumulation, arch, optimizer)
    C = shape.n_embd
    count = parameter_count(shape, vocab_size, block_size, arch)
    one_moment = shape.n_layer * block_matrix_parameters(C, arch) if optimizer == "muon" else 0  # Muon's momentum alone
    half = precision != "fp32"
    if s.sharded:
        shard = math.ceil(count / processes)
        parameters = shard * FP32
        compute_copies = gathered_parameters(s) * s.activation_bytes
        gradients = shard * FP32 + gathered_parameters(s) * FP32
        optimizer_bytes = (2 * shard - math.ceil(one_moment / processes)) * FP32
    else:
        parameters = count * FP32
        looked_up = vocab_size * C if arch == "llama" else block_size * C  # tables read by index, never cast
        compute_copies = 2 * (count - looked_up) if half else 0  # every other matrix
        gradients = count * FP32 * (2 if processes > 1 else 1)
        optimizer_bytes = (2 * count - one_moment) * FP32
    activations = kept_activation_bytes(s)
    if activation_checkpointing:
        activations += block_activation_bytes(s)  # the block being recomputed in the backward pass
    tokens = micro_batch * block_size
    logits = tokens * vocab_size * (s.activation_bytes + 2 * FP32)
    sampling = generation_bytes(s) + compute_copies  # the same weights gathered (FSDP) or cast (autocast) again
    return MemoryPlan(s, parameters, compute_copies, gradients, optimizer_bytes, activations, logits, sampling,
                      OVERHEAD_BYTES, capacity, device)


def gathered_parameters(s: Setup) -> int:
    """The parameters FSDP holds whole at its peak, in the backward pass: the root unit (token and position
    embeddings, the tied output layer, the final norm: FSDP keeps it gathered from the forward to the end of the
    backward), the block running and the next one being gathered."""
    C = s.shape.n_embd
    root = parameter_count(s.shape, s.vocab_size, s.block_size, s.arch) - s.shape.n_layer * block_parameters(
        C, s.arch, s.shape.n_head)
    return root + 2 * block_parameters(C, s.arch, s.shape.n_head)


def generation_bytes(s: Setup) -> int:
    """Tensors of generating one sequence (micro-batch 1) with a full window of block_size positions, the weights
    aside: every block's key/value cache, which after a forward over the window views the block's whole qkv output (3C
    wide), and one block's keys and values twice while torch.cat makes their longer copies; the widest tensors of one
    block's forward over the window (the MLP's two 4C-wide ones, its input, the residual stream twice); and the last
    position's logits with the few fp32 copies sampling makes of them."""
    C, window, a = s.shape.n_embd, s.block_size, s.activation_bytes
    if s.arch == "llama":  # the cache keeps the rotated keys (C) and the qkv output v views (3C); SwiGLU's 3 h-wide
        cache = (4 * s.shape.n_layer + 2) * window * C * a
        widest = window * (3 * swiglu_hidden(C) * a + C * (a + 2 * s.residual_bytes))
    else:
        cache = (3 * s.shape.n_layer + 2) * window * C * a
        widest = window * C * (9 * a + 2 * s.residual_bytes)
    return cache + widest + s.vocab_size * (a + 4 * FP32)


def device_memory(device: torch.device) -> tuple[int | None, str]:
    """(the memory the run may use, what that is) when the run is on a GPU: hardware.usable_gpu_memory, the figure
    --batch_size auto searches in too, so the plan and the search agree; (None, "the CPU") otherwise."""
    if device.type != "cuda":
        return None, device_name(device)
    return usable_gpu_memory(device), f"{device_name(device)} (its free memory less {MEMORY_MARGIN:.0%})"


def plan_for_flags(cfg: TrainConfig, vocab_size: int, precision: str, micro_batch: int, processes: int,
                   accumulation: int = 1, capacity: int | None = None, device: str = "the CPU") -> MemoryPlan:
    """The memory plan of a run's flags."""
    return estimate(ModelShape(cfg.n_layer, cfg.n_head, cfg.n_embd), precision, micro_batch, cfg.block_size,
                    cfg.parallel, processes, cfg.activation_checkpointing, vocab_size, cfg.dropout, capacity, device,
                    accumulation, cfg.arch, cfg.optimizer)


def plan_for_run(cfg: TrainConfig, vocab_size: int, device: torch.device, precision: str, micro_batch: int,
                 processes: int, accumulation: int = 1) -> MemoryPlan:
    """The memory plan of a run's flags, against the memory of `device` when it is a GPU."""
    capacity, name = device_memory(device)
    return plan_for_flags(cfg, vocab_size, precision, micro_batch, processes, accumulation, capacity, name)


# ---- the table in docs/memory.md -----------------------------------------------------------------------------------
TABLE_GPUS_GB = (24, 48, 80, 141)  # GPU memory as vendors state it; compared as 10^9 bytes (cards report a bit more)
TABLE_VOCAB = 50257  # GPT-2's tokenizer
TABLE_BLOCK = 1024
TABLE_MICRO_BATCH = 8
TABLE_DROPOUT = 0.1  # the --dropout default
TABLE_LAYOUTS = (("1 GPU", "ddp", 1), ("DDP", "ddp", 8), ("FSDP x 2", "fsdp", 2), ("FSDP x 4", "fsdp", 4),
                 ("FSDP x 8", "fsdp", 8))  # DDP: the same on any number of GPUs above one


def table(activation_checkpointing: bool, micro_batch: int = TABLE_MICRO_BATCH, block_size: int = TABLE_BLOCK,
          vocab_size: int = TABLE_VOCAB, precision: str = "bf16", arch: str = DEFAULT_ARCH,
          optimizer: str = DEFAULT_OPTIMIZER) -> str:
    """A Markdown table of docs/memory.md: per preset and layout, the estimated GiB per GPU and the smallest of
    TABLE_GPUS_GB it fits on (for the default recipe unless told another)."""
    rows = [f"| preset | {' | '.join(name for name, _, _ in TABLE_LAYOUTS)} |",
            f"| --- |{' --- |' * len(TABLE_LAYOUTS)}"]
    for preset, shape in MODEL_PRESETS.items():
        cells = []
        for _, parallel, processes in TABLE_LAYOUTS:
            total = estimate(shape, precision, micro_batch, block_size, parallel, processes, activation_checkpointing,
                             vocab_size, TABLE_DROPOUT, arch=arch, optimizer=optimizer).total
            smallest = next((f"{gb} GB" for gb in TABLE_GPUS_GB if total <= gb * 10**9), "none")
            cells.append(f"{gib(total)} ({smallest})")
        rows.append(f"| {preset} | {' | '.join(cells)} |")
    return "\n".join(rows)


def tables(micro_batch: int = TABLE_MICRO_BATCH, block_size: int = TABLE_BLOCK, vocab_size: int = TABLE_VOCAB,
           arch: str = DEFAULT_ARCH, optimizer: str = DEFAULT_OPTIMIZER) -> str:
    """Both tables of docs/memory.md, without and with activation checkpointing, as the page shows them."""
    return "\n\n".join(f"{title}:\n\n"
                       f"{table(checkpointing, micro_batch, block_size, vocab_size, arch=arch, optimizer=optimizer)}"
                       for title, checkpointing in (("Without activation checkpointing", False),
                                                    ("With --activation_checkpointing", True)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gpt_trainer.memory",
        description="Print the estimated memory tables of docs/memory.md (GiB per GPU, bf16, and the smallest of "
                    "24/48/80/141 GB GPUs each fits on).")
    parser.add_argument("--table", action="store_true", help="the tables for every preset (the default)")
    parser.add_argument("--micro_batch", type=int, default=TABLE_MICRO_BATCH)
    parser.add_argument("--block_size", type=int, default=TABLE_BLOCK)
    parser.add_argument("--vocab_size", type=int, default=TABLE_VOCAB)
    parser.add_argument("--arch", choices=ARCHITECTURES, default=DEFAULT_ARCH)
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default=DEFAULT_OPTIMIZER)
    args = parser.parse_args(argv)
    print(tables(args.micro_batch, args.block_size, args.vocab_size, args.arch, args.optimizer))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
