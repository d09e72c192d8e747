"""A GPT in one file, of two architectures (--arch): gpt2 (pre-LayerNorm blocks, learned positions, GELU MLP, biases,
tied embeddings, GPT-2's initialisation) and llama (Qwen3's layout: pre-RMSNorm blocks, rotary positions, RMSNorm on
each head's queries and keys, SwiGLU MLP, no biases, an output layer of its own, zero-initialised residual
projections). Both use fused scaled-dot-product attention and generate with a key/value cache; `ARCHS` holds the few
parts in which they differ, and every caller builds the model through one factory.

Every model is built on the meta device (no memory) and then materialised: its tensors allocated where it runs and
initialised one whole tensor at a time on the CPU (`GPT.init_weights`), so a process sharding it with FSDP never holds
more than one tensor of the whole model, and a seed gives the same weights however the model is spread."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.utils.checkpoint import checkpoint

from ..config import EARLIER_ARCH
from ..errors import notice
from ..system.hardware import autocast


@dataclass
class GPTConfig:
    vocab_size: int
    block_size: int = 256
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.0
    activation_checkpointing: bool = False  # recompute each block's activations in backward (training only)
    arch: str = "gpt2"  # a key of ARCHS

    @classmethod
    def from_flags(cls, flags: Mapping, vocab_size: int) -> GPTConfig:
        """The shape a run's flags describe: a TrainConfig's `to_dict()` or the `config` a checkpoint holds (one
        written before --arch existed is a gpt2)."""
        return cls(vocab_size, flags["block_size"], flags["n_layer"], flags["n_head"], flags["n_embd"],
                   flags.get("dropout", 0.0), bool(flags.get("activation_checkpointing", False)),
                   flags.get("arch") or EARLIER_ARCH)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def mlp_hidden(self) -> int:
        return ARCHS[self.arch].mlp_hidden(self.n_embd)


def build_model(flags: Mapping, vocab_size: int, device: torch.device | str) -> GPT:
    """The GPT of a run (the --batch_size auto search and sampling build it here), initialised, on `device`."""
    return GPT.create(GPTConfig.from_flags(flags, vocab_size), device)


def empty_model(flags: Mapping, vocab_size: int) -> GPT:
    """The GPT of a run on the meta device: its shape without memory, to be sharded and then materialised (the
    trainer's way, through train/parallelize.py)."""
    with torch.device("meta"):
        return GPT(GPTConfig.from_flags(flags, vocab_size))


class KVCache:
    """One block's keys and values of the positions generated so far. An object of its own rather than a list: FSDP
    rebuilds the lists and tuples among a forward's inputs (moving them to the GPU, casting them to bf16), and what a
    block appended to a rebuilt list would be lost."""

    def __init__(self):
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None


RMS_EPSILON = 1e-6  # llama's RMSNorm epsilon, Qwen3's
ROPE_BASE = 10000.0  # the rotary embedding's base (rope_theta)


class RMSNorm(nn.Module):
    """Root-mean-square normalisation with a learnable gain, normalised in float32 and cast back before the gain, as
    transformers' Qwen3RMSNorm computes it (an exported model gives our logits)."""

    def __init__(self, dim: int, eps: float = RMS_EPSILON):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * F.rms_norm(x.float(), (x.size(-1),), eps=self.eps).to(x.dtype)


def rotary(start: int, length: int, head_dim: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (length, head_dim) of the rotary angles of positions start.. start+length-1, computed in float32,
    each frequency repeated over both halves of a head: the half-split ("rotate_half", NEOX) layout that transformers'
    Qwen3 and llama.cpp use, so exported q and k weights need no permutation."""
    inv_freq = 1.0 / ROPE_BASE ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.arange(start, start + length, device=device, dtype=torch.float32)[:, None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Each pair (i, i + head_dim/2) of a head's dimensions turned by its position's angle."""
    half = x.size(-1) // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        arch = ARCHS[cfg.arch]
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=arch.bias)
        self.q_norm, self.k_norm = arch.qk_norm(cfg.head_dim), arch.qk_norm(cfg.head_dim)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=arch.bias)
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, rope: tuple | None = None, cache: KVCache | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head) for t in self.qkv(x).split(C, dim=2))
        q, k, v = self.q_norm(q).transpose(1, 2), self.k_norm(k).transpose(1, 2), v.transpose(1, 2)
        if rope is not None:  # before caching: the cache holds keys already turned to their absolute positions
            q, k = rotate(q, *rope), rotate(k, *rope)
        if cache is not None:  # generation: append this step's keys/values to those of earlier positions
            if cache.keys is not None:
                k = torch.cat([cache.keys, k], dim=2)
                v = torch.cat([cache.values, v], dim=2)
            cache.keys, cache.values = k, v
        # A single new query attends to every cached position, so causal masking is only needed for T > 1.
        is_causal = T > 1
        if is_causal and k.size(2) != T:
            raise ValueError("a multi-token forward with a non-empty cache is not supported")
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=is_causal
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.proj(y))


class MLP(nn.Module):
    """GPT-2's: 4 x the width, tanh GELU."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, cfg.mlp_hidden)
        self.proj = nn.Linear(cfg.mlp_hidden, cfg.n_embd)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x), approximate="tanh")))


class SwiGLU(nn.Module):
    """llama's: a SiLU-gated product of two projections, then the projection back (Shazeer 2020)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.gate = nn.Linear(cfg.n_embd, cfg.mlp_hidden, bias=False)
        self.up = nn.Linear(cfg.n_embd, cfg.mlp_hidden, bias=False)
        self.proj = nn.Linear(cfg.mlp_hidden, cfg.n_embd, bias=False)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.silu(self.gate(x)) * self.up(x)))


def swiglu_hidden(width: int) -> int:
    """SwiGLU's hidden width: 8/3 of the model's, so that its three matrices hold about what GELU's two of 4 x the
    width do, rounded up to a multiple of 8 for the GPU's matrix units (344 for 128, 1024 for 384, 2048 for 768)."""
    return -(-8 * width // 24) * 8


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        arch = ARCHS[cfg.arch]
        self.ln_1 = arch.norm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = arch.norm(cfg.n_embd)
        self.mlp = arch.mlp(cfg)

    def forward(self, x: torch.Tensor, rope: tuple | None = None, cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), rope, cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        """The modules, on the default device, with torch's default weights: `GPT.create` (and `build_model`) make a
        model to use, built on the meta device and materialised with its architecture's initialisation."""
        super().__init__()
        self.cfg = cfg
        arch = ARCHS[cfg.arch]
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        # positions: learned vectors added to the tokens', or (None) rotary angles applied inside attention
        self.wpe = None if arch.rotary else nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = arch.norm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.tie()

    def tie(self) -> None:
        if ARCHS[self.cfg.arch].tied:
            self.lm_head.weight = self.wte.weight  # the output projection is the embedding matrix

    @classmethod
    def create(cls, cfg: GPTConfig, device: torch.device | str = "cpu") -> GPT:
        """A GPT with GPT-2's initial weights on `device`, drawn from the CPU generator (seed it first)."""
        with torch.device("meta"):
            model = cls(cfg)
        model.materialise(device)
        return model

    def materialise(self, device: torch.device | str) -> None:
        """Give a model built on the meta device its memory on `device` (under FSDP: this process's slices only; shard
        it first) and its initial weights (init_weights)."""
        self.to_empty(device=device)
        self.tie()  # to_empty gave the unsharded tied output layer a tensor of its own
        self.init_weights()

    def init_weights(self) -> None:
        """The architecture's initial weights, drawn on the CPU one whole tensor at a time (a sharded parameter keeps
        its own slice of each), so a seed gives the same weights however the model is spread."""
        ARCHS[self.cfg.arch].init(self)

    @torch.no_grad()
    def init_gpt2(self) -> None:
        """GPT-2's initialisation, drawn on the CPU one whole tensor at a time, in the order that constructing the
        model on the CPU and initialising it drew them, so that a seed gives the weights, and leaves the random state,
        it always gave: first each module's own reset_parameters, in construction order (the LayerNorms' ones and
        zeros come from here; the tied output layer draws a matrix that is never kept), then N(0, 0.02) for every
        Linear and Embedding weight and zeros for the Linear biases (the output layer draws the shared embedding a
        second time, and keeps it), then the residual projections again, with std 0.02 / sqrt(2 * n_layer) (GPT-2:
        so the residual stream does not grow with depth). A sharded parameter keeps its own slice of each tensor."""
        with torch.device("meta"):
            shapes = GPT(self.cfg)  # the unsharded shapes, and modules whose constructors' draws are replayed
        for name, module in shapes.named_modules():
            if hasattr(module, "reset_parameters"):
                drawn = copy.deepcopy(module).to_empty(device="cpu")
                drawn.reset_parameters()
                for key, value in drawn.named_parameters(recurse=False):
                    keep_whole(self.get_parameter(f"{name}.{key}"), value.detach())
        for name, module in shapes.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                keep_whole(self.get_parameter(f"{name}.weight"), drawn_normal(module.weight, 0.02))
            if isinstance(module, nn.Linear) and module.bias is not None:
                keep_whole(self.get_parameter(f"{name}.bias"), torch.zeros(module.bias.shape, device="cpu"))
        for name, p in shapes.named_parameters():
            if name.endswith("proj.weight"):
                keep_whole(self.get_parameter(name), drawn_normal(p, 0.02 / math.sqrt(2 * self.cfg.n_layer)))

    @torch.no_grad()
    def init_llama(self) -> None:
        """llama's initialisation, modded-nanogpt's and nanochat's: every matrix N(0, 0.02) (the embedding, qkv, the
        MLP's gate and up, the output layer), drawn in the order of the parameters; the norms' gains 1; the residual
        projections (attention's and the MLP's output) zero, so that each block starts as the identity and the
        residual stream does not grow with depth."""
        with torch.device("meta"):
            shapes = GPT(self.cfg)
        for name, p in shapes.named_parameters():
            if p.dim() == 1:
                whole = torch.ones(p.shape, device="cpu")
            elif name.endswith("proj.weight"):
                whole = torch.zeros(p.shape, device="cpu")
            else:
                whole = drawn_normal(p, 0.02)
            keep_whole(self.get_parameter(name), whole)

    @torch.no_grad()
    def load_whole(self, state: Mapping[str, torch.Tensor]) -> None:
        """Whole tensors by name (every key of an unsharded model's state_dict, with its shape) into this model; a
        sharded parameter keeps its own slice of each, so --init_from's weights start a sharded run too."""
        own = self.state_dict(keep_vars=True)
        if set(own) != set(state) or any(tuple(state[k].shape) != tuple(p.shape) for k, p in own.items()):
            raise ValueError("the weights do not have this model's names and shapes")  # the caller checked them
        for key, param in own.items():
            keep_whole(param, state[key])

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # tied weights are counted once

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, caches: list[KVCache] | None = None,
                start: int = 0):
        T = idx.size(1)
        x, rope = self.wte(idx), None
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(start, start + T, device=idx.device))
        else:  # the angles of positions start.., computed once for every block
            rope = rotary(start, T, self.cfg.head_dim, idx.device)
        x = self.drop(x)
        # Activation checkpointing keeps only each block's input for backward and recomputes the block there. The
        # non-reentrant form restores the RNG state, so dropout draws the same masks and gradients are unchanged; the
        # blocks stay unwrapped, so state_dict keys (and FSDP2's per-block sharding) are the same either way.
        recompute = (self.cfg.activation_checkpointing and self.training and caches is None
                     and torch.is_grad_enabled())
        for i, block in enumerate(self.blocks):
            if recompute:
                x = checkpoint(block, x, rope, use_reentrant=False)
            else:
                x = block(x, rope, None if caches is None else caches[i])
        x = self.ln_f(x)
        if targets is None:
            return self.lm_head(x[:, -1:, :]), None  # generation needs only the last position
        logits = self.lm_head(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1))
        return logits, loss

    def optimizer_groups(self, weight_decay: float) -> list[dict]:
        """Decay matrices only: biases, norm gains and embeddings stay undecayed (llama's own output layer is a matrix
        like the others; gpt2's is the embedding)."""
        embeddings = {id(module.weight) for module in (self.wte, self.wpe) if module is not None}
        decay, no_decay = [], []
        for p in self.parameters():
            (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def block_matrices(self) -> list[nn.Parameter]:
        """The 2-D weights inside the transformer blocks (the parameters --optimizer muon gives Muon)."""
        return [p for p in self.blocks.parameters() if p.dim() == 2]

    def flops_per_token(self) -> float:
        """Training FLOPs per token: 6 per weight (forward + backward) plus attention scores (PaLM appendix B). An
        embedding that is only looked up multiplies nothing: llama's token embedding is left out (gpt2's is the output
        layer too; its small position table stays counted, as the numbers measured before --arch counted it)."""
        c = self.cfg
        looked_up = 0 if ARCHS[c.arch].tied else self.wte.weight.numel()
        return 6 * (self.num_params() - looked_up) + 12 * c.n_layer * c.n_embd * c.block_size

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, generator: torch.Generator | None = None):
        """Sample continuations of `idx` (B, T): its last block_size tokens and the new ones, as one tensor."""
        new = list(self.stream(idx, max_new_tokens, temperature, top_k, top_p, generator))
        return torch.cat([idx[:, -self.cfg.block_size:], *new], dim=1)

    @torch.no_grad()
    def stream(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
               top_p: float = 1.0, generator: torch.Generator | None = None):
        """Yield each new token (B, 1) of a continuation of `idx` (B, T) as it is drawn, reusing cached keys/values
        so each costs one position."""
        block = self.cfg.block_size
        idx = idx[:, -block:]
        out = idx
        caches, start = [KVCache() for _ in self.blocks], 0
        logits, _ = self(idx, caches=caches)
        for _ in range(max_new_tokens):
            next_token = sample_next(logits[:, -1, :], temperature, top_k, top_p, generator)
            yield next_token
            out = torch.cat([out, next_token], dim=1)
            start = out.size(1) - 1
            if start >= block:  # the window is full: re-encode the last block_size-1 tokens from scratch
                caches = [KVCache() for _ in self.blocks]
                window = out[:, -block:]
                logits, _ = self(window, caches=caches)
            else:
                logits, _ = self(next_token, caches=caches, start=start)


@dataclass(frozen=True)
class Arch:
    """What an architecture chooses; everything else is shared."""
    norm: Callable[[int], nn.Module]  # before attention, the MLP and the output layer
    qk_norm: Callable[[int], nn.Module]  # on each head's queries and keys, over head_dim
    mlp: Callable[[GPTConfig], nn.Module]
    mlp_hidden: Callable[[int], int]  # the MLP's hidden width for a model width
    bias: bool  # in attention's Linears (the MLP's choose their own)
    rotary: bool  # rotary positions in attention; else a learned position table
    tied: bool  # the output layer is the token embedding
    init: Callable[[GPT], None]


ARCHS = {
    "gpt2": Arch(norm=nn.LayerNorm, qk_norm=lambda dim: nn.Identity(), mlp=MLP, mlp_hidden=lambda width: 4 * width,
                 bias=True, rotary=False, tied=True, init=GPT.init_gpt2),
    "llama": Arch(norm=RMSNorm, qk_norm=RMSNorm, mlp=SwiGLU, mlp_hidden=swiglu_hidden, bias=False, rotary=True,
                  tied=False, init=GPT.init_llama),
}


def keep_whole(param: torch.Tensor, whole: torch.Tensor) -> None:
    """Copy a whole tensor into `param`; a sharded parameter (an FSDP DTensor) keeps only its own slice, cut out here
    without any communication (src_data_rank=None: every process holds the same whole tensor)."""
    if isinstance(param, DTensor):
        whole = distribute_tensor(whole, param.device_mesh, param.placements, src_data_rank=None).to_local()
        param = param.to_local()
    param.copy_(whole)


def drawn_normal(like: torch.Tensor, std: float) -> torch.Tensor:
    """A whole CPU tensor shaped as `like`, drawn from N(0, std) as nn.init.normal_ draws it."""
    return torch.empty(like.shape, dtype=like.dtype, device="cpu").normal_(0.0, std)


def saved_activation_bytes(model: nn.Module, idx: torch.Tensor, targets: torch.Tensor | None) -> int:
    """Bytes that one forward of `model(idx, targets)` leaves saved for backward: its activation memory.

    Runs the forward once with grad enabled (whatever the caller's grad mode), in the model's current train/eval mode,
    autocast and device (call `model.train()` first to measure a training step: dropout masks and activation
    checkpointing only happen in training mode), under `torch.autograd.graph.saved_tensors_hooks`, and runs no
    backward. Counted: every distinct storage autograd saves for backward, once, at its full size (`nbytes()`, since a
    saved view keeps its whole storage alive) -- layer inputs, attention outputs and log-sum-exp, dropout masks, GELU
    inputs, the loss's log-softmax, and with activation checkpointing the block inputs the checkpoint stashes for
    recomputation (these pass through the same hooks). Not counted: parameters and buffers (a Linear saves its weight),
    `idx` and `targets`, the returned logits and loss unless autograd saves them, temporaries freed within the forward,
    gradients, optimizer state, and the one block's activations a checkpointed backward recomputes at a time. Works on
    the meta device too (storages are told apart by identity, not address), so a large model can be measured without
    allocating memory -- but the count follows the attention kernel the device picks: on meta (and on the CPU with
    dropout) it is the math path, which saves (B, n_head, T, T) attention matrices that CUDA's flash kernel never keeps.
    """
    exclude = {t.untyped_storage()._cdata for t in (*model.parameters(), *model.buffers())}
    exclude |= {t.untyped_storage()._cdata for t in (idx, targets) if t is not None}
    sizes: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage._cdata not in exclude:
            sizes[storage._cdata] = storage.nbytes()
        return t

    # the forward's outputs stay alive until `sizes` is summed, so no storage address is reused while measuring
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(idx, targets)
    total = sum(sizes.values())
    del out
    return total


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                generator: torch.Generator | None = None) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token once the tokens before it already cover top_p of the probability
        remove = cumulative - sorted_logits.softmax(-1) > top_p
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    if not torch.isfinite(probs).all():  # a diverged model has no distribution to draw from: take its likeliest
        return torch.nan_to_num(logits, nan=float("-inf")).argmax(dim=-1, keepdim=True)
    return torch.multinomial(probs, num_samples=1, generator=generator)


def generate_text(model: GPT, tokenizer, prompt: str, precision: str, tokens: int, temperature: float, top_k: int,
                  top_p: float, generator: torch.Generator | None = None) -> str:
    """The prompt and its continuation as text; prompt characters the vocabulary lacks are left out, with a note."""
    ids = prompt_ids(model, tokenizer, prompt)
    return tokenizer.decode(ids + list(new_ids(model, ids, precision, tokens, temperature, top_k, top_p, generator)))


def stream_text(model: GPT, tokenizer, prompt: str, precision: str, tokens: int, temperature: float, top_k: int,
                top_p: float, generator: torch.Generator | None = None):
    """generate_text's text in pieces as the tokens are drawn, the prompt first: a long sample shows its progress.
    Each new piece is the text the new tokens add to the few decoded before them (a word's leading space, the
    bytes of one character split over several tokens); a token that completes no character yet waits for the
    next."""
    ids = prompt_ids(model, tokenizer, prompt)
    yield tokenizer.decode(ids)
    start, done = 0, len(ids)  # ids[start:done]: the context of the next piece, decoded already
    for token in new_ids(model, ids, precision, tokens, temperature, top_k, top_p, generator):
        ids.append(token)
        before, now = tokenizer.decode(ids[start:done]), tokenizer.decode(ids[start:])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            yield now[len(before):]
            start, done = done, len(ids)


def prompt_ids(model: GPT, tokenizer, prompt: str) -> list[int]:
    """The prompt's tokens the model starts from (its last block_size); characters the vocabulary lacks are left
    out, with a note."""
    ids, dropped = tokenizer.encode_known(prompt)
    if dropped:
        notice(f"note: the prompt characters {dropped!r} are not in the vocabulary and were left out.")
    if not ids:
        ids = tokenizer.encode_known("\n")[0] or [0]
    return ids[-model.cfg.block_size:]


def new_ids(model: GPT, ids: list[int], precision: str, tokens: int, temperature: float, top_k: int, top_p: float,
            generator: torch.Generator | None = None):
    """The ids drawn after `ids`, one at a time; the model is in eval mode while it draws and as it was after."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        drawn = model.stream(torch.tensor([ids], device=device), tokens, temperature, top_k, top_p, generator)
        while True:
            with autocast(device, precision):  # per token: the caller's code between two tokens runs without it
                token = next(drawn, None)
            if token is None:
                return
            yield int(token[0, 0])
    finally:
        model.train(was_training)
