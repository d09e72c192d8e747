# One image for AMD (ROCm), NVIDIA (CUDA) or CPU: the base image brings PyTorch, this file adds the rest.
# Build with ./build_docker_image.sh --backend rocm|cuda|cpu (it picks BASE_IMAGE); see README.md.
ARG BASE_IMAGE=rocm/pytorch:rocm6.3.3_ubuntu22.04_py3.10_pytorch_release_2.4.0
FROM ${BASE_IMAGE}

ARG PRELOAD_CORPUS=""
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=""
ARG APP_UID=1000
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# fortunes-zh: Tang 300 + Song 100, so --use_chinese trains with no network at all
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends fortunes-zh \
    && rm -rf /var/lib/apt/lists/*

# The vendor images ship torch; only a plain CPU base lacks it. The constraint pins whatever torch is there, so
# pip can never replace it, and the check after the install proves it stayed the same build.
COPY requirements-image.txt /tmp/requirements-image.txt
# hadolint ignore=DL3013
RUN python3 -c "import torch" 2>/dev/null \
    || python3 -m pip install --no-cache-dir ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==${TORCH_VERSION}"; \
    python3 -c "import torch; print(f'torch=={torch.__version__}')" > /tmp/torch-constraint.txt \
    && python3 -c "import torch; print(torch.__version__, torch.version.cuda, torch.version.hip)" > /tmp/torch-before \
    && python3 -m pip install --no-cache-dir -c /tmp/torch-constraint.txt -r /tmp/requirements-image.txt \
    && python3 -c "import torch; print(torch.__version__, torch.version.cuda, torch.version.hip)" > /tmp/torch-after \
    && diff /tmp/torch-before /tmp/torch-after \
    && rm /tmp/torch-*

# The agent of a wandb sweep runs the literal command `python`
RUN command -v python >/dev/null || ln -s "$(command -v python3)" /usr/local/bin/python

COPY pyproject.toml README.md /opt/gpt-trainer/
COPY gpt_trainer /opt/gpt-trainer/gpt_trainer
RUN python3 -m pip install --no-cache-dir --no-deps /opt/gpt-trainer

# A non-root user. Its HOME is where ~/.netrc and ~/.config/wandb are mounted; the folders are open to any UID so
# `--user $(id -u):$(id -g)` (files the host user owns) works too.
RUN useradd --create-home --non-unique --uid "${APP_UID}" --shell /bin/bash trainer \
    && mkdir -p /workspace/output /workspace/cache /home/trainer/.config/wandb \
    && chmod 1777 /workspace/output /workspace/cache /home/trainer /home/trainer/.config /home/trainer/.config/wandb
COPY train_single_gpu.py /workspace/
ENV HOME=/home/trainer \
    GPT_TRAINER_CACHE=/workspace/cache \
    GPT_TRAINER_OUTPUT=/workspace/output \
    WANDB_DIR=/workspace/output \
    WANDB_CACHE_DIR=/workspace/output/.wandb-cache \
    WANDB_DATA_DIR=/workspace/output/.wandb-data \
    WANDB_CONFIG_DIR=/home/trainer/.config/wandb \
    PYTHONUNBUFFERED=1

# Optionally bake a corpus (and its token cache) in, for clusters with no network: --build-arg PRELOAD_CORPUS=song_ci
RUN if [ -n "${PRELOAD_CORPUS}" ]; then \
        python3 -m gpt_trainer --corpus "${PRELOAD_CORPUS}" --dry_run --output_dir /tmp/preload > /dev/null \
        && chmod -R a+rwX /workspace/cache; \
    fi

USER ${APP_UID}
WORKDIR /workspace
EXPOSE 6006
HEALTHCHECK --interval=5m --timeout=60s --start-period=30s CMD ["python3", "-m", "gpt_trainer.doctor", "--quiet"]
# Restarting the container continues the same run; pass your own command to change anything.
CMD ["python3", "train_single_gpu.py", "--model_size", "tiny", "--use_chinese", "--output_dir", "/workspace/output/tiny", "--resume"]
