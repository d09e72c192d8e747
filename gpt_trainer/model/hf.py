"""Our GPT in Hugging Face transformers' layouts, and back, and the model folders --init_from starts from. --arch gpt2
is transformers' GPT-2 (here): the architectures are the same (pre-LayerNorm, tanh GELU, learned positions, biases,
tied embeddings), so the mapping is exact, with two traps: GPT-2's `Conv1D` stores its weights as (in, out), the
transpose of `nn.Linear`, and its config's defaults (token ids 50256, exact GELU in some variants) do not fit a small
vocabulary. --arch llama is transformers' Qwen3 (its names in qwen3.py). Only these modules know transformers' names
and folder layout (--init_from reads a folder with safetensors, tokenizers and torch; transformers itself is not
needed)."""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..config import MODEL_PRESETS, ModelShape, TrainConfig, validate
from ..data.tokenizer import HFTokenizer
from ..errors import UsageError
from . import qwen3
from .gpt import GPT, GPTConfig

LAYER_NORM_EPSILON = 1e-5  # torch's nn.LayerNorm default, which our model uses; GPT-2's too
# ours -> transformers', per block; the Conv1D ones are stored transposed
BLOCK_NAMES = {"ln_1": "ln_1", "attn.qkv": "attn.c_attn", "attn.proj": "attn.c_proj", "ln_2": "ln_2",
               "mlp.fc": "mlp.c_fc", "mlp.proj": "mlp.c_proj"}
CONV1D = {"attn.qkv", "attn.proj", "mlp.fc", "mlp.proj"}
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # the weights a run can start from
# what a folder's config.json must say for our model to be the same function as transformers' GPT2LMHeadModel
REQUIRED = {"activation_function": "gelu_new", "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False}
# the sizes in a GPT-2 config.json, with GPT2Config's defaults (a key left out means its default)
SIZES = {"vocab_size": 50257, "n_positions": 1024, "n_layer": 12, "n_head": 12, "n_embd": 768}
DAMAGED = ("the file is damaged (a download or copy cut short?) or was edited by hand: export or download the model "
           "again")


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


def read_folder_config(folder: Path) -> GPTConfig:
    """The shape (and --arch) a transformers folder describes: a GPT-2 one is a gpt2, a Qwen3 one a llama; any other
    architecture, a variant our model does not compute the same way, or a config.json whose sizes are not sizes, is
    refused with what differs."""
    config = read_config_json(folder)
    return read_qwen3_config(folder, config) if config.get("model_type") == "qwen3" else read_gpt2_config(folder)


def read_gpt2_config(folder: Path) -> GPTConfig:
    """The shape a transformers GPT-2 folder describes (see read_folder_config)."""
    config = read_config_json(folder)
    if config.get("model_type") != "gpt2":
        architectures = config.get("architectures")
        names = ", ".join(map(str, architectures)) if isinstance(architectures, list) else ""
        raise UsageError(f"--init_from: {folder} holds a {config.get('model_type') or 'unknown'} model ({names}); "
                         f"only GPT-2 (model_type gpt2: --arch gpt2) and Qwen3 (model_type qwen3: --arch llama) have "
                         f"this project's architectures.")
    # a key left out means GPT2Config's default
    sizes = {key: config.get(key, default) for key, default in SIZES.items()}
    check_sizes(folder, sizes, "n_embd", "n_head")
    differs = [f"{key} is {json.dumps(config[key])}, not {json.dumps(want)}" for key, want in REQUIRED.items()
               if config.get(key, want) != want]
    n_inner = config.get("n_inner")
    if n_inner not in (None, 4 * sizes["n_embd"]):
        differs.append(f"n_inner is {json.dumps(n_inner)}, not 4 x n_embd = {4 * sizes['n_embd']}")
    epsilon = config.get("layer_norm_epsilon", LAYER_NORM_EPSILON)
    if not is_number(epsilon) or not abs(epsilon - LAYER_NORM_EPSILON) <= 1e-12:  # (JSON may hold NaN)
        differs.append(f"layer_norm_epsilon is {json.dumps(epsilon)}, not {LAYER_NORM_EPSILON}")
    tied = config.get("tie_word_embeddings", True)
    if tied is not True:
        differs.append(f"its output matrix is not tied to the embedding (tie_word_embeddings {json.dumps(tied)})")
    if differs:
        raise UsageError(f"--init_from: {folder} is a GPT-2 variant this project's model does not compute the same "
                         f"way: {'; '.join(differs)}.")
    return GPTConfig(sizes["vocab_size"], sizes["n_positions"], sizes["n_layer"], sizes["n_head"], sizes["n_embd"])


def read_qwen3_config(folder: Path, config: dict) -> GPTConfig:
    """The llama shape a transformers Qwen3 folder's config.json describes (see read_folder_config)."""
    sizes = qwen3.sizes_of(config)
    check_sizes(folder, sizes, "hidden_size", "num_attention_heads")
    differs = qwen3.unmapped(config, sizes)
    if differs:
        raise UsageError(f"--init_from: {folder} is a Qwen3 variant this project's llama does not compute the same "
                         f"way: {'; '.join(differs)}.")
    return qwen3.shape_of(sizes)


def check_sizes(folder: Path, sizes: dict, width: str, heads: str) -> None:
    """Sizes that are whole numbers of at least 1, and a width its heads divide."""
    wrong = [f"{key} is {json.dumps(value)}" for key, value in sizes.items()
             if not isinstance(value, int) or isinstance(value, bool) or value < 1]
    if wrong:
        raise UsageError(f"--init_from: {folder / 'config.json'} gives sizes that are not whole numbers of at least 1 "
                         f"({'; '.join(wrong)}): {DAMAGED}.")
    if sizes[width] % sizes[heads]:
        raise UsageError(f"--init_from: {folder / 'config.json'} gives {width} {sizes[width]}, which does not divide "
                         f"by {heads} {sizes[heads]} (each head takes an equal share of the width): {DAMAGED}.")


def read_config_json(folder: Path) -> dict:
    """The folder's config.json as a dict; a missing, unreadable, non-UTF-8, cut-short or non-object file is refused
    in a sentence."""
    path = folder / "config.json"
    try:
        config = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise UsageError(f"--init_from: {folder} has no config.json: it is not a transformers model folder (download "
                         f"one with `hf download MODEL --local-dir DIR`, or export ours with python -m "
                         f"gpt_trainer.export).") from None
    except OSError as e:
        raise UsageError(f"--init_from: cannot read {path} ({e.strerror or e}).") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"--init_from: {path} is not UTF-8 text (byte offset {e.start}): {DAMAGED}.") from None
    except json.JSONDecodeError as e:
        raise UsageError(f"--init_from: {path} is not valid JSON ({e.msg}: line {e.lineno}, column {e.colno}): "
                         f"{DAMAGED}.") from None
    if not isinstance(config, dict):
        raise UsageError(f"--init_from: {path} holds a JSON {json_kind(config)}, not an object of settings such as "
                         f"{{\"model_type\": \"gpt2\", \"n_layer\": 12}}: {DAMAGED}.")
    return config


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def json_kind(value) -> str:
    """What a JSON value is, in JSON's words."""
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    return {list: "array", str: "string"}.get(type(value), "number")


# ---- --init_from: a transformers GPT-2 or Qwen3 folder as the start of a run ----------------------------------------
SHAPE_FLAGS = ("n_layer", "n_head", "n_embd")
# buffers of older GPT-2 code (the causal mask) and the tied output matrix: not weights of their own
IGNORED = re.compile(r"^(lm_head\.weight|h\.\d+\.attn\.(bias|masked_bias))$")


def gpt2_names(cfg: GPTConfig) -> set[str]:
    """The tensors a GPT-2 folder of our shape holds (the `transformer.` prefix dropped)."""
    return {"wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias"} | {
        f"h.{i}.{theirs}.{part}" for i in range(cfg.n_layer) for theirs in BLOCK_NAMES.values()
        for part in ("weight", "bias")}


def from_gpt2_folder(state: dict[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """A GPT-2 folder's weights as ours, the positions past cfg.block_size left out."""
    ours = from_hf(state, cfg.n_layer)
    ours["wpe.weight"] = ours["wpe.weight"][: cfg.block_size]
    return ours


@dataclass(frozen=True)
class Layout:
    """How transformers names one of our architectures."""
    name: str  # the architecture's name in sentences
    names: Callable[[GPTConfig], set[str]]  # the tensors of a folder of a shape
    layer: re.Pattern  # a tensor name of a block, its index the group
    ignored: re.Pattern  # tensors a folder may hold that are not weights of their own
    to_ours: Callable[[dict, GPTConfig], dict]
    to_theirs: Callable[[dict, int], dict]  # our (cleaned) state and layers -> theirs
    config_json: Callable[[GPTConfig, dict], dict]  # our shape and special ids -> config.json


LAYOUTS = {
    "gpt2": Layout("GPT-2", gpt2_names, re.compile(r"^h\.(\d+)\."), IGNORED, from_gpt2_folder, to_hf, gpt2_config),
    "llama": Layout("Qwen3", qwen3.weight_names, qwen3.LAYER, qwen3.IGNORED,
                    lambda state, cfg: qwen3.from_qwen3(state, cfg.n_layer),
                    lambda state, n_layer: qwen3.to_qwen3(clean_state(state), n_layer), qwen3.qwen3_config),
}


def export_weights(state: dict, cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """A checkpoint's model state under transformers' names for its architecture."""
    return LAYOUTS[cfg.arch].to_theirs(state, cfg.n_layer)


def export_config(cfg: GPTConfig, special_ids: dict[str, int | None]) -> dict:
    """config.json of the transformers class for the architecture."""
    return LAYOUTS[cfg.arch].config_json(cfg, special_ids)


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


def folder_state(folder: Path, cfg: GPTConfig, meta: bool = False) -> dict[str, torch.Tensor]:
    """The folder's weights as the state of our model of shape `cfg` (a GPT-2's positions past cfg.block_size left
    out), checked against it: a missing, unexpected or misshapen tensor is refused by name, and so is one that is not
    floating point or holds a NaN or an infinity (`meta`: names and shapes only, nothing loaded)."""
    layout = LAYOUTS[cfg.arch]
    state = read_weights(folder, meta)
    layers = len({found.group(1) for key in state if (found := layout.layer.match(key))})
    if cfg.n_layer > layers:  # said before the names are listed: a config.json may claim a billion layers
        raise UsageError(f"--init_from: the weights in {folder} do not fit the {layout.name} its config.json "
                         f"describes: it says {cfg.n_layer} layers, the weights hold {layers}.")
    expected = layout.names(cfg)
    missing = sorted(expected - state.keys(), key=natural)
    unexpected = sorted((key for key in state.keys() - expected if not layout.ignored.match(key)), key=natural)
    if missing or unexpected:
        said = [f"missing {listed(missing)}"] if missing else []
        said += [f"unexpected {listed(unexpected)}"] if unexpected else []
        raise UsageError(f"--init_from: the weights in {folder} do not fit the {layout.name} its config.json "
                         f"describes ({cfg.n_layer} layers): {'; '.join(said)}.")
    ours = layout.to_ours(state, cfg)
    with torch.device("meta"):  # the shapes our model has, nothing allocated
        wanted = {key: tuple(value.shape) for key, value in GPT(cfg).state_dict().items()}
    wrong = [f"{key} is {tuple(ours[key].shape)}, not {shape}" for key, shape in wanted.items()
             if tuple(ours[key].shape) != shape]
    if wrong:
        raise UsageError(f"--init_from: the weights in {folder} do not have the shapes its config.json describes "
                         f"({cfg.n_layer} layers x {cfg.n_embd} wide, vocabulary {cfg.vocab_size}, {cfg.block_size} "
                         f"positions); in our model's names: {listed(wrong, '; ')}.")
    if not meta:
        check_values(folder, {key: state[key] for key in sorted(expected, key=natural)})
    return ours


def check_values(folder: Path, state: dict[str, torch.Tensor]) -> None:
    """Weights a run can start from: floating point (an integer or boolean tensor, a quantized model's, would be cast
    to zeros or garbage) and finite (one NaN or infinity makes every loss NaN from the first step)."""
    not_float = [f"{key} ({str(value.dtype).removeprefix('torch.')})" for key, value in state.items()
                 if value.dtype not in FLOAT_DTYPES]
    if not_float:
        raise UsageError(f"--init_from: the weights in {folder} are not all floating point: {listed(not_float)}. A run "
                         f"starts from fp16, bf16, fp32 or fp64 weights; a quantized model (int8, 4-bit) cannot be "
                         f"trained on: start from the original, unquantized one.")
    not_finite = [f"{key} ({non_finite(value)})" for key, value in state.items() if not value.isfinite().all()]
    if not_finite:
        raise UsageError(f"--init_from: the weights in {folder} are not all finite numbers: "
                         f"{listed(not_finite, '; ')}. Every loss would be NaN from the first step: the model is "
                         f"broken (saved from a run that diverged?). Export or download it again, or start from "
                         f"another folder.")


def non_finite(tensor: torch.Tensor) -> str:
    """`2 NaN, 1 infinite of 1,024 values`."""
    nan, inf = int(tensor.isnan().sum()), int(tensor.isinf().sum())
    counted = [f"{nan:,} NaN"] * bool(nan) + [f"{inf:,} infinite"] * bool(inf)
    return f"{', '.join(counted)} of {tensor.numel():,} values"


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

    vocab_size = vocab_size or read_folder_config(folder).vocab_size
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


def init_tokenizer(cfg: TrainConfig) -> HFTokenizer | None:
    """The tokenizer a run's token data is made with when it is given rather than trained: --init_from's."""
    return folder_tokenizer(Path(cfg.init_from)) if cfg.tokenizer == "hf" else None


def load_gpt2_folder(folder: Path, block_size: int | None = None) -> tuple[GPTConfig, dict, HFTokenizer]:
    """A transformers GPT-2 or Qwen3 folder as (our model's shape, its state, the tokenizer), every part checked;
    `block_size`: fewer positions than the folder's (n_positions, max_position_embeddings)."""
    cfg = read_folder_config(folder)
    if block_size is not None:
        cfg.block_size = block_size
    return cfg, folder_state(folder, cfg), folder_tokenizer(folder, cfg.vocab_size)


def settle_init_from(cfg: TrainConfig, given: frozenset[str] = frozenset()) -> TrainConfig:
    """The run's configuration with --init_from's shape: --arch (gpt2 for a GPT-2 folder, llama for a Qwen3 one),
    --n_layer, --n_head, --n_embd and --block_size (n_positions, max_position_embeddings) from the folder, unless
    `given` on the command line, where they must agree (--block_size may be smaller); a given
    --model_size must describe the same shape (with the shape flags given beside it), and a preset with it names the
    run. Its config.json and tokenizer are checked here, its weights by init_weights: a bad folder stops the run
    before anything is written."""
    if not cfg.init_from:
        return cfg
    folder = Path(cfg.init_from)
    if not folder.is_dir():
        raise UsageError(f"--init_from {folder}: no such folder. Give the folder of a transformers GPT-2 or Qwen3 "
                         f"model (config.json, the weights and the tokenizer).")
    shape = read_folder_config(folder)
    folder_shape = ModelShape(shape.n_layer, shape.n_head, shape.n_embd)
    conflicts = [f"--{name} {getattr(cfg, name)} (the folder's: {getattr(shape, name)})" for name in
                 ("arch", *SHAPE_FLAGS) if name in given and getattr(cfg, name) != getattr(shape, name)]
    asked = MODEL_PRESETS[cfg.model_size]
    # the preset sets the shape flags not given beside it (those given were compared above)
    if "model_size" in given and any(getattr(asked, name) != getattr(shape, name) for name in SHAPE_FLAGS
                                     if name not in given):
        conflicts.append(f"--model_size {cfg.model_size} ({shape_in_words(asked)}; the folder's: "
                         f"{shape_in_words(shape)})")
    if "block_size" in given and cfg.block_size > shape.block_size:
        conflicts.append(f"--block_size {cfg.block_size} (the folder's model has {shape.block_size} positions; a "
                         f"smaller --block_size is allowed)")
    if conflicts:
        raise UsageError(f"--init_from {folder} sets the model's shape, which {'; '.join(conflicts)} contradict"
                         f"{'s' if len(conflicts) == 1 else ''}. Drop the shape flags, or start from another folder.")
    if "block_size" in given:
        shape.block_size = cfg.block_size
    folder_tokenizer(folder, shape.vocab_size)
    named = next((name for name, preset in MODEL_PRESETS.items() if preset == folder_shape), cfg.model_size)
    settled = dataclasses.replace(cfg, arch=shape.arch, model_size=named, n_layer=shape.n_layer,
                                  n_head=shape.n_head, n_embd=shape.n_embd, block_size=shape.block_size)
    validate(settled)
    return settled


def init_weights(cfg: TrainConfig, load: bool = True) -> dict[str, torch.Tensor] | None:
    """The --init_from folder's weights checked against the run's shape `cfg` (settled by settle_init_from), before
    anything is written. With `load`, a fresh run's: read once, their values checked (floating point, finite), and
    returned as our model's state for the trainer to start from; without it (a run resumed from its checkpoint, whose
    weights win) only their names and shapes are read, and None is returned."""
    folder = Path(cfg.init_from)
    shape = read_folder_config(folder)
    shape.block_size = cfg.block_size
    weights = folder_state(folder, shape, meta=not load)
    return weights if load else None


def shape_in_words(shape: ModelShape | GPTConfig) -> str:
    return f"{shape.n_layer} layers x {shape.n_embd} wide, {shape.n_head} heads"
