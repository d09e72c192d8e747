#!/usr/bin/env bash
# Set-up and everyday commands for a fresh Debian/Ubuntu machine (CPU is fine):
#   ./dev.sh demo   make .venv, install everything, train a small GPT on Chinese poems (2 min on 2 CPU cores), print samples
#   ./dev.sh test   make .venv, install everything, lint (ruff), run the test suite (extra arguments go to pytest,
#                   e.g. ./dev.sh test -m "not slow" for the quick loop)
#   ./dev.sh tensorboard [LOGDIR]   serve TensorBoard from .venv on http://localhost:6006 (default: output_demo/logs)
#   ./dev.sh flags  rewrite the flag tables in docs/flags.md and docs/zh-CN/flags.md from the parser
#   ./dev.sh faults SIGKILL a small run 20 times, resume it each time, check nothing was lost or doubled (~2 minutes)
#   ./dev.sh container-test   build and run the Docker image for real (needs root; installs Docker; ~10 minutes)
#   ./dev.sh slurm-test   the Slurm recipes on a real two-node Slurm cluster started here (needs root; installs Slurm)
#   ./dev.sh gpu-check   on a GPU machine: the GPU-only tests, a two-process FSDP run (2+ GPUs), the benchmark; prints
#                   a section for BENCHMARKS.md (under 8 min on one H100/H200). Without a GPU it says so and exits 0
# TORCH_VERSION picks the PyTorch release; TORCH_INDEX_URL, if set, is passed to pip for torch alone (e.g. PyTorch's
# CPU-only wheel index, which is far smaller than the default CUDA build; a ROCm index on AMD GPUs).
set -euo pipefail
cd "$(dirname "$0")"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
VENV="${VENV:-.venv}"

setup() {
  if ! python3 -m venv --help >/dev/null 2>&1 || ! python3 -c "import ensurepip" 2>/dev/null; then
    echo "python3-venv is missing; installing it with apt-get" >&2
    if [ "$(id -u)" -eq 0 ]; then apt-get update -qq && apt-get install -y -qq python3-venv python3-pip
    else sudo apt-get update -qq && sudo apt-get install -y -qq python3-venv python3-pip; fi
  fi
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  local py="$VENV/bin/python"
  if ! "$py" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
    # torch first and pinned: an unpinned resolve would pull a multi-GB GPU build
    "$py" -m pip install -q ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==$TORCH_VERSION"
  fi
  "$py" -m pip install -q -e ".[dev]"
}

case "${1:-}" in
  demo)
    setup
    "$VENV/bin/python" -m gpt_trainer.demo "${@:2}"  # its flags are in gpt_trainer/demo.py
    ;;
  tensorboard)
    setup
    "$VENV/bin/tensorboard" --logdir "${2:-output_demo/logs}" --port 6006
    ;;
  test)
    setup
    "$VENV/bin/ruff" check gpt_trainer tests tools docker train_single_gpu.py
    bash -n tools/slurm_cluster.sh examples/slurm/train.sbatch examples/slurm/sweep.sbatch
    "$VENV/bin/python" -m pytest -q "${@:2}"
    ;;
  faults)
    setup
    "$VENV/bin/python" tools/fault_injection.py "${@:2}"
    ;;
  flags)
    setup
    "$VENV/bin/python" tools/readme_flags.py
    ;;
  container-test)
    setup  # hadolint comes with the dev tools
    PATH="$PWD/$VENV/bin:$PATH" bash tests/test_container.sh
    ;;
  slurm-test)
    setup
    "$VENV/bin/python" -m tests.slurm_stage
    ;;
  gpu-check)
    setup
    "$VENV/bin/python" tools/gpu_check.py "${@:2}"
    ;;
  *)
    sed -n '2,14p' "$0" >&2
    exit 2
    ;;
esac
