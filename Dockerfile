# One image for AMD (ROCm), NVIDIA (CUDA) or CPU: the base image brings PyTorch, this file adds the rest.
# Build with ./build_docker_image.sh --backend rocm|cuda|cpu (it picks BASE_IMAGE); see README.md.
#
# Both GPU bases carry torch 2.13.0, the release the test suite runs on:
#   rocm: rocm/pytorch:rocm10.0_ubuntu24.04_py3.13_pytorch_release_2.13.0 (Ubuntu 24.04 LTS; Python 3.13 rather than
#         the ubuntu26.04/py3.14 tag, which is newer than what many users' other tools have wheels for)
#   cuda: pytorch/pytorch:2.13.0-cuda12.6-cudnn9-runtime (CUDA 12.6 runs on older host drivers than the 13.x variants)
# `python docker/check_wheels.py` checks that every pinned package has a wheel for Python 3.11 to 3.14.
# Older drivers: ./build_docker_image.sh --base-image <an older tag>.
ARG BASE_IMAGE=rocm/pytorch:rocm10.0_ubuntu24.04_py3.13_pytorch_release_2.13.0
FROM ${BASE_IMAGE}

# TORCH_INSTALL: pip options for installing torch==TORCH_VERSION when the base has none; empty (GPU backends) makes
# such a base an error. PRELOAD_CORPUS bakes a corpus and its token cache in, for clusters with no network.
ARG TORCH_INSTALL=""
ARG TORCH_VERSION=2.13.0
ARG PRELOAD_CORPUS=""
ARG APP_UID=1000
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# A UID with no passwd entry (docker run --user 4321:4321) still gets a home, a user name for getpass (torch
# inductor, wandb) and writable compiler caches. /opt/gpt-env exists only where the base's Python is apt's (PEP 668).
ENV PATH=/opt/gpt-env/bin:${PATH} \
    HOME=/home/trainer \
    USER=trainer \
    LOGNAME=trainer \
    TORCHINDUCTOR_CACHE_DIR=/tmp/torchinductor \
    TRITON_CACHE_DIR=/tmp/triton \
    GPT_TRAINER_CACHE=/workspace/cache \
    GPT_TRAINER_OUTPUT=/workspace/output \
    WANDB_DIR=/workspace/output \
    WANDB_CACHE_DIR=/workspace/output/.wandb-cache \
    WANDB_DATA_DIR=/workspace/output/.wandb-data \
    WANDB_CONFIG_DIR=/home/trainer/.config/wandb \
    PYTHONUNBUFFERED=1

# Layers in dependency order, so editing Python code rebuilds only the last one.
COPY docker/setup.sh /usr/local/lib/gpt-trainer/setup.sh
RUN /usr/local/lib/gpt-trainer/setup.sh system

COPY requirements-image.txt docker/requirements-nodeps.txt /tmp/
RUN /usr/local/lib/gpt-trainer/setup.sh python && rm /tmp/requirements-*.txt

WORKDIR /workspace
EXPOSE 6006
HEALTHCHECK --interval=5m --timeout=60s --start-period=30s CMD ["python3", "-m", "gpt_trainer.doctor", "--quiet"]
# Starting the container again continues the same run; pass your own command to change anything.
CMD ["python3", "train_single_gpu.py", "--model_size", "tiny", "--use_chinese", "--output_dir", "/workspace/output/tiny", "--resume"]

COPY . /opt/gpt-trainer
RUN /usr/local/lib/gpt-trainer/setup.sh package
USER ${APP_UID}
