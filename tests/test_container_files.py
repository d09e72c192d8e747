"""The container's files, checked without Docker (tests/test_container.sh builds and runs the image for real)."""

import fnmatch
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def build_script(*args):
    return subprocess.run(["bash", str(ROOT / "build_docker_image.sh"), *args], capture_output=True, text=True,
                          timeout=30)


def instructions(dockerfile: Path = ROOT / "Dockerfile") -> list[tuple[str, str]]:
    """The Dockerfile as Docker reads it: (INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    steps, pending = [], ""
    for line in dockerfile.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        word, _, rest = pending.strip().partition(" ")
        steps.append((word.upper(), " ".join(rest.split())))
        pending = ""
    return steps


def arg_defaults(steps) -> dict[str, str]:
    return dict(a.split("=", 1) for op, a in steps if op == "ARG" and "=" in a)


def test_build_script_help_names_bases_that_carry_the_tested_torch():
    tested = re.search(r'TORCH_VERSION="\$\{TORCH_VERSION:-([0-9.]+)\}"', (ROOT / "dev.sh").read_text())[1]
    result = build_script("--help")
    assert result.returncode == 0 and "--backend" in result.stdout
    bases = dict(re.findall(r"^\s+(rocm|cuda|cpu):\s+(.+)$", result.stdout, re.M))
    assert set(bases) == {"rocm", "cuda", "cpu"} and all(tested in line for line in bases.values())
    defaults = arg_defaults(instructions())  # a plain `docker build .` gets the default backend's base and torch
    assert defaults["BASE_IMAGE"] == bases["rocm"] and defaults["TORCH_VERSION"] == tested


@pytest.mark.parametrize("args, message", [
    (["--backend", "tpu"], "--backend must be rocm, cuda or cpu (got 'tpu')"),
    (["--frobnicate"], "unknown argument '--frobnicate'"),
    (["--tag"], "--tag needs a value"),
])
def test_build_script_bad_arguments_print_usage_and_exit_2(args, message):
    result = build_script(*args)
    assert result.returncode == 2
    assert f"error: {message}" in result.stderr and "Usage:" in result.stderr


def test_hadolint_finds_nothing():
    hadolint = shutil.which("hadolint") or str(Path(__import__("sys").executable).parent / "hadolint")
    result = subprocess.run([hadolint, "-t", "warning", str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def settings(steps) -> set[str]:
    """The names every ENV and ARG sets (`ENV A=1 B=2`, `ENV A 1`, `ARG A`)."""
    names = set()
    for op, args in steps:
        if op == "ARG" or (op == "ENV" and "=" not in shlex.split(args)[0]):
            names.add(args.split("=")[0].split()[0])
        elif op == "ENV":
            names |= {pair.split("=")[0] for pair in shlex.split(args)}
    return names


def test_dockerfile_keeps_secrets_out_and_runs_unprivileged():
    steps = instructions()
    assert not [name for name in settings(steps) if re.search(r"KEY|TOKEN|SECRET|PASSWORD|NETRC", name, re.I)]
    user = [args for op, args in steps if op == "USER"][-1]
    user = re.sub(r"\$\{?(\w+)\}?", lambda m: arg_defaults(steps)[m[1]], user).split(":")[0]
    assert user not in ("root", "0")
    setup = (ROOT / "docker" / "setup.sh").read_text()
    assert "fortunes-zh" in setup and '[ "$before" = "$after" ] || die' in setup  # torch must not change
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".env", ".netrc", "wandb/", "output*/", ".git"} <= set(ignored)


def test_the_image_exposes_tensorboard_and_checks_its_health_with_the_package():
    steps = instructions()
    exposed = {port.split("/")[0] for op, args in steps if op == "EXPOSE" for port in args.split()}
    tensorboard = load("docker-compose.yml")["services"]["tensorboard"]
    assert tensorboard["ports"][0].rsplit(":", 1)[1] in exposed  # the port compose publishes is the image's
    health = next(args for op, args in steps if op == "HEALTHCHECK").split(" CMD ", 1)[1]
    command = json.loads(health) if health.startswith("[") else shlex.split(health)
    module = command[command.index("-m") + 1]
    assert module.startswith("gpt_trainer.") and (ROOT / (module.replace(".", "/") + ".py")).is_file()


def runs_repeated_after_editing(path: str, steps) -> list[int]:
    """Which RUN steps (by position) a rebuild repeats after `path` changes: Docker reuses every layer up to the first
    COPY or ADD whose sources take in that file, and repeats every step from there on."""
    for i, (op, args) in enumerate(steps):
        if op in ("COPY", "ADD"):
            *sources, _ = [word for word in args.split() if not word.startswith("--")]
            if any(s in (".", "./") or fnmatch.fnmatch(path, s) or path.startswith(s.rstrip("/") + "/")
                   for s in sources):
                return [j for j, (later, _) in enumerate(steps) if later == "RUN" and j > i]
    return []


def test_dockerfile_layers_run_in_dependency_order():
    """System packages, then pinned requirements, then the package: a .py edit reruns only the package's install (the
    container stage measures that rebuild for real)."""
    steps = instructions()
    runs = [i for i, (op, _) in enumerate(steps) if op == "RUN"]
    code = runs_repeated_after_editing("gpt_trainer/model.py", steps)
    pins = runs_repeated_after_editing("requirements-image.txt", steps)
    assert code == runs[-1:]  # the code is installed, and nothing else repeats
    assert runs_repeated_after_editing("docker/requirements-nodeps.txt", steps) == pins
    assert set(code) < set(pins) < set(runs)  # a new pin reinstalls the packages, but not the system's


def load(name):
    return yaml.safe_load((ROOT / name).read_text())


def test_compose_services_mounts_and_grace_period():
    services = load("docker-compose.yml")["services"]
    assert {"train", "tensorboard", "sweep-agent"} <= set(services)
    for service in services.values():
        volumes = service["volumes"]
        assert any(v.endswith(":/home/trainer/.netrc:ro") for v in volumes)
        assert any(v.endswith(":/home/trainer/.config/wandb") for v in volumes)
        assert any(v.endswith(":/workspace/output") for v in volumes)
        assert {"WANDB_API_KEY", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_MODE"} <= set(service["environment"])
    assert services["train"]["stop_grace_period"] == "2m"
    assert "--bind_all" in services["tensorboard"]["command"] and "6006" in services["tensorboard"]["ports"][0]
    assert services["sweep-agent"]["command"].startswith("wandb agent ${SWEEP_ID")


def test_gpu_overrides():
    rocm = load("docker-compose.rocm.yml")["services"]["train"]
    assert set(rocm["devices"]) == {"/dev/kfd", "/dev/dri"} and "video" in rocm["group_add"]
    assert "seccomp=unconfined" in rocm["security_opt"] and rocm["ipc"] == "host"
    cuda = load("docker-compose.cuda.yml")["services"]["train"]
    assert cuda["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"


def test_env_example_lists_every_setting_compose_reads():
    files = ("docker-compose.yml", "docker-compose.rocm.yml", "docker-compose.cuda.yml")
    compose = "".join((ROOT / f).read_text() for f in files)
    used = set(re.findall(r"\$\{(\w+)", compose)) - {"HOME"}
    documented = set(re.findall(r"^(\w+)=", (ROOT / ".env.example").read_text(), re.M))
    assert used - {"TRAIN_COMMAND"} <= documented


def test_every_image_package_is_pinned_and_the_trackers_are_there():
    pins = {}
    for path in (ROOT / "requirements-image.txt", ROOT / "docker" / "requirements-nodeps.txt"):
        for line in path.read_text().splitlines():
            requirement = line.split("#")[0].split(";")[0].strip()
            if requirement:
                assert re.fullmatch(r"[A-Za-z0-9_.\-]+==[0-9][0-9A-Za-z.]*", requirement), f"{path.name}: {line}"
                pins[requirement.split("==")[0].lower()] = requirement
    assert {"wandb", "tensorboard", "swanlab", "accelerate", "sentencepiece"} <= set(pins)
    # every package the project itself needs, pinned (numpy is the base image's own, like torch)
    import tomllib

    needed = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.split(r"[<>=!\[ ]", requirement)[0].lower() for requirement in needed} - {"numpy"}
    assert names - set(pins) == set()


COMPOSE_FILES = ("docker-compose.yml", "docker-compose.cuda.yml", "docker-compose.rocm.yml")


def test_a_plain_compose_up_is_training_and_tensorboard_and_the_sweep_agent_waits_for_its_profile():
    services = load("docker-compose.yml")["services"]
    assert {name for name, service in services.items() if not service.get("profiles")} == {"train", "tensorboard"}
    assert services["sweep-agent"]["profiles"] == ["sweep"]
    for name in COMPOSE_FILES:  # profiles are the Compose Specification's, which a `version: 3.x` file is read without
        assert "version" not in load(name), name


def test_tensorboard_serves_the_folder_the_default_training_writes_to():
    services = load("docker-compose.yml")["services"]
    logdir = shlex.split(services["tensorboard"]["command"])
    logdir = logdir[logdir.index("--logdir") + 1]
    training = shlex.split(re.fullmatch(r"\$\{TRAIN_COMMAND:-(.*)\}", services["train"]["command"])[1])
    output_dir = training[training.index("--output_dir") + 1]
    assert output_dir.startswith(logdir.rstrip("/") + "/")
    assert any(v.endswith(f":{logdir}") for v in services["tensorboard"]["volumes"])  # the host's output folder


def image_default(image: str) -> str:
    return re.fullmatch(r"\$\{IMAGE:-([^}]+)\}", image)[1]


@pytest.mark.parametrize("override, backend", [(None, "cpu"), ("docker-compose.cuda.yml", "cuda"),
                                               ("docker-compose.rocm.yml", "rocm")])
def test_each_variant_runs_every_service_on_the_image_its_backend_builds(override, backend):
    services = load("docker-compose.yml")["services"]
    overrides = load(override)["services"] if override else {}
    images = {name: image_default(overrides.get(name, {}).get("image", service["image"]))
              for name, service in services.items()}
    assert set(images.values()) == {f"gpt-trainer:{backend}"}, images  # what build_docker_image.sh tags by default
    assert 'tag="${tag:-gpt-trainer:$backend}"' in (ROOT / "build_docker_image.sh").read_text()
    if override:  # the GPUs go to training and the agent only
        assert set(overrides) == set(services) and "ipc" not in overrides["tensorboard"]


PUBLISHES = re.compile(r"docker run[^`\n]*(\\\n[^`\n]*)*\s-p \d")  # a `docker run` line, continued or not, with -p


def test_no_docker_run_shown_publishes_a_port_nothing_in_it_serves():
    shown = [ROOT / "build_docker_image.sh", ROOT / "README.md", ROOT / "README.zh-CN.md",
             *sorted((ROOT / "docs").rglob("*.md"))]
    for path in shown:
        assert not PUBLISHES.search(path.read_text(encoding="utf-8")), path.name
    assert PUBLISHES.search("docker run --rm -it \\\n  -v a:b \\\n  -p 6006:6006 img")  # the control: caught
    cuda = "docker compose -f docker-compose.yml -f docker-compose.cuda.yml up"
    for name in ("README.md", "README.zh-CN.md"):  # the landing page's container path is compose, its files real
        text = (ROOT / name).read_text(encoding="utf-8")
        assert "docker compose up\n" in text and cuda in text
        assert all((ROOT / f).is_file() for f in re.findall(r"-f (docker-compose[\w.]*\.yml)", text))
