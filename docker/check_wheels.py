"""Check, without building or pulling an image, that every pinned image package and everything it depends on has a
binary wheel for each base image's Python, so no image build ever falls back to compiling from source.

    python docker/check_wheels.py [--python 3.11 3.13 ...]

pip resolves requirements-image.txt for each Python on manylinux x86-64 (--dry-run: only metadata is fetched). torch
itself comes from the base image, so a dependency-free stand-in wheel of the pinned torch takes its place: the check
is about our packages, not torch's CUDA libraries."""

from __future__ import annotations

import argparse
import concurrent.futures
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# 3.11: the CI stand-in and older pytorch/pytorch tags; 3.12: the CPU base; 3.13: the ROCm base; 3.14: newer bases
PYTHONS = ("3.11", "3.12", "3.13", "3.14")
# pip matches --platform tags exactly, so list every manylinux tag a current wheel may carry
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux_2_5_x86_64", "manylinux1_x86_64")


def torch_stand_in(folder: Path, version: str) -> str:
    """A wheel named torch with no dependencies and a local version label no real release has; returns the pin."""
    pinned = f"{version}+basestandin"
    path = folder / f"torch-{pinned}-py3-none-any.whl"
    dist_info = f"torch-{pinned}.dist-info"
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr(f"{dist_info}/METADATA", f"Metadata-Version: 2.1\nName: torch\nVersion: {pinned}\n")
        wheel.writestr(f"{dist_info}/WHEEL",
                       "Wheel-Version: 1.0\nGenerator: check_wheels\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        wheel.writestr(f"{dist_info}/RECORD", "")
    return f"torch=={pinned}"


def resolve(python: str, *requirements: str) -> subprocess.CompletedProcess:
    platforms = [arg for tag in PLATFORMS for arg in ("--platform", tag)]
    with tempfile.TemporaryDirectory() as target:
        return subprocess.run(
            [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
             "--only-binary=:all:", "--python-version", python, *platforms, "--target", target, *requirements],
            capture_output=True, text=True)


def requirements_for(python: str, path: Path) -> list[str]:
    """The file's requirements whose environment markers hold on `python`: pip evaluates markers such as
    `; python_version < "3.14"` for the interpreter running it, not for --python-version."""
    try:
        from packaging.markers import Marker
    except ImportError:
        from pip._vendor.packaging.markers import Marker
    kept = []
    for line in path.read_text().splitlines():
        requirement, _, marker = line.split("#")[0].partition(";")
        if requirement.strip() and (not marker.strip() or Marker(marker).evaluate(
                {"python_version": python, "python_full_version": f"{python}.0"})):
            kept.append(requirement.strip())
    return kept


def check(python: str, links: str, torch_pin: str, also: list[str]) -> subprocess.CompletedProcess:
    image = requirements_for(python, ROOT / "requirements-image.txt")
    result = resolve(python, "--find-links", links, *image, torch_pin, *also)
    if result.returncode == 0:
        result = resolve(python, "--no-deps", *requirements_for(python, ROOT / "docker" / "requirements-nodeps.txt"))
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--python", nargs="+", default=PYTHONS, help="Python versions to check")
    parser.add_argument("--torch", default="2.13.0", help="the torch release the bases carry")
    parser.add_argument("--also", nargs="*", default=[], help="more requirements (the tests plant one with no wheel)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as links, concurrent.futures.ThreadPoolExecutor() as pool:
        pin = torch_stand_in(Path(links), args.torch)
        # network-bound: in parallel
        results = list(pool.map(lambda python: check(python, links, pin, args.also), args.python))
    for python, result in zip(args.python, results):
        print(f"python {python}: {'every package has a wheel' if result.returncode == 0 else 'MISSING WHEELS'}")
        if result.returncode:
            errors = [line for line in result.stderr.splitlines() if line.startswith("ERROR")]
            print("\n".join(errors or result.stderr.splitlines()[-5:]))
    return 1 if any(result.returncode for result in results) else 0


if __name__ == "__main__":
    sys.exit(main())
