"""The container's files, checked without Docker (tests/test_container.sh builds and runs the image for real)."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def build_script(*args):
    return subprocess.run(["bash", str(ROOT / "build_docker_image.sh"), *args], capture_output=True, text=True,
                          timeout=30)


def test_build_script_help_names_bases_that_carry_the_tested_torch():
    result = build_script("--help")
    assert result.returncode == 0 and "--backend" in result.stdout
    assert "rocm/pytorch:rocm10.0_ubuntu24.04_py3.13_pytorch_release_2.13.0" in result.stdout
    assert "pytorch/pytorch:2.13.0-cuda12.6-cudnn9-runtime" in result.stdout
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "ARG BASE_IMAGE=rocm/pytorch:rocm10.0_ubuntu24.04_py3.13_pytorch_release_2.13.0" in dockerfile


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


def test_dockerfile_keeps_secrets_out_and_runs_unprivileged():
    text = (ROOT / "Dockerfile").read_text()
    assert not re.search(r"^\s*(ENV|ARG)\s+.*(API_KEY|TOKEN|SECRET|PASSWORD)", text, re.M | re.I)
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0")
    assert "EXPOSE 6006" in text and "gpt_trainer.doctor" in text
    setup = (ROOT / "docker" / "setup.sh").read_text()
    assert "fortunes-zh" in setup and '[ "$before" = "$after" ] || die' in setup  # torch must not change
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".env", ".netrc", "wandb/", "output*/", ".git"} <= set(ignored)


def test_dockerfile_layers_run_in_dependency_order():
    """System packages, then pinned requirements, then the package: a .py edit rebuilds only the last layer (the
    container stage measures that rebuild for real)."""
    steps = [line for line in (ROOT / "Dockerfile").read_text().splitlines() if line.startswith(("RUN", "COPY"))]
    assert steps == ["COPY docker/setup.sh /usr/local/lib/gpt-trainer/setup.sh",
                     "RUN /usr/local/lib/gpt-trainer/setup.sh system",
                     "COPY requirements-image.txt docker/requirements-nodeps.txt /tmp/",
                     "RUN /usr/local/lib/gpt-trainer/setup.sh python && rm /tmp/requirements-*.txt",
                     "COPY . /opt/gpt-trainer",
                     "RUN /usr/local/lib/gpt-trainer/setup.sh package"]


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
