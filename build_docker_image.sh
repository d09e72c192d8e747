#!/usr/bin/env bash
# Build the training image for AMD (ROCm), NVIDIA (CUDA) or the CPU. Run with --help for the options.
set -euo pipefail
cd "$(dirname "$0")"

# Every backend runs torch 2.13.0, the release the tests run on (the Dockerfile says why these tags).
ROCM_BASE="rocm/pytorch:rocm10.0_ubuntu24.04_py3.13_pytorch_release_2.13.0"
CUDA_BASE="pytorch/pytorch:2.13.0-cuda12.6-cudnn9-runtime"
CPU_BASE="python:3.12-slim-bookworm"
CPU_TORCH_INDEX="https://download.pytorch.org/whl/cpu"  # CPU-only wheels: the default Linux wheel brings GBs of CUDA

usage() {
  cat <<USAGE
Usage: ./build_docker_image.sh [--backend rocm|cuda|cpu] [--tag NAME] [--base-image IMAGE] [-- DOCKER_BUILD_ARGS...]

  --backend     rocm (default), cuda or cpu; picks the base image that already contains PyTorch:
                  rocm: $ROCM_BASE
                  cuda: $CUDA_BASE
                  cpu:  $CPU_BASE (torch 2.13.0 installed on top from $CPU_TORCH_INDEX)
                A GPU base must already hold torch: the build stops rather than install one
  --tag         image name (default: gpt-trainer:<backend>)
  --base-image  use another base image (a newer vendor tag, or a local one)
  --help        show this help
Anything after -- goes to docker build, e.g. -- --build-arg PRELOAD_CORPUS=song_ci
USAGE
}

fail() { echo "error: $1" >&2; usage >&2; exit 2; }

backend=rocm tag="" base=""
while [ $# -gt 0 ]; do
  case "$1" in
    --backend) [ $# -ge 2 ] || fail "--backend needs a value"; backend="$2"; shift 2 ;;
    --backend=*) backend="${1#*=}"; shift ;;
    --tag) [ $# -ge 2 ] || fail "--tag needs a value"; tag="$2"; shift 2 ;;
    --tag=*) tag="${1#*=}"; shift ;;
    --base-image) [ $# -ge 2 ] || fail "--base-image needs a value"; base="$2"; shift 2 ;;
    --base-image=*) base="${1#*=}"; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) fail "unknown argument '$1'" ;;
  esac
done

torch_install=""
case "$backend" in
  rocm) default_base="$ROCM_BASE" ;;
  cuda) default_base="$CUDA_BASE" ;;
  cpu) default_base="$CPU_BASE" torch_install="--index-url $CPU_TORCH_INDEX" ;;
  *) fail "--backend must be rocm, cuda or cpu (got '$backend')" ;;
esac
base="${base:-$default_base}"
tag="${tag:-gpt-trainer:$backend}"
command -v docker >/dev/null || { echo "error: docker is not installed or not on PATH" >&2; exit 1; }

echo "building $tag on $base"
docker build --build-arg "BASE_IMAGE=$base" --build-arg "TORCH_INSTALL=$torch_install" -t "$tag" "$@" .

mounts='-v "$PWD/output:/workspace/output" -v "$HOME/.netrc:/home/trainer/.netrc:ro" -v "$HOME/.config/wandb:/home/trainer/.config/wandb"'
user='--user "$(id -u):$(id -g)"'
case "$backend" in
  rocm) gpu='--device /dev/kfd --device /dev/dri --group-add video --group-add "$(getent group render | cut -d: -f3)" --security-opt seccomp=unconfined --ipc=host' ;;
  cuda) gpu='--gpus all --ipc=host' ;;
  cpu) gpu='--shm-size 2g' ;;
esac
case "$backend" in
  cpu) files="" ;;
  *) files=" -f docker-compose.yml -f docker-compose.$backend.yml" ;;
esac
[ "$tag" = "gpt-trainer:$backend" ] && image="" || image="IMAGE=$tag "
echo
echo "built $tag. Train, with TensorBoard on http://localhost:6006:"
echo "  mkdir -p output ~/.config/wandb ~/.swanlab && touch ~/.netrc"
echo "  ${image}HOST_UID=\$(id -u) HOST_GID=\$(id -g) docker compose$files up"
echo "or one run alone (add a command after the image name to change it; -e WANDB_API_KEY instead of the .netrc mount):"
echo "  mkdir -p output && docker run --rm -it $gpu $user $mounts $tag"
