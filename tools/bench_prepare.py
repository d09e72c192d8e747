"""Token preparation at scale: wall time, MB/s and the peak memory of the whole process tree (workers included).

    python tools/bench_prepare.py --source ../shared/data/song_ci.txt --mb 1000 [--tokenizer sentencepiece]
        [--workers 1] [--jsonl] [--workdir /tmp/bench_prepare]

Makes a corpus of about --mb megabytes by repeating --source (as .txt, or as .jsonl with {"text": ...} lines, one per
line of the source), prepares it with `python -m gpt_trainer.prepare` into a fresh cache, then starts again on the
complete cache. Peak memory is the summed RSS of the command and its children, sampled every 20 ms from /proc."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def make_corpus(source: Path, megabytes: int, jsonl: bool, folder: Path) -> Path:
    text = source.read_text(encoding="utf-8")
    if jsonl:
        text = "".join(json.dumps({"text": line}, ensure_ascii=False) + "\n" for line in text.splitlines())
    path = folder / f"corpus-{megabytes}mb.{'jsonl' if jsonl else 'txt'}"
    if not path.exists() or path.stat().st_size < megabytes * 10**6:
        data = text.encode("utf-8")
        with open(path, "wb") as f:
            for _ in range(-(-megabytes * 10**6 // len(data))):
                f.write(data)
    return path


def tree_rss(pid: int) -> int:
    """Summed resident memory (bytes) of pid and every process below it."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            total += int(Path(f"/proc/{p}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            pass
        todo += children.get(p, [])
    return total


def timed(command: list[str]) -> tuple[float, int, str]:
    started, peak = time.perf_counter(), 0
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    while proc.poll() is None:
        peak = max(peak, tree_rss(proc.pid))
        time.sleep(0.02)
    output = proc.stdout.read()
    if proc.returncode:
        sys.exit(f"failed ({proc.returncode}):\n{output}")
    return time.perf_counter() - started, peak, output.strip().splitlines()[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", type=Path, default=ROOT.parent / "shared" / "data" / "song_ci.txt")
    parser.add_argument("--mb", type=int, default=1000)
    parser.add_argument("--tokenizer", default="char", choices=["char", "sentencepiece"])
    parser.add_argument("--vocab_size", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--jsonl", action="store_true")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench_prepare"))
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    corpus = make_corpus(args.source, args.mb, args.jsonl, args.workdir)
    cache = args.workdir / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    command = [sys.executable, "-m", "gpt_trainer.prepare", f"--data_path={corpus}", f"--cache_dir={cache}",
               f"--tokenizer={args.tokenizer}", f"--vocab_size={args.vocab_size}",
               f"--prepare_workers={args.workers}"]
    size = corpus.stat().st_size
    for label in ("first start (prepares)", "second start (cache complete)"):
        seconds, peak, last = timed(command)
        print(f"{corpus.name} {size / 1e6:,.0f} MB, {args.tokenizer}, workers {args.workers or os.cpu_count()}: "
              f"{label}: {seconds:.1f} s ({size / 1e6 / seconds:.1f} MB/s), peak RSS of the process tree "
              f"{peak / 2**20:,.0f} MiB ({peak / size:.2f}x the file)\n  {last}", flush=True)


if __name__ == "__main__":
    main()
