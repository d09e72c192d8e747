"""A transformers folder as export writes it (Qwen3 or GPT-2 weights, our sentencepiece tokenizer) as one GGUF file,
the format llama.cpp, ollama and the programs built on them load. Only this module knows GGUF's names; they come from
the `gguf` package (llama.cpp's own writer), pinned, so that the names and keys are those the tested llama.cpp reads.

Weights keep their layout: GGUF lists a matrix's dimensions fastest first, so a (out, in) PyTorch matrix is written
as it is; GPT-2's Conv1D matrices, stored (in, out), are transposed first. Vectors (norms, biases) stay f32 in an f16
file, as llama.cpp's own converter leaves them: they are small and its kernels add them in f32."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..errors import UsageError

GGUF_TYPES = ("f32", "f16")
SENTENCEPIECE_FIX = "train with --tokenizer sentencepiece (its vocabulary is what llama.cpp's tokenizer reads)"
# measured with llama.cpp v0.4.0 (node-llama-cpp 3.21.1): a vocabulary of single characters written as sentencepiece
# pieces tokenises as ours once the 256 byte pieces are added, but those ids do not exist in a char model
CHAR_PROBLEM = ("llama.cpp's sentencepiece vocabulary needs the 256 byte-fallback pieces (without them llama.cpp "
                "aborts while loading the file) and an end-of-text id that ends every generation (id 2 unless set), "
                "and a character vocabulary has neither: its ids are its characters")
# the only architectures read here, by config.json's model_type; each maps transformers' names to GGUF's
QWEN3_BLOCK = {"self_attn.q_proj.weight": "ATTN_Q", "self_attn.k_proj.weight": "ATTN_K",
               "self_attn.v_proj.weight": "ATTN_V", "self_attn.o_proj.weight": "ATTN_OUT",
               "self_attn.q_norm.weight": "ATTN_Q_NORM", "self_attn.k_norm.weight": "ATTN_K_NORM",
               "input_layernorm.weight": "ATTN_NORM", "post_attention_layernorm.weight": "FFN_NORM",
               "mlp.gate_proj.weight": "FFN_GATE", "mlp.up_proj.weight": "FFN_UP", "mlp.down_proj.weight": "FFN_DOWN"}
QWEN3_TOP = {"model.embed_tokens.weight": "TOKEN_EMBD", "model.norm.weight": "OUTPUT_NORM",
             "lm_head.weight": "OUTPUT"}
GPT2_BLOCK = {f"{theirs}.{part}": name for theirs, name in (
    ("ln_1", "ATTN_NORM"), ("attn.c_attn", "ATTN_QKV"), ("attn.c_proj", "ATTN_OUT"), ("ln_2", "FFN_NORM"),
    ("mlp.c_fc", "FFN_UP"), ("mlp.c_proj", "FFN_DOWN")) for part in ("weight", "bias")}
GPT2_TOP = {"wte.weight": "TOKEN_EMBD", "wpe.weight": "POS_EMBD", "ln_f.weight": "OUTPUT_NORM",
            "ln_f.bias": "OUTPUT_NORM"}
GPT2_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def write_gguf(folder: Path, out: Path, gguf_type: str = "f32") -> None:
    """`folder`'s model and tokenizer as the GGUF file `out`. Everything is read and checked before `out` is opened:
    a folder this cannot convert is refused with the reason, and nothing is written."""
    import gguf

    config = read_config(folder)
    arch = config.get("model_type")
    if arch not in ("qwen3", "gpt2"):
        raise UsageError(f"GGUF: {folder} holds a {arch or 'unknown'} model; only the Qwen3 and GPT-2 folders "
                         f"python -m gpt_trainer.export writes are converted here.")
    vocabulary = sentencepiece_vocabulary(folder)
    tensors = (qwen3_tensors if arch == "qwen3" else gpt2_tensors)(folder, config)
    writer = gguf.GGUFWriter(str(out), arch)
    writer.add_name(folder.name)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if gguf_type == "f32" else gguf.LlamaFileType.MOSTLY_F16)
    (add_qwen3_shape if arch == "qwen3" else add_gpt2_shape)(writer, config)
    add_vocabulary(writer, vocabulary)
    for name, value in tensors.items():
        writer.add_tensor(name, value.astype(np.float16) if gguf_type == "f16" and value.ndim > 1 else value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def read_config(folder: Path) -> dict:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UsageError(f"GGUF: cannot read {folder / 'config.json'} ({e}).") from None
    if not isinstance(config, dict):
        raise UsageError(f"GGUF: {folder / 'config.json'} is not a JSON object.")
    return config


# ---- the tokenizer ------------------------------------------------------------------------------------------------
def sentencepiece_vocabulary(folder: Path) -> dict:
    """tokenizer.model as llama.cpp's sentencepiece ("llama") vocabulary: every piece with its score and kind (a
    byte-fallback piece `<0x0A>` is a byte, `<s>` a control piece), the special ids, and nothing added around a text
    (no bos, no dummy prefix: gpt-trainer's model has none). A folder with only a tokenizer.json (a char vocabulary)
    is refused (CHAR_PROBLEM)."""
    import gguf
    import sentencepiece as spm

    path = folder / "tokenizer.model"
    if not path.is_file():
        has_json = (folder / "tokenizer.json").is_file()
        raise UsageError(f"GGUF: {folder} has no sentencepiece model (tokenizer.model)"
                         + (f", only a tokenizer.json (a character vocabulary?): {CHAR_PROBLEM}" if has_json else "")
                         + f". A GGUF file needs a sentencepiece tokenizer: {SENTENCEPIECE_FIX}.")
    sp = spm.SentencePieceProcessor(model_proto=path.read_bytes())
    kinds = ((sp.is_byte, gguf.TokenType.BYTE), (sp.is_control, gguf.TokenType.CONTROL),
             (sp.is_unknown, gguf.TokenType.UNKNOWN), (sp.is_unused, gguf.TokenType.UNUSED))
    ids = range(sp.get_piece_size())
    return {"tokens": [sp.id_to_piece(i) for i in ids], "scores": [sp.get_score(i) for i in ids],
            "types": [next((kind for test, kind in kinds if test(i)), gguf.TokenType.NORMAL) for i in ids],
            "special": {"bos": sp.bos_id(), "eos": sp.eos_id(), "unk": sp.unk_id(), "pad": sp.pad_id()}}


def add_vocabulary(writer, vocabulary: dict) -> None:
    writer.add_tokenizer_model("llama")
    writer.add_token_list(vocabulary["tokens"])
    writer.add_token_scores(vocabulary["scores"])
    writer.add_token_types(vocabulary["types"])
    special = vocabulary["special"]
    for role, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                      ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        if special[role] >= 0:  # sentencepiece's -1: the model has no such piece
            add(special[role])
    # training saw bare text: no <s> before it, no space prepended, whitespace kept as written
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(False)
    writer.add_remove_extra_whitespaces(False)


# ---- the weights --------------------------------------------------------------------------------------------------
def read_weights(folder: Path) -> dict[str, np.ndarray]:
    """model.safetensors as float32 arrays (bf16 has no numpy type)."""
    from safetensors.torch import load_file

    path = folder / "model.safetensors"
    try:
        state = load_file(path)
    except Exception as e:  # noqa: BLE001 - missing or damaged: said with the file's name
        raise UsageError(f"GGUF: cannot read the weights {path} ({type(e).__name__}: {e}).") from None
    return {key: value.to(torch.float32).numpy() for key, value in state.items()}


def gguf_name(tensor: str, block: int | None, key: str) -> str:
    """GGUF's name for the tensor kind `tensor` (gguf.MODEL_TENSOR's member) in `block`, with the key's part (its
    weight or bias)."""
    import gguf

    return gguf.TENSOR_NAMES[gguf.MODEL_TENSOR[tensor]].format(bid=block) + "." + key.rsplit(".", 1)[1]


def qwen3_names(layers: int) -> dict[str, str]:
    names = {key: gguf_name(tensor, None, key) for key, tensor in QWEN3_TOP.items()}
    return names | {f"model.layers.{i}.{key}": gguf_name(tensor, i, key) for i in range(layers)
                    for key, tensor in QWEN3_BLOCK.items()}


def gpt2_names(layers: int) -> dict[str, str]:
    names = {f"transformer.{key}": gguf_name(tensor, None, key) for key, tensor in GPT2_TOP.items()}
    return names | {f"transformer.h.{i}.{key}": gguf_name(tensor, i, key) for i in range(layers)
                    for key, tensor in GPT2_BLOCK.items()}


def renamed(folder: Path, weights: dict[str, np.ndarray], names: dict[str, str], layers: int) -> dict[str, np.ndarray]:
    """The weights under GGUF's names. A missing one is refused by name, and so is one that has no GGUF name (a bias
    llama.cpp would not read, a layer more than config.json says): dropping it would compute another function. The
    output matrix may be absent: tied, llama.cpp uses the embedding."""
    missing = sorted(set(names) - set(weights) - {"lm_head.weight"})
    unexpected = sorted(set(weights) - set(names))
    if missing or unexpected:
        said = ([f"missing {', '.join(missing[:6])}"] if missing else []) + (
            [f"with no GGUF name {', '.join(unexpected[:6])}"] if unexpected else [])
        raise UsageError(f"GGUF: the weights in {folder} do not fit the model its config.json describes "
                         f"({layers} layers): {'; '.join(said)}.")
    return {names[key]: value for key, value in weights.items()}


def qwen3_tensors(folder: Path, config: dict) -> dict[str, np.ndarray]:
    check_qwen3(folder, config)
    layers = config["num_hidden_layers"]
    return renamed(folder, read_weights(folder), qwen3_names(layers), layers)


def gpt2_tensors(folder: Path, config: dict) -> dict[str, np.ndarray]:
    """GPT-2's weights with the `transformer.` prefix (a folder may have it or not), its Conv1D matrices transposed,
    without the causal-mask buffers of older transformers and the tied output matrix (llama.cpp ties it itself)."""
    weights = {}
    for key, value in read_weights(folder).items():
        key = key if key.startswith("transformer.") or key == "lm_head.weight" else f"transformer.{key}"
        if not key.endswith((".attn.bias", ".attn.masked_bias")):
            weights[key] = np.ascontiguousarray(value.T) if key.endswith(GPT2_CONV1D) else value
    if "lm_head.weight" in weights and np.array_equal(weights["lm_head.weight"], weights.get("transformer.wte.weight")):
        del weights["lm_head.weight"]
    layers = config.get("n_layer", 12)
    return renamed(folder, weights, gpt2_names(layers), layers)


def check_qwen3(folder: Path, config: dict) -> None:
    """What llama.cpp's qwen3 computes: SiLU gates, no biases, plain RoPE without scaling, full attention."""
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    differs = [f"{key} is {json.dumps(config.get(key))}, not {json.dumps(want)}" for key, want in
               (("hidden_act", "silu"), ("attention_bias", False), ("use_sliding_window", False))
               if config.get(key, want) != want]
    if rope.get("rope_type", "default") != "default":
        differs.append(f"the RoPE is scaled ({rope.get('rope_type')})")
    if differs:
        raise UsageError(f"GGUF: {folder / 'config.json'} describes a Qwen3 that llama.cpp's qwen3 would compute "
                         f"otherwise: {'; '.join(differs)}.")


def rope_theta(config: dict) -> float:
    """transformers 5 keeps it in rope_parameters, earlier versions at the top."""
    return float((config.get("rope_parameters") or {}).get("rope_theta", config.get("rope_theta", 10000.0)))


def add_qwen3_shape(writer, config: dict) -> None:
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config.get("num_key_value_heads") or config["num_attention_heads"])
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_freq_base(rope_theta(config))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])


def add_gpt2_shape(writer, config: dict) -> None:
    width = config.get("n_embd", 768)
    writer.add_context_length(config.get("n_positions", 1024))
    writer.add_embedding_length(width)
    writer.add_block_count(config.get("n_layer", 12))
    writer.add_feed_forward_length(config.get("n_inner") or 4 * width)
    writer.add_head_count(config.get("n_head", 12))
    writer.add_layer_norm_eps(config.get("layer_norm_epsilon", 1e-5))
