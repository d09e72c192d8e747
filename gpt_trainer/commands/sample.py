"""Generate text from a checkpoint alone (the tokenizer and config travel inside it).

    python -m gpt_trainer.sample output_single/checkpoints/best.pt --prompts 春江,往事 --tokens 200

A sharded checkpoint (an --parallel fsdp run's folder, checkpoints/latest or best) is consolidated on the CPU in this
one process; a run's output_dir stands for its latest checkpoint, whatever its kind.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ..config import MAX_SAMPLE_TOKENS, RANGES, TrainConfig
from ..data.tokenizer import tokenizer_from_dict
from ..errors import UsageError
from ..model.gpt import GPT, build_model, stream_text
from ..system.hardware import pick_device, resolve_precision
from ..train import checkpoint
from .failures import AGAIN, run_cli


CHECKPOINT_HELP = ("a checkpoint written by training: a .pt file, the folder of a sharded one (--parallel fsdp), or "
                   "a run's output_dir (its latest checkpoint)")


def checkpoint_path(given: Path) -> Path:
    """The checkpoint a command was pointed at (checkpoint.checkpoint_at), or a sentence saying there is none."""
    path = checkpoint.checkpoint_at(given)
    if path is None:
        raise UsageError(f"{given}: no such checkpoint (there is no such file, and it is not a readable checkpoint "
                         f"folder or run folder). Give a checkpoint written by training: a .pt file (a run's "
                         f"checkpoints/best.pt or latest.pt), the folder of a sharded one (checkpoints/best or latest "
                         f"of an --parallel fsdp run), or a run's output_dir (its latest checkpoint).")
    return path


def model_from_checkpoint(state: dict, device: torch.device, path: Path) -> GPT:
    """The checkpoint's model; a file whose weights do not fit the shape it records (edited or foreign) is refused."""
    try:
        model = build_model(state["config"], state["vocab_size"], device)
        model.load_state_dict(state["model"])
    except (KeyError, RuntimeError, TypeError, ValueError) as e:
        raise UsageError(f"{path} does not hold the weights its configuration describes ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:300]}). Use another checkpoint of the run.") from None
    return model


def sample_command(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpt_trainer.sample", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help=CHECKPOINT_HELP)
    parser.add_argument("--prompts", default="春江,往事", help="comma-separated prompts")
    parser.add_argument("--tokens", type=int, default=200, help="tokens generated per prompt")
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top_k", type=int, default=50)
    parser.add_argument("--top_p", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    args = parser.parse_args(argv)
    if args.tokens > MAX_SAMPLE_TOKENS:
        raise UsageError(f"--tokens {args.tokens:,} is more than one sample draws ({MAX_SAMPLE_TOKENS:,} per prompt): "
                         f"past the model's block of context each token is drawn from the last block alone, so longer "
                         f"text is no better than sampling again with the end of this one as --prompts.")
    # the same ranges as the training flags that mean the same (--tokens is --sample_tokens there)
    for flag, value, allowed in (("tokens", args.tokens, RANGES["sample_tokens"]), *(
            (name, getattr(args, name), RANGES[name]) for name in ("temperature", "top_k", "top_p", "seed"))):
        if value is not None and not allowed.holds(value):
            raise UsageError(f"--{flag} must be {allowed.describe()} (got {value}).")
    device = pick_device(args.device)
    path = checkpoint_path(Path(args.checkpoint).expanduser())
    state = checkpoint.load(path, device)
    model = model_from_checkpoint(state, device, path)
    tokenizer = tokenizer_from_dict(state["tokenizer"])
    precision = resolve_precision(TrainConfig(), device)  # the device's default: fp32 on CPU, bf16/fp16 on GPU
    if args.seed is not None:
        torch.manual_seed(args.seed)
    for prompt in args.prompts.split(","):
        print(f"--- {prompt!r} ---", flush=True)
        for piece in stream_text(model, tokenizer, prompt, precision, args.tokens, args.temperature, args.top_k,
                                 args.top_p):
            print(piece, end="", flush=True)  # as it is drawn: a long sample shows its progress
        print("\n", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(sample_command, argv, AGAIN)


if __name__ == "__main__":
    sys.exit(main())
