"""Train a small GPT on one GPU (CUDA or ROCm) or the CPU, and watch it learn."""

__version__ = "0.1.0"
