"""Check that this machine or container can train: versions, GPU backend and devices, bf16, free GPU memory,
trackers, where the wandb key would come from (never the key), and writable output and wandb folders.

    python -m gpt_trainer.doctor [--output_dir DIR] [--require_gpu]
    torchrun ... -m gpt_trainer.doctor --distributed      (each process: what it sees, then a test of joining)

Exit code 0 when everything required is present, 1 otherwise (the container's health check uses this)."""

from __future__ import annotations

import argparse
import fcntl
import importlib.metadata
import ipaddress
import os
import shutil
import socket
import struct
import sys
import tempfile
from pathlib import Path

REQUIRED = ("torch", "numpy", "sentencepiece", "tqdm")
OPTIONAL = ("tensorboard", "wandb", "swanlab", "accelerate")


def version_of(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def writable(folder: Path) -> bool:
    """True when a file can really be created there (os.access is wrong for root and for some mounts)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def gpu_lines(require_gpu: bool) -> tuple[list[str], list[str]]:
    import torch

    from ..system.hardware import bf16_supported, cpu_has_bf16, find_peak

    lines, problems = [], []
    backend = f"ROCm/HIP {torch.version.hip}" if torch.version.hip else (
        f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU only")
    lines.append(f"torch build:   {torch.__version__} ({backend})")
    if not torch.cuda.is_available():
        lines.append(f"GPU:           none visible (CPU bf16: {'yes' if cpu_has_bf16() else 'no'})")
        if require_gpu:
            problems.append("no GPU is visible: check the driver, and pass the GPU to the container "
                            "(--gpus all for NVIDIA; --device /dev/kfd --device /dev/dri for AMD)")
        return lines, problems
    for i in range(torch.cuda.device_count()):
        device = torch.device("cuda", i)
        free, total = torch.cuda.mem_get_info(device)
        peak = find_peak(torch.cuda.get_device_name(device))
        lines.append(f"GPU {i}:         {torch.cuda.get_device_name(device)} | {free / 2**30:.1f} of "
                     f"{total / 2**30:.1f} GiB free | bf16: {'yes' if bf16_supported(device) else 'no (use --fp16)'} | "
                     + (f"MFU peak: {peak.name} data sheet" if peak else "MFU peak: unknown part, pass --peak_tflops"))
    return lines, problems


def compiler_line() -> str:
    """torch.compile builds kernels at run time: inductor needs a C++ compiler on the CPU, Triton a C compiler."""
    found = [shutil.which(name) for name in ("cc", "gcc", "c++", "g++", "clang")]
    found = [path for path in found if path]
    if found:
        return f"C compiler:    {found[0]} (torch.compile can build its kernels)"
    return "C compiler:    none found (--compile falls back to running uncompiled; install gcc and g++)"


def diagnose(output_dir: Path, require_gpu: bool = False) -> tuple[list[str], list[str]]:
    """(report lines, problems); no problem means ready to train."""
    lines = [f"python:        {sys.version.split()[0]} at {sys.executable}"]
    problems = []
    for package in REQUIRED + OPTIONAL:
        version = version_of(package)
        lines.append(f"{package + ':':<15}{version or 'NOT INSTALLED'}")
        if version is None and package in REQUIRED:
            problems.append(f"{package} is not installed")
    if version_of("torch"):
        gpu, gpu_problems = gpu_lines(require_gpu)
        lines += gpu
        problems += gpu_problems
    lines.append(compiler_line())
    from ..tracking.wandb import wandb_key_source

    source = wandb_key_source()
    lines.append(f"wandb key:     {'from ' + source if source else 'none found (runs log offline; wandb sync later)'}")
    lines.append(f"wandb mode:    {os.environ.get('WANDB_MODE') or 'online when a key exists'}")
    from ..tracking.swanlab import swanlab_key_source

    source = swanlab_key_source()
    lines.append(f"swanlab key:   {'from ' + source if source else 'none found (runs log offline; swanlab sync)'}")
    wandb_dir = Path(os.environ.get("WANDB_DIR") or output_dir)
    for label, folder in (("output dir", output_dir), ("wandb dir", wandb_dir)):
        ok = writable(folder)
        lines.append(f"{label + ':':<15}{folder} ({'writable' if ok else 'NOT WRITABLE'})")
        if not ok:
            problems.append(f"{label} {folder} is not writable by uid {os.getuid()}: fix the mount's owner or run as "
                            f"its owner (docker run --user $(id -u):$(id -g))")
    return lines, problems


# ---- several processes: what this one sees, and whether they can meet ---------------------------------------------
LAUNCH_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
                    "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "SLURM_JOB_ID", "SLURM_NNODES",
                    "SLURM_PROCID", "SLURMD_NODENAME", "SLURM_JOB_NODELIST", "SLURM_RESTART_COUNT", "PET_NNODES",
                    "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT",
                    "JOB_COMPLETION_INDEX", "CUDA_VISIBLE_DEVICES", "NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME",
                    "NCCL_IB_DISABLE", "NCCL_IB_HCA", "NCCL_DEBUG")


def interfaces() -> dict[str, str]:
    """Each network interface's IPv4 address (Linux: SIOCGIFADDR), by name."""
    found = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        for _, name in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(probe.fileno(), 0x8915, struct.pack("256s", name[:15].encode()))
            except OSError:  # no IPv4 address
                continue
            found[name] = socket.inet_ntoa(packed[20:24])
    return found


def route_to(host: str, port: int) -> tuple[str, str]:
    """(this machine's address towards host, the interface it belongs to): what gloo and NCCL pick unless told
    otherwise with GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME. Connecting a UDP socket sends nothing."""
    address = socket.getaddrinfo(host, port, socket.AF_INET)[0][4][0]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((address, port))
        mine = probe.getsockname()[0]
    name = next((n for n, a in interfaces().items() if a == mine), "?")
    return mine, name


def distributed_lines() -> tuple[list[str], list[str]]:
    import torch

    lines = [f"{name + ':':<28}{os.environ[name]}" for name in LAUNCH_VARIABLES if name in os.environ]
    problems = []
    if "WORLD_SIZE" not in os.environ:
        lines.append("launcher:                   none (start this under torchrun, srun + torchrun, or a pod's command "
                     "to see what the training processes see)")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    lines.append(f"backend:                    {backend} ({'NCCL, or RCCL on ROCm' if backend == 'nccl' else 'CPU'})")
    lines.append("interfaces:                 " + ", ".join(f"{n} {a}" for n, a in interfaces().items()))
    host, port = os.environ.get("MASTER_ADDR"), int(os.environ.get("MASTER_PORT", "29500"))
    if host:
        try:
            mine, name = route_to(host, port)
        except OSError as e:
            problems.append(f"the rendezvous host {host} does not resolve or cannot be reached from here ({e})")
        else:
            lines.append(f"rendezvous endpoint:        {host}:{port}, reached from {mine} on {name}")
            if ipaddress.ip_address(mine).is_loopback and not ipaddress.ip_address(
                    socket.getaddrinfo(host, port, socket.AF_INET)[0][4][0]).is_loopback:
                problems.append(f"{host} is reached over the loopback interface: set GLOO_SOCKET_IFNAME / "
                                f"NCCL_SOCKET_IFNAME to the interface between the nodes")
    return lines, problems


def try_joining(timeout_s: float) -> tuple[list[str], list[str]]:
    """Join the process group as training does and exchange host names: the test a hang needs."""
    import torch

    from ..system.distributed import launched_world, start, stop

    world = launched_world()
    if not world.active:
        return [], []
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        start(world, device, timeout_s)
        import torch.distributed as dist

        everyone = [None] * world.size
        dist.all_gather_object(everyone, f"{socket.gethostname()} (pid {os.getpid()})")
    except Exception as e:  # noqa: BLE001 - a failure to join is what this reports
        return [], [f"rank {world.rank} could not join the other {world.size - 1} process(es) within {timeout_s:g} "
                    f"s: {str(e).splitlines()[0][:300]}"]
    stop(world, finished=True)
    return [f"joined:                     all {world.size} processes: "
            + ", ".join(f"rank {rank} on {who}" for rank, who in enumerate(everyone))], []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpt_trainer.doctor", description=__doc__.split("\n")[0])
    parser.add_argument("--output_dir", default=os.environ.get("GPT_TRAINER_OUTPUT", "."),
                        help="the folder training will write to (default: $GPT_TRAINER_OUTPUT or .)")
    parser.add_argument("--require_gpu", action="store_true", help="fail when no GPU is visible")
    parser.add_argument("--quiet", action="store_true", help="print only problems")
    parser.add_argument("--distributed", action="store_true",
                        help="also print what this process of a multi-process job sees (rank variables, rendezvous "
                             "endpoint, backend, network interface) and try joining the others")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="with --distributed: seconds to wait for the other processes (default 60)")
    args = parser.parse_args(argv)
    lines, problems = diagnose(Path(args.output_dir), args.require_gpu)
    if args.distributed:
        for part in (distributed_lines(), try_joining(args.timeout)):
            lines += part[0]
            problems += part[1]
        rank = os.environ.get("RANK")
        if rank is not None:  # several processes print at once: say whose lines these are
            lines = [f"[rank {rank}] {line}" for line in lines]
            problems = [f"[rank {rank}] {problem}" for problem in problems]
    if not args.quiet:
        print("\n".join(lines))
    for problem in problems:
        print(f"PROBLEM: {problem}", file=sys.stderr)
    if not args.quiet:
        verdict = "ready to train" if not problems else f"{len(problems)} problem(s) found"
        print(f"[rank {os.environ['RANK']}] {verdict}" if args.distributed and "RANK" in os.environ else verdict)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
