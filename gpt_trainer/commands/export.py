"""Export a checkpoint as a Hugging Face transformers model folder (GPT-2 for --arch gpt2, Qwen3 for --arch llama; fast
tokenizer, generation defaults and a model card) that `AutoModelForCausalLM` and `AutoTokenizer` load with no custom
code.

    python -m gpt_trainer.export output_demo/checkpoints/best.pt my-poet   (the demo's best checkpoint)
    python -m gpt_trainer export output_demo/checkpoints/best.pt my-poet --overwrite
    python -m gpt_trainer.export output_demo/checkpoints/best.pt my-poet --gguf   # also my-poet/model.gguf

--gguf also writes the model as one GGUF file (model.gguf), for llama.cpp and ollama (model/gguf.py); it needs the
run's sentencepiece tokenizer and is refused, before anything is written, for a char or an --init_from one.

A sharded checkpoint (an --parallel fsdp run's folder, checkpoints/best or latest) is consolidated on the CPU in this
one process; a run's output_dir stands for its latest checkpoint.

Only safetensors and the `tokenizers` library are needed here, not transformers. The folder is written next to
OUT_DIR under a temporary name and moved into place at the end, so a failure leaves nothing half-written. An export
folder is marked, as a run folder is, by a file the export writes (`.gpt-trainer-export`, listing its files): an
existing OUT_DIR that is not empty is refused unless it holds an earlier export and --overwrite is given, which
replaces that export's files and keeps others; a folder without the marker (files that may be the user's, a training
run's folder) is never written to.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from ..config import CHINESE_PROMPTS, EARLIER_ARCH, EARLIER_OPTIMIZER, ENGLISH_PROMPTS, TrainConfig
from ..data.tokenizer import tokenizer_from_dict
from ..errors import UsageError, notice
from ..model import gguf, hf
from ..model.gpt import GPTConfig
from ..system.rundir import MARKER as RUN_MARKER
from ..system.rundir import RunFolder, check_writable_folder
from ..train import checkpoint
from .failures import AGAIN, run_cli
from .sample import CHECKPOINT_HELP, checkpoint_path, model_from_checkpoint

# every file an export may write: --overwrite replaces these (and removes those of an earlier export this one does
# not write)
EXPORT_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                "tokenizer_config.json", "tokenizer.model", "README.md", "model.gguf")
EXPORT_MARKER = ".gpt-trainer-export"  # what makes a folder an export's: written by the export, with its files' names
# the named corpora's licences (the text's, which is what a model trained on it inherits); anything else is unknown
CORPUS_LICENCES = {
    "builtin": ("mit", "Tang poems from chinese-poetry (https://github.com/chinese-poetry/chinese-poetry): the poems "
                       "are in the public domain, the collection is MIT-licensed"),
    "tang": ("mit", "chinese-poetry (https://github.com/chinese-poetry/chinese-poetry): the poems are in the public "
                    "domain, the collection is MIT-licensed"),
    "song_ci": ("mit", "chinese-poetry (https://github.com/chinese-poetry/chinese-poetry): the poems are in the "
                       "public domain, the collection is MIT-licensed"),
    "shakespeare": ("other", "Tiny Shakespeare (karpathy/char-rnn): Shakespeare's plays, in the public domain"),
    "fortunes_zh": ("unknown", "Debian's fortunes-zh package: see /usr/share/doc/fortunes-zh/copyright and set it "
                               "yourself"),
}
OWN_TEXT = ("unknown", "the trainer's own text: its licence is unknown here, set it yourself")
# flags the reconstructed command leaves out: resolved for the machine it ran on, or about the run folder's handling
NOT_REPLAYED = {"compile", "no_compile", "cache_dir", "resume", "overwrite", "dry_run", "global_batch_size",
                "allow_new_data", "prepare_workers"}
# flags that hold a local path: the card shows only its last part (a full path would go to the Hub with the card)
PATH_FLAGS = ("data_path", "output_dir", "init_from")
# per --arch: the model card's tag, the transformers class, and what makes it the same architecture as ours
ARCH_CARDS = {
    "gpt2": ("gpt2", "GPT-2", "pre-LayerNorm, tanh GELU, learned positions, tied embeddings"),
    "llama": ("qwen3", "Qwen3 (`Qwen3ForCausalLM`)", "pre-RMSNorm, rotary positions, RMSNorm on each head's queries "
                                                     "and keys, SwiGLU MLP, no biases, an output layer of its own"),
}
# the model card's tag for the tokenizer kind (an --init_from folder's tokenizer gets none)
KIND_TAGS = {"char": ", character-level", "sentencepiece": ", sentencepiece"}
# the usual spellings of special tokens (sentencepiece's, GPT-2's, BERT's) by the role transformers gives them
SPECIAL_SPELLINGS = {"bos": ("<s>", "<|endoftext|>", "<bos>", "[CLS]"),
                     "eos": ("</s>", "<|endoftext|>", "<eos>", "[SEP]"),
                     "pad": ("<pad>", "[PAD]"), "unk": ("<unk>", "[UNK]")}


# ---- the tokenizer ------------------------------------------------------------------------------------------------
def special_ids(tokenizer) -> dict[str, int | None]:
    """bos/eos/pad/unk ids that exist in our vocabulary. Sentencepiece has its own control pieces. The char
    vocabulary has none: bos is "\\n" (our sampler starts an empty prompt from it, so transformers' `generate()`
    without a prompt does the same); there is no eos, because the model never learned one and a newline ends every
    line of a poem, not the poem (generation runs to max_new_tokens, like ours); no pad (set one to batch prompts)."""
    if tokenizer.kind == "sentencepiece":
        sp = tokenizer.sp
        return {name: (i if i >= 0 else None) for name, i in
                (("bos", sp.bos_id()), ("eos", sp.eos_id()), ("pad", sp.pad_id()), ("unk", sp.unk_id()))}
    if tokenizer.kind == "hf":
        return hf_special_ids(tokenizer)
    return {"bos": tokenizer.index.get("\n"), "eos": None, "pad": None, "unk": None}


def special_tokens(tk) -> dict[str, int]:
    """A `tokenizers` tokenizer's special tokens: text -> id."""
    return {token.content: i for i, token in tk.get_added_tokens_decoder().items() if token.special}


def hf_special_ids(tokenizer) -> dict[str, int | None]:
    """An --init_from tokenizer's ids: its special tokens by their usual spellings (`<s>` and `</s>` of an exported
    sentencepiece model, GPT-2's `<|endoftext|>`, BERT's `[CLS]` and `[SEP]`), the unknown token its model names. One
    with no special token at all, as an exported char vocabulary, keeps the char rule: bos is "\\n"."""
    special = special_tokens(tokenizer.tk)
    if not special:
        return {"bos": tokenizer.tk.token_to_id("\n"), "eos": None, "pad": None, "unk": None}
    ids = {role: next((special[token] for token in spellings if token in special), None)
           for role, spellings in SPECIAL_SPELLINGS.items()}
    return {**ids, "unk": tokenizer.unk_id if tokenizer.unk_id is not None else ids["unk"]}


def char_tokenizer(chars: list[str]):
    """Our ids, one per character: every character is its own piece (`[\\s\\S]`: "." would skip newlines), no
    normalizer, joined back with nothing between. No unknown token: a character the corpus never had raises an
    error instead of turning silently into another character."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    fast = Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token=None))
    fast.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    fast.decoder = decoders.Fuse()
    return fast


def normal_pieces(sp) -> dict[str, int]:
    """The pieces text is made of, by id order: not control, unknown, byte-fallback or unused ones."""
    return {sp.id_to_piece(i): i for i in range(sp.get_piece_size())
            if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i))}


def sentencepiece_tokenizer(sp):
    """The fast twin of our sentencepiece BPE model (as transformers converts one, with our training settings: no
    normalisation, no dummy prefix, byte fallback): the merges are ranked by the score of the piece they make, which
    is the order sentencepiece merges in; control pieces are special."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    normal = normal_pieces(sp)
    ranked = sorted((-sp.get_score(i), i, piece[:cut], piece[cut:]) for piece, i in normal.items()
                    for cut in range(1, len(piece)) if piece[:cut] in normal and piece[cut:] in normal)
    fast = Tokenizer(models.BPE(vocab, [(left, right) for *_, left, right in ranked], unk_token=sp.id_to_piece(
        sp.unk_id()), fuse_unk=True, byte_fallback=True, dropout=None))
    fast.normalizer = normalizers.Replace(" ", "▁")  # sentencepiece's whitespace escape, nothing prepended
    fast.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    fast.add_special_tokens([AddedToken(sp.id_to_piece(i), special=True, normalized=False)
                             for i in range(sp.get_piece_size()) if sp.is_control(i) or sp.is_unknown(i)])
    return fast


def check_same_ids(sp, fast) -> None:
    """The fast tokenizer must encode as sentencepiece does; a model trained with other settings than gpt-trainer's
    (a dummy prefix, a normaliser) would not, and is refused rather than exported wrong. The probe is every piece of
    the vocabulary run together, so that the merges compete as they do in real text."""
    probe = ("".join(normal_pieces(sp)).replace("▁", " ")
             + "\n春江花月夜，  two  spaces, digits 2026!\t𠀀 <s></s><unk>\n")
    fast.encode_special_tokens = True  # "<s>" in a text is text to sentencepiece (split_special_tokens in transformers)
    same = fast.encode(probe, add_special_tokens=False).ids == sp.encode(probe)
    fast.encode_special_tokens = False
    if not same:
        raise UsageError("this checkpoint's sentencepiece model was trained with other settings than gpt-trainer's "
                         "(a dummy prefix or a normaliser?): a fast tokenizer would not give its ids, so it is not "
                         "exported.")


def tokenizer_files(tokenizer, block_size: int, ids: dict) -> dict[str, bytes]:
    """tokenizer.json (and sentencepiece's own tokenizer.model) and the tokenizer_config.json that makes
    AutoTokenizer load it as it is: the generic fast class, nothing added around the ids."""
    names = {"bos": "bos_token", "eos": "eos_token", "pad": "pad_token", "unk": "unk_token"}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": block_size,
              "clean_up_tokenization_spaces": False, "add_bos_token": False, "add_eos_token": False}
    files = {}
    if tokenizer.kind == "sentencepiece":
        fast = sentencepiece_tokenizer(tokenizer.sp)
        check_same_ids(tokenizer.sp, fast)
        config.update({names[k]: tokenizer.sp.id_to_piece(i) for k, i in ids.items() if i is not None})
        config["split_special_tokens"] = True  # "<s>" written in a text is text, as sentencepiece encodes it
        files["tokenizer.model"] = tokenizer.model_proto
    elif tokenizer.kind == "hf":
        fast = without_post_processor(tokenizer.json)
        special = set(special_tokens(fast).values())  # a char export's "\n" as bos stays a plain token
        config.update({names[k]: fast.id_to_token(i) for k, i in ids.items() if i in special})
    else:  # the char tokens are plain characters: none is special (decode must not skip "\n")
        fast = char_tokenizer(tokenizer.chars)
    files["tokenizer.json"] = fast.to_str(pretty=True).encode()
    files["tokenizer_config.json"] = to_json(config)
    return files


def without_post_processor(json_text: str):
    """The --init_from tokenizer as training used it: a BERT post-processor would put [CLS] and [SEP] around every
    text that transformers encodes, ids the model never saw around a text."""
    from tokenizers import Tokenizer

    return Tokenizer.from_str(json.dumps({**json.loads(json_text), "post_processor": None}))


# ---- the model card -------------------------------------------------------------------------------------------------
def bare_name(path: str) -> str:
    """A local path's last part (a file or folder name): where the run's files lay on its machine is nobody's
    business on the Hub."""
    return Path(os.path.normpath(path)).name or str(path)


def training_command(config: dict) -> str:
    """The command that trained it, rebuilt from the flags that differ from the defaults, paths as bare names."""
    defaults = TrainConfig().to_dict()
    config = {"arch": EARLIER_ARCH, "optimizer": EARLIER_OPTIMIZER, **config,  # a run from before the flags
              "device": str(config.get("device", "auto")).split(":")[0]}  # cuda:0: cuda
    if config.get("tokenizer") != "sentencepiece":
        config.pop("vocab_size", None)  # the char vocabulary's size is the corpus's, an hf one the folder's
    if config.get("init_from"):
        config.pop("tokenizer", None)  # --init_from chooses its folder's
    flags = []
    for name, default in defaults.items():
        value = config.get(name, default)
        if name in NOT_REPLAYED or value == default or (name == "corpus" and config.get("data_path")):
            continue
        value = bare_name(value) if name in PATH_FLAGS else value
        flags.append(f"--{name}" if value is True else f"--{name}={shlex.quote(str(value))}")
    return " ".join(["python train_single_gpu.py", *flags])


def example_prompt(config: dict, tokenizer) -> str:
    """A prompt for the card's example: the run's first sample prompt, else a demo one, that the vocabulary spells."""
    candidates = [*(config.get("sample_prompts") or "").split(","), *CHINESE_PROMPTS.split(","),
                  *ENGLISH_PROMPTS.split(",")]
    fits = [p for p in [*candidates, *"".join(candidates)] if p and not tokenizer.encode_known(p)[1]]
    return fits[0] if fits else tokenizer.decode([0])


def step_batch(state: dict) -> int:
    """Sequences per optimizer step: recorded since format 3; before, micro-batch x accumulation x processes."""
    config = state["config"]
    return config.get("global_batch_size") or (config["batch_size"] * config.get("gradient_accumulation_steps", 1)
                                               * state.get("world_size", 1))


def model_card(state: dict, ids: dict, name: str) -> str:
    config, trainer, kind = state["config"], state["trainer"], state["tokenizer"]["kind"]
    own_text, base = bool(config.get("data_path")), config.get("init_from")
    licence, about_licence = OWN_TEXT if own_text else CORPUS_LICENCES.get(state.get("corpus"), OWN_TEXT)
    if base:  # the model it started from has a licence of its own
        licence, about_licence = "unknown", (f"set it yourself: the licence of `{bare_name(base)}`, the model it "
                                             f"started from, applies as well as the text's")
    corpus = f"`{state.get('corpus')}`" + (f" (--data_path {bare_name(config['data_path'])})" if own_text else "")
    arch = config.get("arch") or EARLIER_ARCH
    tag, their_class, same = ARCH_CARDS[arch]
    origin = (f"fine-tuned with gpt-trainer from the {their_class.split()[0]} folder `{bare_name(base)}`" if base
              else "trained from scratch with gpt-trainer")
    steps, batch, block = trainer["step"], step_batch(state), config["block_size"]
    best = trainer.get("best_val_loss", math.inf)
    prompt = json.dumps(example_prompt(config, tokenizer_from_dict(state["tokenizer"])), ensure_ascii=False)
    if kind == "char":
        tokens_text = ("one token per character. `bos_token_id` is the id of \"\\n\" (what our sampler starts an "
                       "empty prompt from); there is no end-of-text token, so generation runs to `max_new_tokens`, "
                       "and no padding token (set one to batch prompts). A character the training text never "
                       "contained has no id: tokenizing it raises an error (\"Missing [UNK] token\"); leave such "
                       "characters out, as `python -m gpt_trainer.sample` does.")
    elif kind == "hf":
        tokens_text = (f"the tokenizer of the folder it started from (`tokenizer.json`), applied as training applied "
                       f"it, with nothing added around the ids; special ids {json.dumps(ids)}.")
    else:
        tokens_text = (f"sentencepiece BPE with byte fallback (`tokenizer.model` is the original, `tokenizer.json` "
                       f"gives the same ids); special ids {json.dumps(ids)}, which training never used: nothing is "
                       f"added around the ids, and `<s>` written in a text is text.")
    return f"""---
library_name: transformers
license: {licence}
{"license_name: public-domain" + chr(10) if licence == "other" else ""}\
tags: [{tag}, text-generation, gpt-trainer{KIND_TAGS.get(kind, "")}]
pipeline_tag: text-generation
---

# {name}

A small GPT {origin} (--arch {arch}), exported as transformers' {their_class}, the same \
architecture: {same}. Layers: {config["n_layer"]}, heads: {config["n_head"]}, width: {config["n_embd"]}, context: \
{block} tokens, vocabulary: {state["vocab_size"]}.

- Corpus: {corpus}. Licence: {licence} ({about_licence}).
- Training: {steps:,} steps x {batch * block:,} tokens per step ({batch} sequences x {block} tokens) = \
{steps * batch * block:,} tokens seen.
- Best validation loss: {f"{best:.4f}" if math.isfinite(best) else "not evaluated"}.
- Trained with (rebuilt from the recorded flags, paths as bare names): `{training_command(config)}`
- Tokenizer: {tokens_text}

## Use

With `PATH` this folder (or its id on the Hub):

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model, tokenizer = AutoModelForCausalLM.from_pretrained("PATH"), AutoTokenizer.from_pretrained("PATH")
print(tokenizer.decode(model.generate(**tokenizer({prompt}, return_tensors="pt"))[0]))
```

`generation_config.json` holds the run's sampling settings (temperature {config["temperature"]}, top-k \
{config["top_k"]}, top-p {config["top_p"]}). The prompt and the new tokens together must fit in the context of \
{block} tokens: transformers does not slide the window as `python -m gpt_trainer.sample` does.
"""


# ---- writing the folder -------------------------------------------------------------------------------------------
def to_json(value: dict) -> bytes:
    return (json.dumps(value, indent=2, ensure_ascii=False) + "\n").encode()


def save_weights(state: dict, path: Path) -> None:
    from safetensors.torch import save_file

    shape = GPTConfig.from_flags(state["config"], state["vocab_size"])
    save_file(hf.export_weights(state["model"], shape), str(path), metadata={"format": "pt"})


def export_files(state: dict, name: str) -> dict[str, bytes]:
    """Every file of the folder but the weights (`save_weights`) and the marker."""
    config, tokenizer = state["config"], tokenizer_from_dict(state["tokenizer"])
    shape = GPTConfig.from_flags(config, state["vocab_size"])
    ids = special_ids(tokenizer)
    generation = {"bos_token_id": ids["bos"], "eos_token_id": ids["eos"], "pad_token_id": ids["pad"],
                  "do_sample": True, "temperature": config["temperature"], "top_k": config["top_k"],
                  "top_p": config["top_p"],
                  # transformers' GPT-2 cannot go past its context: a longer budget would fail every call
                  "max_new_tokens": min(config["sample_tokens"], shape.block_size - 1)}
    return {"config.json": to_json(hf.export_config(shape, ids)), "generation_config.json": to_json(generation),
            **tokenizer_files(tokenizer, shape.block_size, ids), "README.md": model_card(state, ids, name).encode()}


def check_destination(out: Path, overwrite: bool) -> list[str]:
    """OUT_DIR must be new, empty, or hold an earlier export (its marker) with --overwrite; returns the files that
    export wrote there (none for a new or empty folder). A training run's folder, or a folder with files and no
    export marker, is refused, --overwrite too: those files may be the user's."""
    check_writable_folder(out, "OUT_DIR")  # a file, a link that leads nowhere, a folder that cannot be written
    if not out.is_dir() or not any(out.iterdir()):
        return []
    if RunFolder(out).marker.exists():
        raise UsageError(f"{out} is a training run's folder (it holds {RUN_MARKER}): an export there would mix its "
                         f"config.json and README.md with the run's files, so it is refused, --overwrite too. Give "
                         f"the export a folder of its own, e.g. {out.parent / (out.name + '-hf')}.")
    earlier = earlier_export(out)
    if earlier is None:
        present = sorted(p.name for p in out.iterdir())
        raise UsageError(f"{out} holds files no export wrote ({hf.listed(present, shown=8)}): it has no "
                         f"{EXPORT_MARKER}, the marker every export writes, so an export would replace what may be "
                         f"yours. It is left alone, --overwrite too (it replaces only an earlier export's files). "
                         f"Give a new or empty folder.")
    if not overwrite:
        raise UsageError(f"{out} exists and is not empty: it holds an earlier export. Pass --overwrite to replace "
                         f"that export's files (other files are kept), or give a new folder.")
    return earlier


def earlier_export(out: Path) -> list[str] | None:
    """The files the export marker in `out` lists (only names an export writes); None without a marker. A marker that
    cannot be read stands for every name an export writes."""
    marker = out / EXPORT_MARKER
    if not marker.is_file():
        return None
    try:
        files = json.loads(marker.read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        files = EXPORT_FILES
    return [name for name in EXPORT_FILES if name in files]


def read_checkpoint(path: Path) -> dict:
    """The checkpoint (a sharded one consolidated on the CPU), with weights that fit the shape it records (what a
    damaged or foreign file breaks)."""
    path = checkpoint_path(path)
    state = checkpoint.load(path)
    model_from_checkpoint({**state, "model": hf.clean_state(state["model"])}, torch.device("cpu"), path)
    return state


@contextlib.contextmanager
def named_as(target: Path):
    """A failure of the machine (a full disk) while a file is staged is reported with the file in OUT_DIR it is
    for: the staging folder is hidden, and gone by the time the message is read. safetensors' writer raises its own
    error, with the OS error number in its text."""
    try:
        yield
    except Exception as e:
        found = re.search(r"\(os error (\d+)\)", str(e)) if type(e).__name__ == "SafetensorError" else None
        code = e.errno if isinstance(e, OSError) else int(found.group(1)) if found else None
        if code is None:
            raise
        raise OSError(code, os.strerror(code), str(target)) from None


def move_into_place(staging: Path, out: Path, earlier: list[str]) -> None:
    """A new OUT_DIR is the staged folder, renamed; into an existing one, each file is renamed over its old version,
    and the earlier export's files this one does not write are removed."""
    if not out.exists():
        os.replace(staging, out)
        return
    for name in [*EXPORT_FILES, EXPORT_MARKER]:
        if (staging / name).exists():
            os.replace(staging / name, out / name)
        elif name in earlier and (out / name).is_file():
            (out / name).unlink()
    staging.rmdir()
    kept = sorted(p.name for p in out.iterdir() if p.name not in (*EXPORT_FILES, EXPORT_MARKER))
    if kept:
        notice(f"note: kept files that are not the export's in {out}: {', '.join(kept)}.")


def check_gguf(state: dict) -> None:
    """--gguf writes llama.cpp's sentencepiece vocabulary, which only the run's own sentencepiece tokenizer gives."""
    kind = state["tokenizer"]["kind"]
    if kind == "char":
        raise UsageError(f"--gguf: this checkpoint's tokenizer is char-level: {gguf.CHAR_PROBLEM}. GGUF export needs "
                         f"a sentencepiece tokenizer: {gguf.SENTENCEPIECE_FIX}; the transformers folder (without "
                         f"--gguf) works for a char model.")
    if kind != "sentencepiece":
        raise UsageError(f"--gguf: this checkpoint's tokenizer is its --init_from folder's (tokenizer.json), which "
                         f"has no sentencepiece model for llama.cpp to read. GGUF export needs the run's own "
                         f"sentencepiece tokenizer: {gguf.SENTENCEPIECE_FIX}; the transformers folder (without --gguf) "
                         f"works for this model.")


def export(checkpoint_path: Path, out: Path, overwrite: bool = False, gguf_type: str | None = None) -> Path:
    """The folder (with `gguf_type`, also model.gguf in that precision)."""
    earlier = check_destination(out, overwrite)
    state = read_checkpoint(checkpoint_path)
    if gguf_type:
        check_gguf(state)
    out.parent.mkdir(parents=True, exist_ok=True)
    with named_as(out):
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    try:
        with named_as(out / "model.safetensors"):
            save_weights(state, staging / "model.safetensors")
        files = export_files(state, out.name)
        # no date in it: the same checkpoint exports to the same bytes
        weights = ["model.safetensors", *(["model.gguf"] if gguf_type else [])]
        written = {"written_by": "python -m gpt_trainer.export", "files": sorted([*weights, *files])}
        for name, data in {**files, EXPORT_MARKER: to_json(written)}.items():
            with named_as(out / name):
                (staging / name).write_bytes(data)
        if gguf_type:  # from the staged folder: the GGUF file holds what the transformers folder holds
            with named_as(out / "model.gguf"):
                gguf.write_gguf(staging, staging / "model.gguf", gguf_type)
        # mkdtemp and safetensors make private files: give the folder the modes any file the user writes gets
        mask = os.umask(0o022)
        os.umask(mask)
        os.chmod(staging, 0o777 & ~mask)
        for name in weights:
            os.chmod(staging / name, 0o666 & ~mask)
        with named_as(out):
            move_into_place(staging, out, earlier)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone after a successful move; a failure's half-written folder
    return out


def export_command(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpt_trainer.export", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", type=Path, help=CHECKPOINT_HELP)
    parser.add_argument("out_dir", type=Path, help="the folder to write (created; must be new or empty, or hold an "
                                                   "earlier export with --overwrite)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier export's files in OUT_DIR (other files are kept)")
    parser.add_argument("--gguf", action="store_true",
                        help="also write OUT_DIR/model.gguf, the model for llama.cpp and ollama (needs a sentencepiece "
                             "tokenizer)")
    parser.add_argument("--gguf_type", choices=gguf.GGUF_TYPES,
                        help="the GGUF file's weight precision: f32 (the default: the weights as trained) or f16 (half "
                             "the size; rounding may change a near-tie in greedy decoding)")
    args = parser.parse_args(argv)
    if args.gguf_type and not args.gguf:
        raise UsageError(f"--gguf_type {args.gguf_type} is given without --gguf, so no GGUF file would be written. "
                         f"Add --gguf, or drop --gguf_type.")
    gguf_type = (args.gguf_type or "f32") if args.gguf else None
    out = export(args.checkpoint.expanduser(), args.out_dir.expanduser(), args.overwrite, gguf_type)
    print(f"exported {args.checkpoint} to {out}: load it with AutoModelForCausalLM.from_pretrained({str(out)!r}) "
          f"and AutoTokenizer.from_pretrained({str(out)!r}).")
    if gguf_type:
        print(f"wrote {out / 'model.gguf'} ({gguf_type}) for llama.cpp (llama-completion -m "
              f"{shlex.quote(str(out / 'model.gguf'))} -no-cnv -p PROMPT) and ollama (a Modelfile with FROM "
              f"./model.gguf); see docs/gguf.md.")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(export_command, argv, AGAIN)


if __name__ == "__main__":
    sys.exit(main())
