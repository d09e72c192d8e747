"""The training configuration: one typed dataclass, model presets as data, and the command line built from both.

Every field of `TrainConfig` is a flag (`--name value` or `--name=value`). Booleans accept every form a wandb sweep
agent sends (`--bf16`, `--bf16=True`, `--bf16=false`, `--bf16=1`).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import typing
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UsageError


@dataclass(frozen=True)
class ModelShape:
    n_layer: int
    n_head: int
    n_embd: int


# the same shapes serve both architectures (--arch): their blocks hold about the same parameters (llama's SwiGLU MLP,
# hidden width 8/3 x n_embd rounded up to a multiple of 8, about GPT-2's 4 x n_embd GELU MLP); llama adds an output
# layer of its own (vocabulary x n_embd) and drops the position table. docs/training.md lists both counts.
MODEL_PRESETS: dict[str, ModelShape] = {
    "tiny": ModelShape(6, 6, 384),  # the classic baby GPT
    "small": ModelShape(12, 12, 768),  # GPT-2 124M
    "medium": ModelShape(24, 16, 1024),  # GPT-2 350M
    "large": ModelShape(36, 20, 1280),  # GPT-2 774M
    "xl": ModelShape(48, 25, 1600),  # GPT-2 1.5B
}

ARCHITECTURES = ("gpt2", "llama")  # gpt_trainer.model.gpt.ARCHS
DEFAULT_ARCH = "llama"  # with --optimizer muon, the recipe that won BENCHMARKS.md's comparison
EARLIER_ARCH = "gpt2"  # what a checkpoint or config.json written before --arch existed holds, whatever the default
CORPORA = ("chinese", "song_ci", "tang", "shakespeare", "fortunes_zh", "builtin")
CHINESE_CORPORA = ("chinese", "song_ci", "tang", "fortunes_zh", "builtin")
CHINESE_PROMPTS = "春江,往事"
ENGLISH_PROMPTS = "ROMEO:,The "
OPTIMIZERS = ("adamw", "muon")
DEFAULT_OPTIMIZER = "muon"
EARLIER_OPTIMIZER = "adamw"  # what a run recorded before --optimizer existed trained with, whatever the default
# each optimizer's defaults (muon's measured on Song ci: docs/training.md) for the flags left None: a flag whose default
# depends on --optimizer is None in the parser, filled when the TrainConfig is made
OPTIMIZER_DEFAULTS = {
    "muon": {"learning_rate": 3e-3, "weight_decay": 0.0, "muon_learning_rate": 0.02, "muon_momentum": 0.95,
             "muon_weight_decay": 0.0},
    "adamw": {"learning_rate": 3e-4, "weight_decay": 0.1},
}
MUON_FLAGS = ("muon_learning_rate", "muon_momentum", "muon_weight_decay")  # only --optimizer muon reads them
CPU_AUTO_BATCH_SIZE = 16  # what --batch_size auto means on the CPU: memory is rarely the limit there, time is
# Unicode categories a run name may not hold: control characters (a newline, a tab, NUL) and line/paragraph breaks
LINE_BREAKS_AND_CONTROLS = ("Cc", "Zl", "Zp")


def parse_switch(text: str) -> str:
    """auto, or a boolean in any form a sweep agent sends; returns "auto", "true" or "false"."""
    if str(text).strip().lower() == "auto":
        return "auto"
    try:
        return "true" if parse_bool(text) else "false"
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected auto, true or false, got {text!r}") from None


def int_or_auto(text: str) -> int | None:
    """--batch_size: a number, or auto (None: the run plan picks the micro-batch)."""
    return None if text.strip().lower() == "auto" else int(text)


def _flag(default, help: str, **argparse_kwargs):
    return field(default=default, metadata={"help": help, **argparse_kwargs})


@dataclass(frozen=True)
class TrainConfig:
    # model
    arch: str = _flag(DEFAULT_ARCH, "Architecture: gpt2 (learned positions, LayerNorm, GELU MLP, biases, tied "
                                    "embeddings) or llama (Qwen3's layout: rotary positions, RMSNorm, QK-norm, SwiGLU "
                                    "MLP, no biases, its own output layer; exports as Qwen3ForCausalLM).",
                      choices=list(ARCHITECTURES))
    model_size: str = _flag("tiny", "Model preset.", choices=list(MODEL_PRESETS))
    n_layer: int | None = _flag(None, "Override the preset's layer count.")
    n_head: int | None = _flag(None, "Override the preset's attention-head count.")
    n_embd: int | None = _flag(None, "Override the preset's width (must divide by n_head).")
    block_size: int = _flag(256, "Context length in tokens.")
    dropout: float = _flag(0.1, "Dropout probability.")
    init_from: str | None = _flag(None, "Start a new run from a Hugging Face transformers GPT-2 folder (config.json; "
                                        "model.safetensors or pytorch_model.bin; tokenizer.json or a BERT vocab.txt), "
                                        "e.g. one python -m gpt_trainer.export wrote or one downloaded with `hf "
                                        "download`: its weights, its tokenizer (--tokenizer hf) and its shape. "
                                        "--n_layer, --n_head, --n_embd and --block_size default to the folder's "
                                        "(block_size: n_positions); a given one that differs, or a --model_size of "
                                        "another shape, is refused, except a smaller --block_size (later positions "
                                        "go unused). Its loss on the validation text is logged at step 0 and is the "
                                        "best to beat: best.pt is written only for a trained model that beats it. "
                                        "With --resume, a checkpoint's weights win (a bare --resume keeps the run's "
                                        "--init_from).", metavar="DIR")
    # data
    use_chinese: bool = _flag(False, "Train on Chinese poetry: --corpus chinese, or the Chinese --corpus named. It is "
                              "also what runs when neither --data_path nor --corpus is given.")
    data_path: str | None = _flag(None, "A text file, or a folder of .txt/.json/.jsonl files (chinese-poetry layout "
                                        "too).")
    corpus: str | None = _flag(None, "A named corpus instead of --data_path.", choices=list(CORPORA))
    cache_dir: str | None = _flag(None, "Where downloads and token caches live (default: $GPT_TRAINER_CACHE or "
                                        "~/.cache/gpt_trainer).")
    text_field: str = _flag("text", "The field of .json/.jsonl records that holds the text (MiniMind's data: text).")
    prepare_workers: int = _flag(0, "Processes that encode the corpus with --tokenizer sentencepiece or hf (0: every "
                                    "usable core); char encoding is one vectorised table look-up, faster in one "
                                    "process.")
    tokenizer: str = _flag(None, "Tokenizer kind (default: char; hf, the --init_from folder's own, with --init_from).",
                           choices=["char", "sentencepiece", "hf"])
    vocab_size: int = _flag(4000, "Vocabulary size for --tokenizer sentencepiece.")
    train_split: float = _flag(0.9, "Fraction of tokens used for training; the rest is validation.")
    # optimisation
    batch_size: int | None = _flag(16, "Sequences per micro-batch, or auto: on a GPU the largest power of two "
                                       "whose training step fits in memory with a margin (on the CPU: "
                                       f"{CPU_AUTO_BATCH_SIZE}).",
                                   type=int_or_auto)
    gradient_accumulation_steps: int = _flag(1, "Micro-batches per optimizer step.")
    global_batch_size: int | None = _flag(None, "Sequences per optimizer step over all processes: sets "
                                                "--gradient_accumulation_steps (global = micro-batch x accumulation x "
                                                "processes).")
    epochs: float = _flag(1.0, "Passes over the training tokens (ignored when --max_steps is given).")
    max_steps: int | None = _flag(None, "Optimizer steps to run; wins over --epochs.")
    optimizer: str = _flag(DEFAULT_OPTIMIZER, "muon: Muon (orthogonalised Nesterov momentum) for the 2-D weights "
                                               "inside the transformer blocks and AdamW for the rest (embeddings, "
                                               "head, norms, biases), which --learning_rate and --weight_decay then "
                                               "set. adamw: AdamW for every parameter (with --arch gpt2: the recipe "
                                               "of runs before muon was the default).", choices=list(OPTIMIZERS))
    learning_rate: float | None = _flag(None, "Peak learning rate of AdamW (of every parameter under --optimizer "
                                              f"adamw). Default: {OPTIMIZER_DEFAULTS['muon']['learning_rate']:g} "
                                              f"under muon, {OPTIMIZER_DEFAULTS['adamw']['learning_rate']:g} under "
                                              "adamw.")
    min_lr: float | None = _flag(None, "Learning rate at the end of the cosine decay (default: learning_rate / 10).")
    warmup_steps: int = _flag(100, "Linear warm-up steps before the cosine decay.")
    weight_decay: float | None = _flag(None, "AdamW weight decay (matrices only; not biases, norms or embeddings: "
                                             "under muon only an output layer not tied to the embedding is such a "
                                             f"matrix). Default: {OPTIMIZER_DEFAULTS['muon']['weight_decay']:g} "
                                             f"under muon, {OPTIMIZER_DEFAULTS['adamw']['weight_decay']:g} under "
                                             "adamw.")
    muon_learning_rate: float | None = _flag(None, "--optimizer muon: Muon's peak learning rate (default "
                                                   f"{OPTIMIZER_DEFAULTS['muon']['muon_learning_rate']:g}), on the "
                                                   "same schedule.")
    muon_momentum: float | None = _flag(None, "--optimizer muon: Muon's Nesterov momentum (default "
                                              f"{OPTIMIZER_DEFAULTS['muon']['muon_momentum']:g}).")
    muon_weight_decay: float | None = _flag(None, "--optimizer muon: Muon's weight decay (default "
                                                  f"{OPTIMIZER_DEFAULTS['muon']['muon_weight_decay']:g}).")
    grad_clip: float = _flag(1.0, "Clip the global gradient norm to this (0 disables).")
    max_bad_steps: int = _flag(5, "Stop after this many optimizer steps in a row with a non-finite loss or gradient "
                                  "(each one is skipped, never applied). Checked where the run reads the GPU anyway: "
                                  "at each log step, evaluation and save.")
    seed: int = _flag(1337, "Random seed.")
    # hardware
    device: str = _flag("auto", "Where to train.", choices=["auto", "cuda", "cpu"])
    bf16: bool = _flag(False, "bfloat16 mixed precision (default on GPUs that support it).")
    fp16: bool = _flag(False, "float16 mixed precision with a gradient scaler (GPU only).")
    fp32: bool = _flag(False, "Full float32 (default on CPU).")
    compile: str = _flag("auto", "torch.compile the model: auto (on for CUDA and ROCm GPUs, off on the CPU), true or "
                                 "false (--compile alone: true). If compiling fails the run goes on uncompiled.",
                         type=parse_switch, nargs="?", const="true", metavar="auto|BOOL")
    no_compile: bool = _flag(False, "Same as --compile=false.")
    peak_tflops: float | None = _flag(None, "Peak TFLOP/s assumed for MFU (default: looked up from the device name).")
    dist_timeout: float = _flag(600.0, "Seconds a process waits for the others (torchrun / accelerate launch) before "
                                       "it stops with an error instead of hanging.")
    parallel: str = _flag("ddp", "How several processes share the model: ddp (each holds all of it: fastest when it "
                                 "fits) or fsdp (FSDP2: parameters, gradients and optimizer state sharded across the "
                                 "processes, for models bigger than one GPU's memory).", choices=["ddp", "fsdp"])
    activation_checkpointing: bool = _flag(False, "Recompute each block's activations in the backward pass instead "
                                                  "of keeping them: far less memory for activations, about a third "
                                                  "more compute.")
    # output, evaluation, checkpoints
    output_dir: str = _flag("./output_single", "Where checkpoints, logs and samples go.")
    overwrite: bool = _flag(False, "Start fresh even though output_dir holds a run: every file the run wrote there "
                                   "(checkpoints, metrics, logs, samples) is removed first; other files are kept.")
    eval_interval: int = _flag(200, "Evaluate (and save) every N optimizer steps.")
    eval_steps: int = _flag(20, "Validation batches per evaluation.")
    log_interval: int = _flag(10, "Print a progress line every N optimizer steps.")
    save_interval: int = _flag(500, "Save the latest checkpoint every N optimizer steps.")
    resume: str | None = _flag(None, "Continue from the latest checkpoint in output_dir, or from a given path. Flags "
                                     "not given keep the values the run used (its text, tokenizer and shape too).",
                               nargs="?", const="latest")
    allow_new_data: bool = _flag(False, "With --resume: continue on text other than the run was trained on (config.json"
                                        " records the change). Without it such a resume is refused.")
    # experiment tracking
    report_to: str = _flag("all", "Where metrics go besides metrics.jsonl: a comma-separated list of "
                                  "tensorboard, wandb, swanlab; all (= tensorboard,wandb) or none.")
    wandb_project: str | None = _flag(None, "wandb project (default: $WANDB_PROJECT, else gpt-training).")
    wandb_entity: str | None = _flag(None, "wandb team or user (default: $WANDB_ENTITY).")
    wandb_run_name: str | None = _flag(None, "Run name for wandb and the TensorBoard folder (default: "
                                             "size-corpus-lr-bs-time).")
    wandb_tags: str = _flag("", "Comma-separated tags added to model size, precision and the hardware (e.g. "
                                "single-gpu, 4-gpus, cpu).")
    wandb_mode: str | None = _flag(None, "wandb mode (default: $WANDB_MODE, else online when a key exists).",
                                   choices=["online", "offline", "disabled"])
    wandb_log_model: bool = _flag(False, "Upload the best and final checkpoints to wandb as a model artifact.")
    swanlab_project: str | None = _flag(None, "SwanLab project (default: $SWANLAB_PROJECT, else gpt-training).")
    swanlab_workspace: str | None = _flag(None, "SwanLab workspace, a user or organisation (default: "
                                                "$SWANLAB_WORKSPACE, else the key's user).")
    swanlab_mode: str | None = _flag(None, "SwanLab mode (default: $SWANLAB_MODE, else cloud when a key exists, "
                                           "offline otherwise).", choices=["cloud", "offline", "disabled"])
    # sampling
    sample_prompts: str | None = _flag(None, "Comma-separated prompts sampled at the end (Chinese default: "
                                             f"{CHINESE_PROMPTS}).")
    sample_tokens: int = _flag(120, "Tokens generated per prompt.")
    temperature: float = _flag(0.8, "Sampling temperature.")
    top_k: int = _flag(50, "Sample among the k most likely tokens (0 disables).")
    top_p: float = _flag(0.95, "Nucleus sampling threshold (1.0 disables).")
    dry_run: bool = _flag(False, "Validate everything, print the resolved config as JSON and exit without training.")

    def __post_init__(self):
        """The one place a TrainConfig's fields are settled: the preset fills the shape flags left unset, the
        optimizer's defaults (OPTIMIZER_DEFAULTS) the flags whose default depends on it, --no_compile becomes
        --compile=false, --init_from selects --tokenizer hf, and ~ in --output_dir and --init_from is expanded.
        Afterwards nothing assigns to a field (a run from --init_from takes its folder's shape in a new TrainConfig:
        hf.settle_init_from)."""
        if self.no_compile:
            if self.compile == "true":
                raise UsageError("--compile and --no_compile contradict each other: give one.")
            object.__setattr__(self, "compile", "false")
            object.__setattr__(self, "no_compile", False)
        if self.init_from:
            object.__setattr__(self, "init_from", os.path.expanduser(self.init_from))
        if self.tokenizer is None:  # the folder's own with --init_from (another one given with it: refused by validate)
            object.__setattr__(self, "tokenizer", "hf" if self.init_from else "char")
        if self.optimizer in OPTIMIZER_DEFAULTS:  # (an unknown one is refused by the parser or validate)
            for name, value in OPTIMIZER_DEFAULTS[self.optimizer].items():
                if getattr(self, name) is None:
                    object.__setattr__(self, name, value)
        preset = MODEL_PRESETS.get(self.model_size)
        for name in ("n_layer", "n_head", "n_embd"):
            if getattr(self, name) is None and preset:
                object.__setattr__(self, name, getattr(preset, name))
        object.__setattr__(self, "output_dir", os.path.expanduser(self.output_dir))

    def model_label(self) -> str:
        """`tiny (6 layers x 384 wide, 6 heads)`; a preset whose shape flags changed says so."""
        shape = ModelShape(self.n_layer, self.n_head, self.n_embd)
        if self.init_from:
            return f"from {self.init_from} ({self.n_layer} layers x {self.n_embd} wide, {self.n_head} heads)"
        changed = "" if shape == MODEL_PRESETS[self.model_size] else " with overrides"
        arch = "" if self.arch == DEFAULT_ARCH else f" {self.arch}"
        return f"{self.model_size}{arch}{changed} ({self.n_layer} layers x {self.n_embd} wide, {self.n_head} heads)"

    @property
    def final_lr(self) -> float:
        return self.learning_rate / 10 if self.min_lr is None else self.min_lr

    def resolved_cache_dir(self) -> str:
        default = os.environ.get("GPT_TRAINER_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "gpt_trainer")
        return os.path.abspath(os.path.expanduser(self.cache_dir or default))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Range:
    """Where a numeric flag's value must lie; every value must also be finite."""
    low: float = -math.inf
    high: float = math.inf
    low_allowed: bool = True  # False: the value must be greater than `low`
    high_allowed: bool = True

    def holds(self, value: float) -> bool:
        return (math.isfinite(value) and (value > self.low or (self.low_allowed and value == self.low))
                and (value < self.high or (self.high_allowed and value == self.high)))

    def describe(self) -> str:
        if self.high == math.inf:
            return f"at least {self.low:g}" if self.low_allowed else f"a finite number greater than {self.low:g}"
        return f"in {'[' if self.low_allowed else '('}{self.low:g}, {self.high:g}{']' if self.high_allowed else ')'}"


AT_LEAST_1, NON_NEGATIVE, POSITIVE = Range(1), Range(0), Range(0, low_allowed=False)
FRACTION_OPEN, FRACTION_BELOW_1 = Range(0, 1, False, False), Range(0, 1, True, False)
# tokens one sample may draw per prompt (--sample_tokens, sample's --tokens): past the model's block of context each
# token is drawn from the last block alone, so longer text is no better than sampling again from its end
MAX_SAMPLE_TOKENS = 10_000
# every numeric flag; a test feeds each of them values outside its range
RANGES = {
    "n_layer": AT_LEAST_1, "n_head": AT_LEAST_1, "n_embd": AT_LEAST_1, "block_size": AT_LEAST_1,
    "dropout": FRACTION_BELOW_1, "vocab_size": Range(2), "train_split": FRACTION_OPEN, "batch_size": AT_LEAST_1,
    "gradient_accumulation_steps": AT_LEAST_1, "epochs": POSITIVE, "max_steps": AT_LEAST_1, "learning_rate": POSITIVE,
    "min_lr": NON_NEGATIVE, "warmup_steps": NON_NEGATIVE, "weight_decay": NON_NEGATIVE, "grad_clip": NON_NEGATIVE,
    "muon_learning_rate": POSITIVE, "muon_momentum": FRACTION_BELOW_1, "muon_weight_decay": NON_NEGATIVE,
    "seed": NON_NEGATIVE, "peak_tflops": POSITIVE, "prepare_workers": NON_NEGATIVE, "eval_interval": AT_LEAST_1,
    "eval_steps": AT_LEAST_1,
    "log_interval": AT_LEAST_1, "save_interval": AT_LEAST_1, "sample_tokens": Range(0, MAX_SAMPLE_TOKENS),
    "temperature": POSITIVE,
    "top_k": NON_NEGATIVE, "top_p": Range(0, 1, low_allowed=False), "max_bad_steps": AT_LEAST_1,
    "dist_timeout": POSITIVE, "global_batch_size": AT_LEAST_1,
}


def validate(cfg: TrainConfig) -> None:
    """Reject inconsistent settings before anything is read or written."""
    chosen = [name for name in ("bf16", "fp16", "fp32") if getattr(cfg, name)]
    if len(chosen) > 1:
        raise UsageError(f"--{chosen[0]} and --{chosen[1]} contradict each other: choose one precision flag.")
    for name, allowed in RANGES.items():
        value = getattr(cfg, name)
        if value is not None and not allowed.holds(value):
            raise UsageError(f"--{name} must be {allowed.describe()} (got {value}).")
    # with --init_from the folder sets the shape (a flag given beside it must agree): hf.settle_init_from checks it
    if cfg.n_embd % cfg.n_head and not cfg.init_from:
        suggestion = cfg.n_head * max(1, round(cfg.n_embd / cfg.n_head))
        raise UsageError(f"n_embd={cfg.n_embd} is not divisible by n_head={cfg.n_head}: each head needs an equal share "
                         f"of the width. Pick --n_embd as a multiple of {cfg.n_head} (e.g. {suggestion}) or change "
                         f"--n_head.")
    if cfg.arch == "llama" and not cfg.n_embd % cfg.n_head and cfg.n_embd // cfg.n_head % 2:
        raise UsageError(f"--arch llama turns each head's dimensions in pairs (rotary positions), but n_embd="
                         f"{cfg.n_embd} / n_head={cfg.n_head} gives heads of {cfg.n_embd // cfg.n_head}, an odd "
                         f"number. Pick --n_embd and --n_head whose quotient is even (e.g. --n_embd "
                         f"{2 * cfg.n_embd}).")
    if cfg.min_lr is not None and cfg.min_lr > cfg.learning_rate:
        raise UsageError(f"--min_lr {cfg.min_lr:g} is above --learning_rate {cfg.learning_rate:g}: the schedule would "
                         f"climb instead of decaying. Give a --min_lr at most the peak (default: a tenth of it).")
    muon_only = [f"--{name}" for name in MUON_FLAGS if getattr(cfg, name) is not None]
    if muon_only and cfg.optimizer != "muon":
        raise UsageError(f"{' and '.join(muon_only)} set Muon, but --optimizer {cfg.optimizer} trains without it: add "
                         f"--optimizer muon, or drop {' and '.join(muon_only)}.")
    if cfg.resume is not None and cfg.overwrite:
        raise UsageError("--resume continues the run in output_dir and --overwrite replaces it: give one of them.")
    if cfg.allow_new_data and cfg.resume is None:
        raise UsageError("--allow_new_data only means something with --resume: add --resume, or drop it.")
    if cfg.global_batch_size is not None and cfg.gradient_accumulation_steps != 1:
        raise UsageError("--global_batch_size sets --gradient_accumulation_steps: give one of them, not both.")
    name = cfg.wandb_run_name
    if name is not None and (not name.strip() or name in (".", "..") or any(c in name for c in "/\\")
                             or any(unicodedata.category(c) in LINE_BREAKS_AND_CONTROLS for c in name)):
        raise UsageError(f"--wandb_run_name {name!r} is also the name of the TensorBoard folder inside output_dir, so "
                         f"it must be a plain name: no / or \\, no line break or other control character, not . or "
                         f".., not empty. Use e.g. tiny-poems-lr3e-4.")
    if cfg.init_from is not None and not cfg.init_from.strip():
        raise UsageError(f"--init_from {cfg.init_from!r} names no folder: give the folder of a transformers GPT-2 "
                         f"model, or drop --init_from to train from scratch.")
    if cfg.tokenizer == "hf" and not cfg.init_from:
        raise UsageError("--tokenizer hf is the tokenizer of a transformers model folder: give --init_from DIR, or "
                         "choose --tokenizer char or sentencepiece.")
    if cfg.init_from and cfg.tokenizer != "hf":
        raise UsageError(f"--init_from trains with the folder's own tokenizer, but --tokenizer {cfg.tokenizer} asks "
                         f"for another: drop --tokenizer.")
    if cfg.data_path and cfg.corpus:
        raise UsageError("--data_path and --corpus both name the training text: give only one.")
    other_text = f"--data_path {cfg.data_path}" if cfg.data_path else (
        f"--corpus {cfg.corpus}" if cfg.corpus and cfg.corpus not in CHINESE_CORPORA else None)
    if cfg.use_chinese and other_text:
        raise UsageError(f"--use_chinese asks for the Chinese poetry corpus, but {other_text} names other text. "
                         f"Drop --use_chinese to train on that text, or drop {other_text.split()[0]}.")


# ---- command line ---------------------------------------------------------------------------------------------------
_TRUE = {"1", "true", "yes", "y", "on", "t"}
_FALSE = {"0", "false", "no", "n", "off", "f"}


def parse_bool(text: str) -> bool:
    lowered = str(text).strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean such as true/false or 1/0, got {text!r}")


class _UsageErrorParser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print usage and exit 2; we keep one error path for all bad input
        raise UsageError(f"{message}. Run with --help to see every flag.")


# the flags that say which text and tokens a run trains on (python -m gpt_trainer.prepare takes these alone)
DATA_FLAGS = ("use_chinese", "data_path", "corpus", "cache_dir", "text_field", "prepare_workers", "tokenizer",
              "vocab_size", "train_split", "seed", "init_from")


OTHER_COMMANDS = ("other commands (python -m gpt_trainer COMMAND --help): sample CHECKPOINT (text from a checkpoint); "
                  "export CHECKPOINT OUT_DIR (a Hugging Face transformers folder); sweep FILE (a local "
                  "hyper-parameter sweep); prepare (the token cache ahead of time); doctor (check this machine); "
                  "benchmark (tokens/s and MFU); demo (a small run that learns)")


def program_name() -> str:
    """What the user ran, for the usage line: gpt-train, train_single_gpu.py, or `python -m gpt_trainer[.demo]` (for
    which Python's argv[0] is a file inside the package, and argparse would say `__main__.py` or `demo.py`)."""
    ran = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path("train_single_gpu.py")
    package = Path(__file__).resolve().parent
    try:
        module = ran.resolve().with_suffix("").relative_to(package).parts
    except ValueError:  # a script or an entry point outside the package
        return ran.name
    return "python -m " + ".".join(part for part in (package.name, *module) if part != "__main__")


def build_parser(only: tuple[str, ...] | None = None, prog: str | None = None,
                 description: str = "Train a small GPT from scratch on one GPU or the CPU.") -> argparse.ArgumentParser:
    """The command line of every TrainConfig field (or of the fields `only` names)."""
    parser = _UsageErrorParser(
        prog=prog or program_name(),
        allow_abbrev=False,  # `--learn 1e-3` must not silently mean --learning_rate
        description=description,
        epilog=None if only else OTHER_COMMANDS,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if only is not None and f.name not in only:
            continue
        kwargs = dict(f.metadata)
        annotation = hints[f.name]
        inner = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
        if inner[0] is bool:
            kwargs.update(nargs="?", const=True, type=parse_bool, metavar="BOOL")
        elif "const" not in kwargs:
            kwargs.setdefault("type", inner[0])
        parser.add_argument(f"--{f.name}", default=f.default, **kwargs)
    return parser


def given_flags(argv: list[str]) -> frozenset[str]:
    """The flags written on the command line (on --resume, the others keep the values the run used)."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return frozenset(name for token in argv if token.startswith("--")
                     and (name := token[2:].split("=", 1)[0]) in names)


def parse_args(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> TrainConfig:
    """`parser`: build_parser()'s, built once by a caller that checks many command lines (a sweep's trials)."""
    cfg = TrainConfig(**vars((parser or build_parser()).parse_args(argv)))
    validate(cfg)
    return cfg


def flag_table() -> str:
    """The Markdown rows of the flag tables in docs/flags.md and docs/zh-CN/flags.md, generated from the parser:
    `./dev.sh flags` writes them between the `<!-- flags -->` markers, and a test fails when a page drifts from it."""
    rows = []
    for action in build_parser()._actions:
        if not action.option_strings or action.dest == "help":
            continue
        default = "—" if action.default in (None, "") else f"`{action.default}`"
        choices = f" One of: {', '.join(action.choices)}." if action.choices else ""
        rows.append(f"| `{action.option_strings[0]}` | {default} | {action.help}{choices} |")
    return "\n".join(rows) + "\n"
