"""Generate text from a checkpoint alone (the tokenizer and config travel inside it).

    python -m gpt_trainer.sample output_single/checkpoints/best.pt --prompts 春江,往事 --tokens 200
"""

from __future__ import annotations

import argparse
import sys

import torch

from . import checkpoint
from .config import TrainConfig
from .errors import notice, run_cli
from .hardware import autocast, pick_device, resolve_precision
from .model import GPT, GPTConfig
from .tokenizer import tokenizer_from_dict


def generate_text(model: GPT, tokenizer, prompt: str, device: torch.device, precision: str, tokens: int,
                  temperature: float, top_k: int, top_p: float, generator: torch.Generator | None = None) -> str:
    ids, dropped = tokenizer.encode_known(prompt)
    if dropped:
        notice(f"note: the prompt characters {dropped!r} are not in the vocabulary and were left out.")
    if not ids:
        ids = tokenizer.encode_known("\n")[0] or [0]
    was_training = model.training
    model.eval()
    with autocast(device, precision):
        out = model.generate(torch.tensor([ids], device=device), tokens, temperature, top_k, top_p, generator)
    model.train(was_training)
    return tokenizer.decode(out[0].tolist())


def model_from_checkpoint(state: dict, device: torch.device) -> GPT:
    c = state["config"]
    model = GPT(GPTConfig(state["vocab_size"], c["block_size"], c["n_layer"], c["n_head"], c["n_embd"]))
    model.load_state_dict(state["model"])
    return model.to(device)


def sample_command(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpt_trainer.sample", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="a .pt file written by training")
    parser.add_argument("--prompts", default="春江,往事", help="comma-separated prompts")
    parser.add_argument("--tokens", type=int, default=200, help="tokens generated per prompt")
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top_k", type=int, default=50)
    parser.add_argument("--top_p", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    state = checkpoint.load(args.checkpoint, device)
    model = model_from_checkpoint(state, device)
    tokenizer = tokenizer_from_dict(state["tokenizer"])
    precision = resolve_precision(TrainConfig(), device)  # the device's default: fp32 on CPU, bf16/fp16 on GPU
    if args.seed is not None:
        torch.manual_seed(args.seed)
    for prompt in args.prompts.split(","):
        text = generate_text(model, tokenizer, prompt, device, precision, args.tokens, args.temperature, args.top_k,
                             args.top_p)
        print(f"--- {prompt!r} ---\n{text}\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(sample_command, argv)


if __name__ == "__main__":
    sys.exit(main())
