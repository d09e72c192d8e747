#!/usr/bin/env bash
# The Dockerfile's build steps, one verb per layer, in dependency order (run only inside `docker build`):
#   system    apt packages (fortunes-zh; a C/C++ compiler and Python headers for torch.compile) and the trainer user
#   python    the pinned packages, into the environment that already imports the base's torch
#   package   this package and the files users start from
set -euo pipefail

die() { echo "ERROR: $*" >&2; exit 1; }

# The interpreter that imports the base's torch: python3/python on PATH first, then where vendor images keep theirs.
torch_python() {
  local candidate
  for candidate in "$(command -v python3 || true)" "$(command -v python || true)" /opt/conda/bin/python /opt/venv/bin/python; do
    if [ -x "$candidate" ] && "$candidate" -c "import torch" 2>/dev/null; then echo "$candidate"; return 0; fi
  done
  return 1
}

# PEP 668: a system Python marked EXTERNALLY-MANAGED (Debian 12, Ubuntu 24.04+) belongs to apt; venvs are exempt.
externally_managed() {
  "$1" -c 'import os, sys, sysconfig
sys.exit(sys.prefix != sys.base_prefix or not os.path.isfile(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")))'
}

torch_identity() {  # what must not change: release, GPU runtime and the files it is loaded from
  "$1" -c "import torch; print(torch.__version__, torch.version.cuda, torch.version.hip, torch.__file__)"
}

# The base's torch interpreter; without one only the CPU variant goes on (it installs torch into the base's python3).
base_python() {
  torch_python && return 0
  [ -n "${TORCH_INSTALL:-}" ] || die "the base image has no Python that can import torch. A GPU image must take torch \
from its base (a torch installed here would not match the base's ROCm or CUDA), so nothing is installed in its place. \
Use a base that ships PyTorch (./build_docker_image.sh --help lists them; --base-image picks another), or --backend cpu."
  command -v python3 || die "the base image has no python3"
}

system() {
  local py version include packages=(fortunes-zh)
  py=$(base_python)
  version=$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  include=$("$py" -c 'import sysconfig; print(sysconfig.get_path("include"))')
  # torch.compile compiles kernels when a run starts (inductor: C++ on the CPU; Triton's launcher on GPUs); the
  # vendors' runtime images ship no compiler
  command -v cc >/dev/null && command -v c++ >/dev/null || packages+=(gcc g++)
  apt-get update
  if [ ! -f "$include/Python.h" ] && apt-cache show "python$version-dev" >/dev/null 2>&1; then packages+=("python$version-dev"); fi
  if externally_managed "$py" && ! "$py" -c "import ensurepip" 2>/dev/null; then packages+=("python$version-venv"); fi
  apt-get install -y --no-install-recommends "${packages[@]}"
  rm -rf /var/lib/apt/lists/*
  [ -f "$include/Python.h" ] || echo "WARNING: no Python.h for $py in $include: --compile will fail in this image" >&2
  # a home and folders that any UID may write, so `docker run --user $(id -u):$(id -g)` works
  useradd --create-home --non-unique --uid "${APP_UID:-1000}" --shell /bin/bash trainer
  mkdir -p /workspace/output /workspace/cache /home/trainer/.config/wandb
  chmod 1777 /workspace/output /workspace/cache /home/trainer /home/trainer/.config /home/trainer/.config/wandb
}

python_env() {
  local py before after
  py=$(base_python)
  if externally_managed "$py"; then  # leave the system's Python to apt; this venv still sees the base's packages
    "$py" -m venv --system-site-packages /opt/gpt-env
    py=/opt/gpt-env/bin/python
  fi
  if ! "$py" -c "import torch" 2>/dev/null; then  # only the CPU variant gets here (TORCH_INSTALL names the wheel index)
    # shellcheck disable=SC2086  # TORCH_INSTALL holds pip options
    "$py" -m pip install --no-cache-dir $TORCH_INSTALL "torch==$TORCH_VERSION"
  fi
  echo "packages go into $py ($(torch_identity "$py"))"
  before=$(torch_identity "$py")
  "$py" -c "import torch; print(f'torch=={torch.__version__}')" > /tmp/constraints.txt
  "$py" -c "import numpy; print(f'numpy=={numpy.__version__}')" >> /tmp/constraints.txt 2>/dev/null || true
  "$py" -m pip install --no-cache-dir -c /tmp/constraints.txt -r /tmp/requirements-image.txt
  "$py" -m pip install --no-cache-dir --no-deps -r /tmp/requirements-nodeps.txt
  after=$(torch_identity "$py")
  [ "$before" = "$after" ] || die "installing the packages changed the base's torch: $before -> $after"
  rm /tmp/constraints.txt
  for name in python python3; do  # what users, the health check and a sweep agent (literal `python`) will run
    "$name" -c "import torch, wandb" 2>/dev/null \
      || die "'$name' on PATH ($(command -v $name || echo missing)) is not $py, the interpreter that holds torch"
  done
}

package() {
  python -m pip install --no-cache-dir --no-deps --no-build-isolation /opt/gpt-trainer
  rm -rf /opt/gpt-trainer/build /opt/gpt-trainer/*.egg-info
  cp /opt/gpt-trainer/train_single_gpu.py /opt/gpt-trainer/sweep_config.yaml /workspace/
  cp -r /opt/gpt-trainer/examples /workspace/
  if [ -n "${PRELOAD_CORPUS:-}" ]; then
    GPT_TRAINER_CACHE=/workspace/cache python -m gpt_trainer --corpus "$PRELOAD_CORPUS" --dry_run --output_dir /tmp/preload >/dev/null
    rm -rf /tmp/preload
  fi
  chmod -R a+rwX /workspace/cache
}

case "${1:-}" in
  system) system ;;
  python) python_env ;;
  package) package ;;
  *) die "usage: $0 system|python|package" ;;
esac
