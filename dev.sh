#!/usr/bin/env bash
# Set-up and everyday commands for a fresh Debian/Ubuntu machine (CPU is fine):
#   ./dev.sh demo   make .venv, install PyTorch and this package, train a small GPT on Chinese poems (2 min on 2 CPU
#                   cores), print samples
#   ./dev.sh setup  only make .venv with PyTorch and this package (what the demo needs); then `. .venv/bin/activate`
#   ./dev.sh test   as setup, plus the test tools (.[dev]), then lint (ruff) and run the test suite (extra arguments go
#                   to pytest, e.g. ./dev.sh test -m "not slow" for the quick loop)
#   ./dev.sh tensorboard [LOGDIR] [TENSORBOARD FLAGS...]   serve TensorBoard from .venv on http://localhost:6006
#                   (default LOGDIR: output_demo/logs; flags such as --bind_all or --port 6007 go to TensorBoard)
#   ./dev.sh torch-build   print which PyTorch build ./dev.sh installs here, and why, without installing anything
#   ./dev.sh flags  rewrite the flag tables in docs/flags.md and docs/zh-CN/flags.md from the parser
#   ./dev.sh faults SIGKILL a small run 20 times, resume it each time, check nothing was lost or doubled (~2 minutes)
#   ./dev.sh container-test   build and run the Docker image for real (needs root; installs Docker; ~10 minutes)
#   ./dev.sh slurm-test   the Slurm recipes on a real two-node Slurm cluster started here (needs root; installs Slurm)
#   ./dev.sh gpu-check   on a GPU machine: the GPU-only tests, a two-process FSDP run (2+ GPUs), the benchmark; prints
#                   a section for BENCHMARKS.md (under 8 min on one H100/H200). Without a GPU it says so and exits 0
# Which PyTorch: an NVIDIA GPU (nvidia-smi -L works, or /dev/nvidia0) gets PyPI's default build (CUDA), an AMD GPU
# (/dev/kfd, or rocminfo works) PyTorch's ROCm index, anything else PyTorch's CPU index (the default build is GBs of
# CUDA libraries a CPU never uses). TORCH_INDEX_URL always wins: a URL is passed to pip for torch alone, and an empty
# TORCH_INDEX_URL= means pip's own configuration (PyPI, or your mirror). TORCH_VERSION picks the release. A torch
# already in .venv at that version is kept; to change the build, remove .venv.
set -euo pipefail
cd "$(dirname "$0")"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
VENV="${VENV:-.venv}"
CPU_INDEX="https://download.pytorch.org/whl/cpu"
ROCM_INDEX="https://download.pytorch.org/whl/rocm6.4"
DEV_DIR="${GPT_TRAINER_DEV_DIR:-/dev}"  # where the GPU device files are looked for (tests point it at a stand-in)

# Sets TORCH_INDEX (empty: pip's own sources) and TORCH_WHY, the sentence that says which build and why.
choose_torch_build() {
  local keep="set TORCH_INDEX_URL to choose another"
  if [ -n "${TORCH_INDEX_URL+set}" ]; then
    TORCH_INDEX="$TORCH_INDEX_URL"
    TORCH_WHY="the build from ${TORCH_INDEX_URL:-"pip's own configuration"} (TORCH_INDEX_URL is set)"
  elif nvidia-smi -L >/dev/null 2>&1 || [ -e "$DEV_DIR/nvidia0" ]; then
    TORCH_INDEX=""
    TORCH_WHY="default PyPI build, for CUDA (an NVIDIA GPU found); $keep"
  elif [ -e "$DEV_DIR/kfd" ] || rocminfo >/dev/null 2>&1; then
    TORCH_INDEX="$ROCM_INDEX"
    TORCH_WHY="ROCm build from $ROCM_INDEX (an AMD GPU found); $keep"
  else
    TORCH_INDEX="$CPU_INDEX"
    TORCH_WHY="CPU build (no NVIDIA or AMD GPU found); $keep"
  fi
}

# An index we chose that cannot be reached (an offline machine with a wheel on disk, a mirror) falls back to pip's
# own configuration, said aloud, instead of pip retrying the index for every package.
reachable_or_pip_default() {
  [ -n "$TORCH_INDEX" ] && [ -z "${TORCH_INDEX_URL+set}" ] || return 0
  local why
  why=$(python3 -c 'import sys, urllib.request
try:
    urllib.request.urlopen(sys.argv[1], timeout=10)
except OSError as e:
    print(getattr(e, "reason", e))' "$TORCH_INDEX/")
  [ -z "$why" ] && return 0
  echo "$TORCH_INDEX cannot be reached ($why); installing torch==$TORCH_VERSION from pip's own configuration" \
    "instead (a wheel on disk, your mirror, or PyPI)" >&2
  TORCH_INDEX=""
}

install_torch() {
  local py="$VENV/bin/python" installed
  installed=$("$py" -c "import importlib.metadata as m; print(m.version('torch').split('+')[0])" 2>/dev/null || true)
  [ "$installed" = "$TORCH_VERSION" ] && return 0
  choose_torch_build
  echo "installing PyTorch $TORCH_VERSION, $TORCH_WHY" >&2
  reachable_or_pip_default
  # torch first and pinned: an unpinned resolve would pull a multi-GB GPU build
  "$py" -m pip install -q ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} "torch==$TORCH_VERSION"
}

# What pip installs depends on pyproject.toml, the extras and the torch release; unchanged, pip is not run again.
install_hash() {
  { cat pyproject.toml; echo "$1 $TORCH_VERSION"; } |
    python3 -c 'import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())'
}

# setup [dev]: .venv with torch and this package; with dev, the test tools too. A dev install serves the demo as well.
setup() {
  local extras="${1:-}" want
  if [ ! -x "$VENV/bin/python" ]; then
    need_venv_module
    python3 -m venv "$VENV"
  fi
  install_torch
  want=$(install_hash "$extras")
  [ "$(cat "$VENV/.installed-${extras:-base}" 2>/dev/null)" = "$want" ] && return 0
  [ -z "$extras" ] && [ "$(cat "$VENV/.installed-dev" 2>/dev/null)" = "$(install_hash dev)" ] && return 0
  echo "installing this package into $VENV: pip install -e .${extras:+[$extras]}" >&2
  "$VENV/bin/python" -m pip install -q -e ".${extras:+[$extras]}"
  echo "$want" > "$VENV/.installed-${extras:-base}"
}

need_venv_module() {
  python3 -m venv --help >/dev/null 2>&1 && python3 -c "import ensurepip" 2>/dev/null && return 0
  echo "python3-venv is missing; installing it with apt-get" >&2
  if [ "$(id -u)" -eq 0 ]; then apt-get update -qq && apt-get install -y -qq python3-venv python3-pip
  else sudo apt-get update -qq && sudo apt-get install -y -qq python3-venv python3-pip; fi
}

# serve_tensorboard [LOGDIR] [FLAGS...]: our log folder and port unless the flags name their own; the arguments
# are checked before anything is installed.
serve_tensorboard() {
  local logdir="" has_logdir="" has_port="" arg
  if [ $# -gt 0 ] && [[ "$1" != -* ]]; then logdir="$1"; shift; fi
  for arg in "$@"; do
    case "$arg" in
      --logdir|--logdir=*|--logdir_spec|--logdir_spec=*) has_logdir=1 ;;
      --port|--port=*) has_port=1 ;;
    esac
  done
  if [ -n "$logdir" ] && [ -n "$has_logdir" ]; then
    echo "./dev.sh tensorboard: the log folder is given twice ($logdir and a --logdir flag); give it once" >&2
    exit 2
  fi
  [ -n "$has_logdir" ] || set -- --logdir "${logdir:-output_demo/logs}" "$@"
  [ -n "$has_port" ] || set -- "$@" --port 6006
  setup
  exec "$VENV/bin/tensorboard" "$@"
}

# A subcommand without arguments refuses any instead of ignoring them.
no_arguments() {
  [ $# -le 1 ] && return 0
  echo "./dev.sh $1 takes no arguments, and was given: ${*:2}" >&2
  exit 2
}

case "${1:-}" in
  demo)
    setup
    "$VENV/bin/python" -m gpt_trainer.demo "${@:2}"  # its flags are in gpt_trainer/commands/demo.py
    ;;
  setup)
    no_arguments "$@"
    setup
    ;;
  tensorboard)
    serve_tensorboard "${@:2}"  # checks its arguments, then sets up
    ;;
  torch-build)
    no_arguments "$@"
    choose_torch_build
    echo "PyTorch $TORCH_VERSION, $TORCH_WHY"
    ;;
  test)
    setup dev
    "$VENV/bin/ruff" check gpt_trainer tests tools docker train_single_gpu.py
    bash -n tools/slurm_cluster.sh examples/slurm/train.sbatch examples/slurm/sweep.sbatch
    "$VENV/bin/python" -m pytest -q "${@:2}"
    ;;
  faults)
    setup dev
    "$VENV/bin/python" tools/fault_injection.py "${@:2}"
    ;;
  flags)
    no_arguments "$@"
    setup dev
    "$VENV/bin/python" tools/readme_flags.py
    ;;
  container-test)
    no_arguments "$@"
    setup dev  # hadolint comes with the dev tools
    PATH="$PWD/$VENV/bin:$PATH" bash tests/test_container.sh
    ;;
  slurm-test)
    no_arguments "$@"
    setup dev
    "$VENV/bin/python" -m tests.slurm_stage
    ;;
  gpu-check)
    setup dev
    "$VENV/bin/python" tools/gpu_check.py "${@:2}"
    ;;
  *)
    sed -n '2,/^set -euo/p' "$0" | grep '^#' >&2
    exit 2
    ;;
esac
