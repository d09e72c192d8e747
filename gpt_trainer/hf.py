"""Our GPT in Hugging Face transformers' GPT-2 layout, and back. The architectures are the same (pre-LayerNorm, tanh
GELU, learned positions, biases, tied embeddings), so the mapping is exact, with two traps: GPT-2's `Conv1D` stores
its weights as (in, out), the transpose of `nn.Linear`, and its config's defaults (token ids 50256, exact GELU in some
variants) do not fit a small vocabulary. Only this module knows transformers' names and folder layout (--init_from
reads a folder with safetensors, tokenizers and torch; transformers itself is not needed)."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import torch

from .config import MODEL_PRESETS, ModelShape, TrainConfig, validate
from .errors import UsageError
from .model import GPT, GPTConfig
from .tokenizer import HFTokenizer

LAYER_NORM_EPSILON = 1e-5  # torch's nn.LayerNorm default, which our model uses; GPT-2's too
# ours -> transformers', per block; the Conv1D ones are stored transposed
BLOCK_NAMES = {"ln_1": "ln_1", "attn.qkv": "attn.c_attn", "attn.proj": "attn.c_proj", "ln_2": "ln_2",
               "mlp.fc": "mlp.c_fc", "mlp.proj": "mlp.c_proj"}
CONV1D = {"attn.qkv", "attn.proj", "mlp.fc", "mlp.proj"}
# what a folder's config.json must say for our model to be the same function as transformers' GPT2LMHeadModel
REQUIRED = {"activation_function": "gelu_new", "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False}


def clean_state(state: dict) -> dict:
    """A model state as saved by any of our paths: without torch.compile's and DDP's prefixes."""
    return {re.sub(r"^(_orig_mod\.|module\.)+", "", key): value for key, value in state.items()}


def to_hf(state: dict, n_layer: int) -> dict[str, torch.Tensor]:
    """Our model's state as GPT2LMHeadModel's, the tied output matrix saved once (as the embedding)."""
    state = clean_state(state)
    out = {"transformer.wte.weight": state["wte.weight"], "transformer.wpe.weight": state["wpe.weight"],
           "transformer.ln_f.weight": state["ln_f.weight"], "transformer.ln_f.bias": state["ln_f.bias"]}
    for i in range(n_layer):
        for ours, theirs in BLOCK_NAMES.items():
            weight = state[f"blocks.{i}.{ours}.weight"]
            out[f"transformer.h.{i}.{theirs}.weight"] = weight.t() if ours in CONV1D else weight
            out[f"transformer.h.{i}.{theirs}.bias"] = state[f"blocks.{i}.{ours}.bias"]
    return {key: value.detach().to("cpu").contiguous() for key, value in out.items()}


def from_hf(state: dict[str, torch.Tensor], n_layer: int) -> dict[str, torch.Tensor]:
    """GPT2LMHeadModel's state (with or without the `transformer.` prefix, lm_head absent or tied) as ours."""
    state = {key.removeprefix("transformer."): value for key, value in state.items()}
    out = {"wte.weight": state["wte.weight"], "wpe.weight": state["wpe.weight"], "ln_f.weight": state["ln_f.weight"],
           "ln_f.bias": state["ln_f.bias"]}
    for i in range(n_layer):
        for ours, theirs in BLOCK_NAMES.items():
            weight = state[f"h.{i}.{theirs}.weight"]
            out[f"blocks.{i}.{ours}.weight"] = weight.t().contiguous() if ours in CONV1D else weight
            out[f"blocks.{i}.{ours}.bias"] = state[f"h.{i}.{theirs}.bias"]
    out["lm_head.weight"] = out["wte.weight"]
    return out


def gpt2_config(cfg: GPTConfig, special_ids: dict[str, int | None]) -> dict:
    """config.json for GPT2LMHeadModel: our shape, our GELU and epsilon, no dropout, tied embeddings, and token ids
    that exist in our vocabulary (never GPT-2's 50256)."""
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
        "n_positions": cfg.block_size, "n_ctx": cfg.block_size, "n_embd": cfg.n_embd, "n_layer": cfg.n_layer,
        "n_head": cfg.n_head, "n_inner": None, "layer_norm_epsilon": LAYER_NORM_EPSILON, "resid_pdrop": 0.0,
        "embd_pdrop": 0.0, "attn_pdrop": 0.0, "summary_first_dropout": 0.0, "initializer_range": 0.02,
        "use_cache": True, "tie_word_embeddings": True, **REQUIRED,
        "bos_token_id": special_ids.get("bos"), "eos_token_id": special_ids.get("eos"),
        "pad_token_id": special_ids.get("pad"),
    }


def read_gpt2_config(folder: Path) -> GPTConfig:
    """The shape a transformers GPT-2 folder describes; a folder of another architecture, or a GPT-2 variant our
    model does not compute the same way, is refused with what differs."""
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"--init_from: {folder} has no config.json: it is not a transformers model folder (download "
                         f"one with `hf download MODEL --local-dir DIR`, or export ours with python -m "
                         f"gpt_trainer.export).") from None
    except (OSError, ValueError) as e:
        raise UsageError(f"--init_from: cannot read {path} ({e}).") from None
    if config.get("model_type") != "gpt2":
        raise UsageError(f"--init_from: {folder} holds a {config.get('model_type') or 'unknown'} model "
                         f"({', '.join(config.get('architectures') or [])}); only GPT-2 (model_type gpt2) has this "
                         f"project's architecture.")
    # a key left out means GPT2Config's default, which is the value we need
    differs = [f"{key} is {config[key]!r}, not {want!r}" for key, want in REQUIRED.items()
               if config.get(key, want) != want]
    n_inner, n_embd = config.get("n_inner"), config.get("n_embd", 768)
    if n_inner not in (None, 4 * n_embd):
        differs.append(f"n_inner is {n_inner}, not 4 x n_embd = {4 * n_embd}")
    if abs(config.get("layer_norm_epsilon", LAYER_NORM_EPSILON) - LAYER_NORM_EPSILON) > 1e-12:
        differs.append(f"layer_norm_epsilon is {config['layer_norm_epsilon']}, not {LAYER_NORM_EPSILON}")
    if not config.get("tie_word_embeddings", True):
        differs.append("its output matrix is not tied to the embedding (tie_word_embeddings false)")
    if differs:
        raise UsageError(f"--init_from: {folder} is a GPT-2 variant this project's model does not compute the same "
                         f"way: {'; '.join(differs)}.")
    return GPTConfig(config.get("vocab_size", 50257), config.get("n_positions", 1024), config.get("n_layer", 12),
                     config.get("n_head", 12), n_embd)


# ---- --init_from: a transformers GPT-2 folder as the start of a run --------------------------------------------------
SHAPE_FLAGS = ("n_layer", "n_head", "n_embd")
# buffers of older GPT-2 code (the causal mask) and the tied output matrix: not weights of their own
IGNORED = re.compile(r"^(lm_head\.weight|h\.\d+\.attn\.(bias|masked_bias))$")


def weight_files(folder: Path) -> list[Path]:
    """The folder's weight files: model.safetensors, its shards (model.safetensors.index.json), or
    pytorch_model.bin."""
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            return [folder / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise UsageError(f"--init_from: cannot read {index} ({e}).") from None
    if (folder / "pytorch_model.bin").is_file():
        return [folder / "pytorch_model.bin"]
    raise UsageError(f"--init_from: {folder} has no weights: neither model.safetensors (or its shards) nor "
                     f"pytorch_model.bin.")


def read_weights(folder: Path, meta: bool = False) -> dict[str, torch.Tensor]:
    """The folder's tensors under transformers' names (the `transformer.` prefix dropped); `meta`: their shapes only,
    nothing loaded."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    state = {}
    for path in weight_files(folder):
        try:
            if path.suffix != ".safetensors":
                loaded = torch.load(path, map_location="meta" if meta else "cpu", weights_only=True)
                if not isinstance(loaded, dict):
                    raise ValueError(f"it holds a {type(loaded).__name__}, not a state dict")
                state.update(loaded)
            elif meta:
                with safe_open(path, framework="pt") as f:
                    state.update({key: torch.empty(f.get_slice(key).get_shape(), device="meta") for key in f.keys()})
            else:
                state.update(load_file(path))
        except Exception as e:  # noqa: BLE001 - missing shard, truncated or foreign file: said with the file's name
            raise UsageError(f"--init_from: cannot read the weights {path} ({type(e).__name__}: {e}).") from None
    return {key.removeprefix("transformer."): value for key, value in clean_state(state).items()}


def gpt2_state(folder: Path, cfg: GPTConfig, meta: bool = False) -> dict[str, torch.Tensor]:
    """The folder's weights as the state of our model of shape `cfg` (positions past cfg.block_size left out), checked
    against it: a missing, unexpected or misshapen tensor is refused by name."""
    state = read_weights(folder, meta)
    expected = {"wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias"} | {
        f"h.{i}.{theirs}.{part}" for i in range(cfg.n_layer) for theirs in BLOCK_NAMES.values()
        for part in ("weight", "bias")}
    missing = sorted(expected - state.keys(), key=natural)
    unexpected = sorted((key for key in state.keys() - expected if not IGNORED.match(key)), key=natural)
    if missing or unexpected:
        said = [f"missing {listed(missing)}"] if missing else []
        said += [f"unexpected {listed(unexpected)}"] if unexpected else []
        raise UsageError(f"--init_from: the weights in {folder} do not fit the GPT-2 its config.json describes "
                         f"({cfg.n_layer} layers): {'; '.join(said)}.")
    ours = from_hf(state, cfg.n_layer)
    ours["wpe.weight"] = ours["wpe.weight"][: cfg.block_size]
    with torch.device("meta"):  # the shapes our model has, nothing allocated
        wanted = {key: tuple(value.shape) for key, value in GPT(cfg).state_dict().items()}
    wrong = [f"{key} is {tuple(ours[key].shape)}, not {shape}" for key, shape in wanted.items()
             if tuple(ours[key].shape) != shape]
    if wrong:
        raise UsageError(f"--init_from: the weights in {folder} do not have the shapes its config.json describes "
                         f"({cfg.n_layer} layers x {cfg.n_embd} wide, vocabulary {cfg.vocab_size}, {cfg.block_size} "
                         f"positions); in our model's names: {listed(wrong, '; ')}.")
    return ours


def natural(key: str) -> list:
    """h.2 before h.10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key)]


def listed(items: list[str], separator: str = ", ", shown: int = 6) -> str:
    """The first few items, and how many more there are."""
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    return separator.join(items[:shown]) + more


def folder_tokenizer(folder: Path, vocab_size: int | None = None) -> HFTokenizer:
    """The folder's tokenizer: tokenizer.json, else a BERT WordPiece one built from vocab.txt (lower-casing as
    tokenizer_config.json's do_lower_case says, default true as in transformers' BertTokenizer). Its ids must fit the
    model's vocabulary (`vocab_size`, default config.json's)."""
    from tokenizers import BertWordPieceTokenizer, Tokenizer

    vocab_size = vocab_size or read_gpt2_config(folder).vocab_size
    try:
        if (folder / "tokenizer.json").is_file():
            json_text = Tokenizer.from_file(str(folder / "tokenizer.json")).to_str()
        elif (folder / "vocab.txt").is_file():
            settings = folder / "tokenizer_config.json"
            lowercase = json.loads(settings.read_text()).get("do_lower_case", True) if settings.is_file() else True
            json_text = BertWordPieceTokenizer(str(folder / "vocab.txt"), lowercase=lowercase).to_str()
        else:
            raise UsageError(f"--init_from: {folder} has no tokenizer: neither tokenizer.json nor a BERT vocab.txt.")
        tokenizer = HFTokenizer(json_text, vocab_size)
    except UsageError:
        raise
    except Exception as e:  # noqa: BLE001 - the tokenizers library's errors name no file
        raise UsageError(f"--init_from: cannot read the tokenizer in {folder} ({type(e).__name__}: {e}).") from None
    if tokenizer.size > vocab_size:
        raise UsageError(f"--init_from: the tokenizer in {folder} has ids up to {tokenizer.size - 1}, but the model's "
                         f"vocabulary (config.json's vocab_size) has only {vocab_size} rows: they do not belong "
                         f"together.")
    return tokenizer


def load_gpt2_folder(folder: Path, block_size: int | None = None) -> tuple[GPTConfig, dict, HFTokenizer]:
    """A transformers GPT-2 folder as (our model's shape, its state, the tokenizer), every part checked; `block_size`:
    fewer positions than the folder's n_positions."""
    cfg = read_gpt2_config(folder)
    if block_size is not None:
        cfg.block_size = block_size
    return cfg, gpt2_state(folder, cfg), folder_tokenizer(folder, cfg.vocab_size)


def settle_init_from(cfg: TrainConfig, given: frozenset[str] = frozenset()) -> TrainConfig:
    """The run's configuration with --init_from's shape: --n_layer, --n_head, --n_embd and --block_size (n_positions)
    from the folder, unless `given` on the command line, where they must agree (--block_size may be smaller); a given
    --model_size must describe the same shape, and a preset with it names the run. The whole folder is checked
    (config, the weights' names and shapes, the tokenizer) without loading a weight, so a bad folder stops the run
    before anything is written."""
    if not cfg.init_from:
        return cfg
    folder = Path(cfg.init_from)
    if not folder.is_dir():
        raise UsageError(f"--init_from {folder}: no such folder. Give the folder of a transformers GPT-2 model "
                         f"(config.json, the weights and the tokenizer).")
    shape = read_gpt2_config(folder)
    folder_shape = ModelShape(shape.n_layer, shape.n_head, shape.n_embd)
    conflicts = [f"--{name} {getattr(cfg, name)} (the folder's: {getattr(shape, name)})" for name in SHAPE_FLAGS
                 if name in given and getattr(cfg, name) != getattr(shape, name)]
    if "model_size" in given and MODEL_PRESETS[cfg.model_size] != folder_shape:
        preset = MODEL_PRESETS[cfg.model_size]
        conflicts.append(f"--model_size {cfg.model_size} ({preset.n_layer} layers x {preset.n_embd} wide, "
                         f"{preset.n_head} heads; the folder's: {shape.n_layer} x {shape.n_embd}, {shape.n_head} "
                         f"heads)")
    if "block_size" in given and cfg.block_size > shape.block_size:
        conflicts.append(f"--block_size {cfg.block_size} (the folder's model has {shape.block_size} positions; a "
                         f"smaller --block_size is allowed)")
    if conflicts:
        raise UsageError(f"--init_from {folder} sets the model's shape, which {'; '.join(conflicts)} contradict"
                         f"{'s' if len(conflicts) == 1 else ''}. Drop the shape flags, or start from another folder.")
    if "block_size" in given:
        shape.block_size = cfg.block_size
    folder_tokenizer(folder, shape.vocab_size)
    gpt2_state(folder, shape, meta=True)
    named = next((name for name, preset in MODEL_PRESETS.items() if preset == folder_shape), cfg.model_size)
    settled = dataclasses.replace(cfg, model_size=named, n_layer=shape.n_layer, n_head=shape.n_head,
                                  n_embd=shape.n_embd, block_size=shape.block_size)
    validate(settled)
    return settled
