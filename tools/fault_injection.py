"""Kill a small training run (SIGKILL, the worst case: no handler runs) at many moments, resume it each time, and check
that nothing was lost or written twice.

    python tools/fault_injection.py [--kills 20] [--seed 0] [--workdir DIR]

The moments rotate through: while a checkpoint is being written (a temporary checkpoint file, or a sharded save's
staging folder, has appeared), right
after the report of an evaluation step (inside evaluation, sampling and saving), and at a random time. Afterwards:
every checkpoint loads, no temporary file is left, metrics.jsonl and TensorBoard hold each training step exactly once
and in order, and the loss of every step equals that of the same run never interrupted. Exit code 0 only if all hold.
CPU only, a few minutes."""

from __future__ import annotations

import argparse
import json
import logging
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from gpt_trainer.system.rundir import RunFolder  # noqa: E402
from gpt_trainer.train import checkpoint  # noqa: E402

STEPS, EVAL_INTERVAL = 200, 10
FLAGS = [f"--data_path={ROOT / 'tests' / 'fixtures' / 'classic_poems.txt'}", "--n_layer=2", "--n_head=2",
         "--n_embd=32", "--block_size=16", "--batch_size=4", "--dropout=0.1",
         "--eval_steps=40", "--fp32", "--device=cpu", "--sample_tokens=4", "--report_to=tensorboard",
         f"--max_steps={STEPS}", f"--eval_interval={EVAL_INTERVAL}", "--save_interval=3", "--log_interval=1",
         "--learning_rate=1e-3", "--warmup_steps=10"]


def command(out: Path, cache: Path) -> list[str]:
    return [sys.executable, str(ROOT / "train_single_gpu.py"), *FLAGS, f"--output_dir={out}", f"--cache_dir={cache}",
            "--resume"]


def train_losses(out: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]


def train_steps_in_tensorboard(out: Path) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logging.getLogger("tensorboard").setLevel(logging.ERROR)  # it reports each purge of a resumed run's old events

    [logdir] = list((out / "logs").iterdir())
    events = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    events.Reload()
    return [e.step for e in events.Scalars("train/loss")]


def train_rows(out: Path) -> list[dict]:
    rows = []
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return rows
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:  # the line being written right now
            continue
        if "train/loss" in row:
            rows.append(row)
    return rows


def latest_step(out: Path) -> int:
    """The step of the run's latest checkpoint, whatever its kind (0 when there is none yet)."""
    latest = checkpoint.newest(RunFolder(out), "latest")
    return checkpoint.load(latest, lazy=True)["trainer"]["step"] if latest else 0


def kill_once(out: Path, cache: Path, moment: str, rng: random.Random) -> str:
    """Start (or resume) the run, let it make some progress, and SIGKILL it at `moment`; returns what happened.
    saving: during the 1st to 3rd checkpoint write of this start; evaluating: right after the 1st or 2nd report of a
    step that evaluates (so inside evaluation, sampling or the save after it); random: 0 to 1.5 s into training."""
    start_step = latest_step(out)
    target = rng.randint(1, 3) if moment == "saving" else rng.randint(1, 2)
    proc = subprocess.Popen(command(out, cache), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, random_at, saves, was_saving = time.time() + 120, None, 0, False
    while proc.poll() is None and time.time() < deadline:
        new_rows = [r for r in train_rows(out) if r["step"] > start_step]
        saving = any((out / "checkpoints").glob(".*.tmp-*"))
        saves += saving and not was_saving
        was_saving = saving
        if random_at is None and new_rows:
            random_at = time.time() + rng.uniform(0.0, 1.5)
        due = {"saving": saving and saves >= target,
               "evaluating": sum(r["step"] % EVAL_INTERVAL == 0 for r in new_rows) >= target,
               "random": random_at is not None and time.time() >= random_at}[moment]
        if due:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return f"killed while {moment}" if moment != "random" else "killed at a random moment"
        time.sleep(0.002)
    if proc.poll() is None:
        proc.kill()
        proc.wait()
        return "killed at the time-out"
    return "finished before the moment came"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None, help="keep the runs here (default: a temporary folder)")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="fault-injection-"))
    cache = work / "cache"
    reference, faulted = work / "reference", work / "faulted"
    for folder in (reference, faulted):
        shutil.rmtree(folder, ignore_errors=True)

    print(f"reference: {STEPS} steps uninterrupted", flush=True)
    subprocess.run(command(reference, cache), cwd=ROOT, check=True, capture_output=True)
    outcomes = []
    moments = ["saving", "evaluating", "random"]
    for i in range(args.kills):
        outcome = kill_once(faulted, cache, moments[i % 3], rng)
        outcomes.append(outcome)
        print(f"kill {i + 1:2d}: {outcome:32s} latest checkpoint at step {latest_step(faulted)}", flush=True)
    finish = subprocess.run(command(faulted, cache), cwd=ROOT, capture_output=True, text=True)

    problems = []
    if finish.returncode != 0:
        problems.append(f"the final resume failed: {finish.stderr[-500:]}")
    for name in ("latest", "best"):
        path = checkpoint.newest(RunFolder(faulted), name)
        try:
            checkpoint.load(path)
        except Exception as e:  # noqa: BLE001  (any failure to load, or none there, is the finding)
            problems.append(f"the {name} checkpoint ({path}) does not load: {e}")
    strays = [str(p.relative_to(faulted)) for pattern in ("*tmp*", "*.previous") for p in faulted.rglob(pattern)]
    expected, got = train_losses(reference), train_losses(faulted)
    steps = [step for step, _ in got]
    duplicates = len(steps) - len(set(steps))
    tensorboard = train_steps_in_tensorboard(faulted)
    if strays:
        problems.append(f"stray files: {strays}")
    if steps != list(range(1, STEPS + 1)):
        problems.append(f"metrics.jsonl steps are not 1..{STEPS} once each ({duplicates} duplicates)")
    if tensorboard != list(range(1, STEPS + 1)):
        problems.append(f"TensorBoard train/loss steps are not 1..{STEPS} once each")
    if got != expected:
        first_diff = next((a, b) for a, b in zip(expected, got) if a != b) if len(got) == len(expected) else None
        problems.append(f"the losses differ from the uninterrupted run's (first difference: {first_diff})")
    survived = sum(o.startswith("killed") for o in outcomes)
    print(f"{survived}/{args.kills} kills survived, {duplicates} duplicate steps, {len(strays)} stray files; "
          f"loss sequence {'equals' if got == expected else 'DIFFERS FROM'} the uninterrupted run's")
    for problem in problems:
        print(f"PROBLEM: {problem}")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if problems or survived < args.kills else 0


if __name__ == "__main__":
    sys.exit(main())
