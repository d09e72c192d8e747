"""Check that this machine or container can train: versions, GPU backend and devices, bf16, free GPU memory,
trackers, where the wandb key would come from (never the key), and writable output and wandb folders.

    python -m gpt_trainer.doctor [--output_dir DIR] [--require_gpu]

Exit code 0 when everything required is present, 1 otherwise (the container's health check uses this)."""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import shutil
import sys
import tempfile
from pathlib import Path

REQUIRED = ("torch", "numpy", "sentencepiece", "tqdm")
OPTIONAL = ("tensorboard", "wandb", "swanlab", "accelerate")


def version_of(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def writable(folder: Path) -> bool:
    """True when a file can really be created there (os.access is wrong for root and for some mounts)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def gpu_lines(require_gpu: bool) -> tuple[list[str], list[str]]:
    import torch

    from .hardware import bf16_supported, cpu_has_bf16, find_peak

    lines, problems = [], []
    backend = f"ROCm/HIP {torch.version.hip}" if torch.version.hip else (
        f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU only")
    lines.append(f"torch build:   {torch.__version__} ({backend})")
    if not torch.cuda.is_available():
        lines.append(f"GPU:           none visible (CPU bf16: {'yes' if cpu_has_bf16() else 'no'})")
        if require_gpu:
            problems.append("no GPU is visible: check the driver, and pass the GPU to the container "
                            "(--gpus all for NVIDIA; --device /dev/kfd --device /dev/dri for AMD)")
        return lines, problems
    for i in range(torch.cuda.device_count()):
        device = torch.device("cuda", i)
        free, total = torch.cuda.mem_get_info(device)
        peak = find_peak(torch.cuda.get_device_name(device))
        lines.append(f"GPU {i}:         {torch.cuda.get_device_name(device)} | {free / 2**30:.1f} of "
                     f"{total / 2**30:.1f} GiB free | bf16: {'yes' if bf16_supported(device) else 'no (use --fp16)'} | "
                     + (f"MFU peak: {peak.name} data sheet" if peak else "MFU peak: unknown part, pass --peak_tflops"))
    return lines, problems


def compiler_line() -> str:
    """torch.compile builds kernels at run time: inductor needs a C++ compiler on the CPU, Triton a C compiler."""
    found = [shutil.which(name) for name in ("cc", "gcc", "c++", "g++", "clang")]
    found = [path for path in found if path]
    if found:
        return f"C compiler:    {found[0]} (torch.compile can build its kernels)"
    return "C compiler:    none found (--compile falls back to running uncompiled; install gcc and g++)"


def diagnose(output_dir: Path, require_gpu: bool = False) -> tuple[list[str], list[str]]:
    """(report lines, problems); no problem means ready to train."""
    lines = [f"python:        {sys.version.split()[0]} at {sys.executable}"]
    problems = []
    for package in REQUIRED + OPTIONAL:
        version = version_of(package)
        lines.append(f"{package + ':':<15}{version or 'NOT INSTALLED'}")
        if version is None and package in REQUIRED:
            problems.append(f"{package} is not installed")
    if version_of("torch"):
        gpu, gpu_problems = gpu_lines(require_gpu)
        lines += gpu
        problems += gpu_problems
    lines.append(compiler_line())
    from .tracking.wandb import wandb_key_source

    source = wandb_key_source()
    lines.append(f"wandb key:     {'from ' + source if source else 'none found (runs log offline; wandb sync later)'}")
    lines.append(f"wandb mode:    {os.environ.get('WANDB_MODE') or 'online when a key exists'}")
    from .tracking.swanlab import swanlab_key_source

    source = swanlab_key_source()
    lines.append(f"swanlab key:   {'from ' + source if source else 'none found (runs log offline; swanlab sync)'}")
    wandb_dir = Path(os.environ.get("WANDB_DIR") or output_dir)
    for label, folder in (("output dir", output_dir), ("wandb dir", wandb_dir)):
        ok = writable(folder)
        lines.append(f"{label + ':':<15}{folder} ({'writable' if ok else 'NOT WRITABLE'})")
        if not ok:
            problems.append(f"{label} {folder} is not writable by uid {os.getuid()}: fix the mount's owner or run as "
                            f"its owner (docker run --user $(id -u):$(id -g))")
    return lines, problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpt_trainer.doctor", description=__doc__.split("\n")[0])
    parser.add_argument("--output_dir", default=os.environ.get("GPT_TRAINER_OUTPUT", "."),
                        help="the folder training will write to (default: $GPT_TRAINER_OUTPUT or .)")
    parser.add_argument("--require_gpu", action="store_true", help="fail when no GPU is visible")
    parser.add_argument("--quiet", action="store_true", help="print only problems")
    args = parser.parse_args(argv)
    lines, problems = diagnose(Path(args.output_dir), args.require_gpu)
    if not args.quiet:
        print("\n".join(lines))
    for problem in problems:
        print(f"PROBLEM: {problem}", file=sys.stderr)
    if not args.quiet:
        print("ready to train" if not problems else f"{len(problems)} problem(s) found")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
