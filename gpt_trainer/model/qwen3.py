"""Our --arch llama in Hugging Face transformers' Qwen3 layout (Qwen3ForCausalLM), and back. Qwen3 is the one class
of transformers (and of llama.cpp's converter and runtime) that computes what our llama computes: pre-RMSNorm blocks
with eps 1e-6 normalised in float32, RMSNorm over each head's queries and keys before the rotary embedding (QK-norm,
which Llama and Mistral lack), half-split ("rotate_half") rotary positions, a SwiGLU MLP, no biases and an untied
output layer. The mapping is exact: our fused qkv matrix is Qwen3's q_proj, k_proj and v_proj stacked, and no weight
is permuted. Only names and config.json are here; reading and checking a folder's files is hf.py's."""

from __future__ import annotations

import json
import re

import torch

from .gpt import RMS_EPSILON, ROPE_BASE, GPTConfig, swiglu_hidden

# ours -> Qwen3's, per block (the qkv matrix is split: QKV)
BLOCK_NAMES = {"ln_1": "input_layernorm", "attn.q_norm": "self_attn.q_norm", "attn.k_norm": "self_attn.k_norm",
               "attn.proj": "self_attn.o_proj", "ln_2": "post_attention_layernorm", "mlp.gate": "mlp.gate_proj",
               "mlp.up": "mlp.up_proj", "mlp.proj": "mlp.down_proj"}
QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
OUTSIDE = {"wte.weight": "model.embed_tokens.weight", "ln_f.weight": "model.norm.weight",
           "lm_head.weight": "lm_head.weight"}
LAYER = re.compile(r"^model\.layers\.(\d+)\.")
# buffers some older saves kept: not weights
IGNORED = re.compile(r"^model\.(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq$")
# the sizes in a Qwen3 config.json, with Qwen3Config's defaults (a key left out means its default)
SIZES = {"vocab_size": 151936, "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
         "max_position_embeddings": 32768}


def to_qwen3(state: dict, n_layer: int) -> dict[str, torch.Tensor]:
    """Our llama's state (prefixes already cleaned) as Qwen3ForCausalLM's."""
    out = {theirs: state[ours] for ours, theirs in OUTSIDE.items()}
    for i in range(n_layer):
        for ours, theirs in BLOCK_NAMES.items():
            out[f"model.layers.{i}.{theirs}.weight"] = state[f"blocks.{i}.{ours}.weight"]
        for theirs, part in zip(QKV, state[f"blocks.{i}.attn.qkv.weight"].chunk(3, dim=0)):
            out[f"model.layers.{i}.{theirs}.weight"] = part
    return {key: value.detach().to("cpu").contiguous() for key, value in out.items()}


def from_qwen3(state: dict[str, torch.Tensor], n_layer: int) -> dict[str, torch.Tensor]:
    """Qwen3ForCausalLM's state as our llama's."""
    out = {ours: state[theirs] for ours, theirs in OUTSIDE.items()}
    for i in range(n_layer):
        for ours, theirs in BLOCK_NAMES.items():
            out[f"blocks.{i}.{ours}.weight"] = state[f"model.layers.{i}.{theirs}.weight"]
        out[f"blocks.{i}.attn.qkv.weight"] = torch.cat([state[f"model.layers.{i}.{theirs}.weight"] for theirs in QKV])
    return out


def weight_names(cfg: GPTConfig) -> set[str]:
    """The tensors a Qwen3 folder of our shape holds."""
    per_block = [*BLOCK_NAMES.values(), *QKV]
    return set(OUTSIDE.values()) | {f"model.layers.{i}.{name}.weight" for i in range(cfg.n_layer) for name in per_block}


def qwen3_config(cfg: GPTConfig, special_ids: dict[str, int | None]) -> dict:
    """config.json for Qwen3ForCausalLM: our shape, SiLU, our epsilon and rotary base, every head its own keys and
    values, no bias, no sliding window, an untied output layer, no dropout, and token ids of our vocabulary. The
    rotary base is written both ways (rope_parameters, and the older rope_theta that llama.cpp's converter and
    transformers 4 read)."""
    return {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.n_embd, "intermediate_size": cfg.mlp_hidden, "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_head, "head_dim": cfg.head_dim,
        "hidden_act": "silu", "max_position_embeddings": cfg.block_size, "rms_norm_eps": RMS_EPSILON,
        "rope_parameters": {"rope_type": "default", "rope_theta": ROPE_BASE}, "rope_theta": ROPE_BASE,
        "rope_scaling": None, "attention_bias": False, "attention_dropout": 0.0, "use_sliding_window": False,
        "sliding_window": None, "max_window_layers": cfg.n_layer, "layer_types": ["full_attention"] * cfg.n_layer,
        "tie_word_embeddings": False, "initializer_range": 0.02, "use_cache": True,
        "bos_token_id": special_ids.get("bos"), "eos_token_id": special_ids.get("eos"),
        "pad_token_id": special_ids.get("pad"),
    }


def sizes_of(config: dict) -> dict:
    """The sizes a Qwen3 config.json gives (its defaults where a key is left out), to be checked by the caller."""
    return {key: config.get(key, default) for key, default in SIZES.items()}


def unmapped(config: dict, sizes: dict) -> list[str]:
    """What in a Qwen3 config.json (whose sizes are whole numbers and whose width divides by its heads) our llama does
    not compute the same way, each naming the field and what it would have to be; empty when the mapping is exact."""
    width, heads = sizes["hidden_size"], sizes["num_attention_heads"]
    differs = []

    def want(key: str, value, default) -> None:
        if config.get(key, default) != value:
            differs.append(f"{key} is {json.dumps(config.get(key, default))}, not {json.dumps(value)}")
    want("head_dim", width // heads, 128)  # Qwen3Config's default, which is not always the width's share
    want("num_key_value_heads", heads, heads)  # grouped-query attention shares keys between heads: ours does not
    want("intermediate_size", swiglu_hidden(width), 22016)
    want("hidden_act", "silu", "silu")
    want("attention_bias", False, False)
    want("tie_word_embeddings", False, False)
    want("use_sliding_window", False, False)
    layer_types = config.get("layer_types")
    if layer_types is not None and set(layer_types) != {"full_attention"}:
        differs.append(f"layer_types holds {json.dumps(sorted(set(map(str, layer_types))))}, not only "
                       f"\"full_attention\"")
    epsilon = config.get("rms_norm_eps", RMS_EPSILON)
    if not isinstance(epsilon, (int, float)) or isinstance(epsilon, bool) or not abs(epsilon - RMS_EPSILON) <= 1e-12:
        differs.append(f"rms_norm_eps is {json.dumps(epsilon)}, not {RMS_EPSILON}")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        differs.append(f"rope_parameters is {json.dumps(rope)}, not an object")
        rope = {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        differs.append(f"its rotary positions are scaled (rope_type {json.dumps(kind)}, not \"default\")")
    theta = rope.get("rope_theta", config.get("rope_theta", ROPE_BASE))
    if theta != ROPE_BASE:
        differs.append(f"rope_theta is {json.dumps(theta)}, not {ROPE_BASE:g}")
    if (width // heads) % 2:
        differs.append(f"its heads are {width // heads} wide, an odd number the rotary embedding cannot pair")
    return differs


def shape_of(sizes: dict) -> GPTConfig:
    return GPTConfig(sizes["vocab_size"], sizes["max_position_embeddings"], sizes["num_hidden_layers"],
                     sizes["num_attention_heads"], sizes["hidden_size"], arch="llama")
