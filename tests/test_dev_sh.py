"""./dev.sh's set-up: which PyTorch build it picks (GPU detection replaced by stand-ins), that pip runs only when what
it installs changed, TensorBoard flags passed through, and one real install on a fresh clone (the demo's venv holds
no test tools; a second call runs no pip). No test downloads torch: the real one reuses a wheel already on disk."""

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TORCH_VERSION = re.search(r'TORCH_VERSION="\$\{TORCH_VERSION:-([0-9.]+)\}"', (ROOT / "dev.sh").read_text())[1]
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
NO_GPU = "CPU build (no NVIDIA or AMD GPU found); set TORCH_INDEX_URL to choose another"


def script(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return path


def machine(tmp_path: Path, nvidia: bool = False, amd: bool = False, devices: tuple[str, ...] = ()) -> dict:
    """The environment of a stand-in machine: nvidia-smi and rocminfo on PATH that succeed only where that GPU is
    'present' (a real one on the host is shadowed), and a stand-in /dev holding only `devices`."""
    stand_ins = tmp_path / "stand-in-bin"
    script(stand_ins / "nvidia-smi", 'echo "GPU 0: stand-in (UUID: GPU-0)"' if nvidia else "exit 9")
    script(stand_ins / "rocminfo", "echo 'Agent 2: gfx942 (stand-in)'" if amd else "exit 1")
    dev = tmp_path / "stand-in-dev"
    dev.mkdir(exist_ok=True)
    for name in devices:
        (dev / name).touch()
    env = {k: v for k, v in os.environ.items() if k not in ("TORCH_INDEX_URL", "TORCH_VERSION", "VENV")}
    return env | {"PATH": f"{stand_ins}{os.pathsep}{env['PATH']}", "GPT_TRAINER_DEV_DIR": str(dev)}


def dev_sh(*args: str, env: dict, root: Path = ROOT, timeout: int = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(root / "dev.sh"), *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def torch_build(env: dict) -> str:
    done = dev_sh("torch-build", env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_without_a_gpu_the_cpu_build_is_chosen_and_said_so(tmp_path):
    assert torch_build(machine(tmp_path)) == f"PyTorch {TORCH_VERSION}, {NO_GPU}"


@pytest.mark.parametrize("nvidia, devices", [(True, ()), (False, ("nvidia0",))])
def test_an_nvidia_gpu_gets_pypi_s_default_cuda_build(tmp_path, nvidia, devices):
    said = torch_build(machine(tmp_path, nvidia, False, devices))
    assert "default PyPI build, for CUDA (an NVIDIA GPU found)" in said


@pytest.mark.parametrize("amd, devices", [(True, ()), (False, ("kfd",))])
def test_an_amd_gpu_gets_the_rocm_index(tmp_path, amd, devices):
    said = torch_build(machine(tmp_path, False, amd, devices))
    assert re.search(r"ROCm build from https://download\.pytorch\.org/whl/rocm[0-9.]+ \(an AMD GPU found\)", said)


def test_torch_index_url_wins_over_any_gpu_and_empty_means_pip_s_own_configuration(tmp_path):
    env = machine(tmp_path, nvidia=True, amd=True, devices=("nvidia0", "kfd"))
    said = torch_build(env | {"TORCH_INDEX_URL": "https://mirror.example/whl/cu128"})
    assert said == f"PyTorch {TORCH_VERSION}, the build from https://mirror.example/whl/cu128 (TORCH_INDEX_URL is set)"
    said = torch_build(machine(tmp_path) | {"TORCH_INDEX_URL": ""})
    assert said == f"PyTorch {TORCH_VERSION}, the build from pip's own configuration (TORCH_INDEX_URL is set)"


def stand_in_checkout(tmp_path: Path) -> tuple[Path, Path]:
    """dev.sh and pyproject.toml in a folder of their own, with a stand-in .venv whose python and tensorboard only
    write down how they were called (python answers no torch installed). Returns (the folder, the call log)."""
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    for name in ("dev.sh", "pyproject.toml"):
        shutil.copy(ROOT / name, checkout / name)
    log = tmp_path / "calls.log"
    script(checkout / ".venv" / "bin" / "python", f'echo "python $*" >> "{log}"; case "$1" in -c) exit 1;; esac')
    script(checkout / ".venv" / "bin" / "tensorboard", f'echo "tensorboard $*" >> "{log}"')
    return checkout, log


def calls(log: Path) -> list[str]:
    lines = log.read_text().splitlines() if log.exists() else []
    log.unlink(missing_ok=True)
    return [line for line in lines if not line.startswith("python -c")]


def test_the_chosen_index_goes_to_pip_for_torch_alone(tmp_path):
    checkout, log = stand_in_checkout(tmp_path)
    done = dev_sh("setup", env=machine(tmp_path) | {"TORCH_INDEX_URL": "https://mirror.example/whl"}, root=checkout)
    assert done.returncode == 0, done.stderr
    assert calls(log) == [f"python -m pip install -q --index-url https://mirror.example/whl torch=={TORCH_VERSION}",
                          "python -m pip install -q -e ."]
    (checkout / ".venv" / ".installed-base").unlink()
    done = dev_sh("setup", env=machine(tmp_path, nvidia=True), root=checkout)
    assert calls(log) == [f"python -m pip install -q torch=={TORCH_VERSION}", "python -m pip install -q -e ."]


def test_without_a_gpu_pip_gets_the_cpu_index_or_says_why_not(tmp_path):
    checkout, log = stand_in_checkout(tmp_path)
    done = dev_sh("setup", env=machine(tmp_path), root=checkout)
    assert done.returncode == 0 and f"installing PyTorch {TORCH_VERSION}, {NO_GPU}\n" in done.stderr, done.stderr
    torch_call = calls(log)[0]
    if f"{CPU_INDEX} cannot be reached (" in done.stderr:  # offline, as on CI: pip's own sources (a wheel on disk)
        assert torch_call == f"python -m pip install -q torch=={TORCH_VERSION}"
        assert "installing torch==2.13.0 from pip's own configuration instead" in done.stderr
    else:
        assert torch_call == f"python -m pip install -q --index-url {CPU_INDEX} torch=={TORCH_VERSION}"


def test_pip_runs_again_only_when_what_it_installs_changed(tmp_path):
    checkout, log = stand_in_checkout(tmp_path)
    env = machine(tmp_path, nvidia=True)
    assert dev_sh("setup", env=env, root=checkout).returncode == 0
    assert calls(log)[-1] == "python -m pip install -q -e ."
    again = dev_sh("setup", env=env, root=checkout)
    assert calls(log) == [f"python -m pip install -q torch=={TORCH_VERSION}"]  # the stand-in still has no torch
    assert "pip install -e" not in again.stderr
    with open(checkout / "pyproject.toml", "a") as pyproject:
        pyproject.write("# a changed dependency list\n")
    dev_sh("setup", env=env, root=checkout)
    assert calls(log)[-1] == "python -m pip install -q -e ."
    dev_sh("flags", env=env, root=checkout)  # a dev subcommand adds the test tools
    assert "python -m pip install -q -e .[dev]" in calls(log)
    dev_sh("setup", env=env, root=checkout)  # the dev install serves the demo too
    assert "python -m pip install -q -e ." not in calls(log)
    dev_sh("setup", env=env | {"TORCH_VERSION": "2.12.0"}, root=checkout)
    assert calls(log) == ["python -m pip install -q torch==2.12.0", "python -m pip install -q -e ."]


@pytest.mark.parametrize("args, expected", [
    ((), "--logdir output_demo/logs --port 6006"),
    (("runs/x", "--bind_all"), "--logdir runs/x --bind_all --port 6006"),
    (("--bind_all", "--port", "7000"), "--logdir output_demo/logs --bind_all --port 7000"),
    (("--port=7000", "--logdir_spec", "a:runs/a"), "--port=7000 --logdir_spec a:runs/a"),
])
def test_tensorboard_takes_a_log_folder_and_passes_its_flags_through(tmp_path, args, expected):
    checkout, log = stand_in_checkout(tmp_path)
    env = machine(tmp_path, nvidia=True)
    dev_sh("setup", env=env, root=checkout)
    calls(log)
    done = dev_sh("tensorboard", *args, env=env, root=checkout)
    assert done.returncode == 0, done.stderr
    assert calls(log)[-1] == f"tensorboard {expected}"


def test_tensorboard_refuses_a_log_folder_given_twice_before_installing_anything(tmp_path):
    checkout, log = stand_in_checkout(tmp_path)
    done = dev_sh("tensorboard", "runs/a", "--logdir", "runs/b", env=machine(tmp_path, nvidia=True), root=checkout)
    assert done.returncode == 2 and "the log folder is given twice (runs/a and a --logdir flag)" in done.stderr
    assert calls(log) == [] and not (checkout / ".venv" / ".installed-base").exists()


@pytest.mark.parametrize("command", ["setup", "torch-build", "flags"])
def test_a_subcommand_without_arguments_refuses_them(tmp_path, command):
    checkout, log = stand_in_checkout(tmp_path)
    done = dev_sh(command, "dev", env=machine(tmp_path, nvidia=True), root=checkout)
    assert done.returncode == 2 and f"./dev.sh {command} takes no arguments, and was given: dev" in done.stderr
    assert calls(log) == [] and done.stdout == ""


def torch_wheel_on_disk() -> bool:
    """Whether pip's own configuration finds the pinned torch without a network (a local wheel folder, as here)."""
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--no-index",
                           "--no-deps", "-q", f"torch=={TORCH_VERSION}"], capture_output=True, timeout=120)
    return done.returncode == 0


@pytest.mark.slow
def test_a_fresh_clone_s_demo_venv_has_no_test_tools_and_a_second_call_runs_no_pip(tmp_path):
    if not torch_wheel_on_disk():
        pytest.skip(f"no torch=={TORCH_VERSION} wheel on disk, and this test downloads none")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True, timeout=120)
    env = machine(tmp_path)
    offline = subprocess.run([sys.executable, "-c", f"import urllib.request; urllib.request.urlopen('{CPU_INDEX}/', "
                              "timeout=10)"], capture_output=True, timeout=30).returncode != 0
    if not offline:
        env["TORCH_INDEX_URL"] = ""  # the index would download the wheel: pip's own configuration finds it on disk
    first = dev_sh("setup", env=env, root=clone, timeout=900)
    assert first.returncode == 0, first.stderr
    if offline:  # the path CI takes: the CPU build chosen, its index unreachable, the wheel on disk used
        assert f"installing PyTorch {TORCH_VERSION}, {NO_GPU}\n" in first.stderr
    assert "installing this package into .venv: pip install -e .\n" in first.stderr
    python = clone / ".venv" / "bin" / "python"
    probe = "import importlib.util as u, importlib.metadata as m; print(m.version('torch'), " \
            "[n for n in ('pytest', 'ruff', 'transformers', 'tensorboard') if u.find_spec(n)])"
    found = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, timeout=60).stdout.split(" ", 1)
    assert found[0].startswith(TORCH_VERSION) and found[1].strip() == "['tensorboard']"
    assert not (clone / ".venv" / "bin" / "ruff").exists()
    second = dev_sh("setup", env=env, root=clone)
    assert second.returncode == 0 and second.stdout == second.stderr == ""  # nothing installed, nothing pip said
    shown = dev_sh("tensorboard", "--version_tb", env=env, root=clone)  # a TensorBoard flag reaches the real one
    assert shown.returncode == 0 and importlib.metadata.version("tensorboard") in shown.stdout + shown.stderr
