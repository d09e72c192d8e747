# One image for AMD (ROCm), NVIDIA (CUDA) or CPU: the base image brings PyTorch, this file adds the rest.
# Build with ./build_docker_image.sh --backend rocm|cuda|cpu (it picks BASE_IMAGE); see README.md.
ARG BASE_IMAGE=rocm/pytorch:rocm6.3.3_ubuntu22.04_py3.10_pytorch_release_2.4.0
FROM ${BASE_IMAGE}

# PRELOAD_CORPUS bakes a corpus and its token cache in, for clusters with no network (e.g. song_ci, fortunes_zh).
# TORCH_* are used only when the base has no torch (the plain CPU variant).
ARG PRELOAD_CORPUS=""
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=""
ARG APP_UID=1000
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

COPY . /opt/gpt-trainer

# One layer: fortunes-zh (Tang 300 + Song 100, so --use_chinese trains with no network), the pinned Python packages
# under a constraint that holds the base's torch where it is (checked before and after), this package, `python` on
# PATH (a wandb sweep agent runs the literal `python`), and a non-root user whose folders any UID may write, so
# `--user $(id -u):$(id -g)` works.
# hadolint ignore=DL3008,DL3013
RUN apt-get update \
    && apt-get install -y --no-install-recommends fortunes-zh \
    && rm -rf /var/lib/apt/lists/* \
    && { python3 -c "import torch" 2>/dev/null \
         || python3 -m pip install --no-cache-dir ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==${TORCH_VERSION}"; } \
    && python3 -c "import torch; print(f'torch=={torch.__version__}')" > /tmp/torch-constraint.txt \
    && python3 -c "import torch; print(torch.__version__, torch.version.cuda, torch.version.hip)" > /tmp/torch-before \
    && python3 -m pip install --no-cache-dir -c /tmp/torch-constraint.txt -r /opt/gpt-trainer/requirements-image.txt \
    && python3 -m pip install --no-cache-dir --no-deps /opt/gpt-trainer \
    && python3 -c "import torch; print(torch.__version__, torch.version.cuda, torch.version.hip)" > /tmp/torch-after \
    && diff /tmp/torch-before /tmp/torch-after \
    && rm /tmp/torch-* \
    && { command -v python >/dev/null || ln -s "$(command -v python3)" /usr/local/bin/python; } \
    && useradd --create-home --non-unique --uid "${APP_UID}" --shell /bin/bash trainer \
    && mkdir -p /workspace/output /workspace/cache /home/trainer/.config/wandb \
    && cp /opt/gpt-trainer/train_single_gpu.py /opt/gpt-trainer/sweep_config.yaml /workspace/ \
    && cp -r /opt/gpt-trainer/examples /workspace/ \
    && if [ -n "${PRELOAD_CORPUS}" ]; then \
         GPT_TRAINER_CACHE=/workspace/cache python3 -m gpt_trainer --corpus "${PRELOAD_CORPUS}" --dry_run \
           --output_dir /tmp/preload > /dev/null; \
       fi \
    && chmod -R a+rwX /workspace/cache \
    && chmod 1777 /workspace/output /workspace/cache /home/trainer /home/trainer/.config /home/trainer/.config/wandb

ENV HOME=/home/trainer \
    GPT_TRAINER_CACHE=/workspace/cache \
    GPT_TRAINER_OUTPUT=/workspace/output \
    WANDB_DIR=/workspace/output \
    WANDB_CACHE_DIR=/workspace/output/.wandb-cache \
    WANDB_DATA_DIR=/workspace/output/.wandb-data \
    WANDB_CONFIG_DIR=/home/trainer/.config/wandb \
    PYTHONUNBUFFERED=1
USER ${APP_UID}
WORKDIR /workspace
EXPOSE 6006
HEALTHCHECK --interval=5m --timeout=60s --start-period=30s CMD ["python3", "-m", "gpt_trainer.doctor", "--quiet"]
# Starting the container again continues the same run; pass your own command to change anything.
CMD ["python3", "train_single_gpu.py", "--model_size", "tiny", "--use_chinese", "--output_dir", "/workspace/output/tiny", "--resume"]
