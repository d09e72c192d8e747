"""The Slurm recipes on a real two-node Slurm cluster (tools/slurm_cluster.sh: munge, slurmctld, slurmd n1 and n2 on
this machine), submitted as a user would: `sbatch [options] examples/slurm/train.sbatch [training flags]`, unchanged.

    python -m tests.slurm_stage        (./dev.sh slurm-test; needs root to install and start Slurm)

1. a two-node job: one torchrun on each node, world size 2, one run folder written by rank 0, each step once;
2. the same job requeued mid-run (`scontrol requeue`): it continues from its checkpoint, each step once (metrics.jsonl,
   TensorBoard and one wandb run), with the uninterrupted run's losses exactly;
3. the same job signalled as at its time limit (`--signal=B:TERM`, sent with `scancel --batch`): it saves, requeues
   itself and finishes the same way;
4. examples/slurm/sweep.sbatch as a job array of two local sweep workers, one per node: each trial runs once.
The stage skips itself, saying why, where Slurm cannot be installed or started (not root, no apt-get)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "tools" / "slurm_cluster.sh"
STEPS = 240
TRAINING = ["--data_path=tests/fixtures/classic_poems.txt", "--n_layer=2", "--n_head=2", "--n_embd=32",
            "--block_size=16", "--batch_size=4", "--dropout=0.0", "--eval_steps=2", "--fp32", "--sample_tokens=8",
            f"--max_steps={STEPS}", "--eval_interval=40", "--log_interval=1", "--report_to=tensorboard,wandb"]
CPU_JOB = ["--nodes=2", "--gpus-per-node=0", "--cpus-per-task=1"]  # the file asks for GPUs: a CPU cluster has none
STARTED = time.monotonic()


def say(message: str) -> None:
    print(f"--- [{time.monotonic() - STARTED:.0f}s] {message}", flush=True)


def fail(message: str) -> None:
    print(f"slurm stage FAILED: {message}", file=sys.stderr)
    raise SystemExit(1)


def skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "starting slurmd and munged needs root"
    if not shutil.which("slurmctld") and not shutil.which("apt-get"):
        return "Slurm is not installed and there is no apt-get to install it"
    return None


class Cluster:
    def __init__(self, folder: Path):
        self.folder = folder
        self.env = {**os.environ, "SLURM_CONF": str(folder / "slurm.conf"), "OMP_NUM_THREADS": "1",
                    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                    "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
        self.env.pop("WANDB_API_KEY", None)

    def run(self, *cmd: str) -> str:
        done = subprocess.run(cmd, env=self.env, cwd=ROOT, capture_output=True, text=True)
        if done.returncode:
            fail(f"{' '.join(cmd)} exited with {done.returncode}: {done.stderr.strip()}")
        return done.stdout.strip()

    def submit(self, options: list[str], script: str, args: list[str], **env: str) -> str:
        done = subprocess.run(["sbatch", "--parsable", *options, script, *args], env={**self.env, **env}, cwd=ROOT,
                              capture_output=True, text=True)
        if done.returncode:
            fail(f"sbatch refused {script}: {done.stderr.strip()}")
        return done.stdout.strip().split(";")[0]

    def in_queue(self, job: str) -> bool:
        return bool(self.run("squeue", "-h", "-j", job, "-o", "%i"))

    def wait_for_end(self, job: str, log: Path, timeout: float = 240) -> str:
        deadline = time.monotonic() + timeout
        while self.in_queue(job):
            if time.monotonic() > deadline:
                self.run("scancel", job)
                fail(f"job {job} did not finish within {timeout:.0f} s; its output:\n{read(log)}")
            time.sleep(1)
        return read(log)


def read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else f"({path} was not written)"


def train_steps(run: Path) -> list[int]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [row["step"] for row in rows if "train/loss" in row]


def losses(run: Path) -> dict:
    """Every logged loss by step and name: what an uninterrupted and a resumed run must share exactly."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {(row["step"], key): row[key] for row in rows for key in ("train/loss", "eval/loss") if key in row}


def wait_for_step(run: Path, step: int, job: str, cluster: Cluster, log: Path) -> None:
    deadline = time.monotonic() + 180
    while not (run / "metrics.jsonl").exists() or len(train_steps(run)) < step:
        if time.monotonic() > deadline or not cluster.in_queue(job):
            fail(f"job {job} never reached step {step}; its output:\n{read(log)}")
        time.sleep(0.2)


def check_each_step_once(run: Path, log: str) -> None:
    from tests.conftest import scalars
    from tests.wandb_offline import history_rows, run_files

    expected = list(range(1, STEPS + 1))
    if train_steps(run) != expected:
        fail(f"metrics.jsonl of {run} does not hold steps 1..{STEPS} once each: {train_steps(run)}\n{log}")
    logdirs = list((run / "logs").iterdir())  # one TensorBoard run, continued by every resumed segment
    tensorboard_steps = sorted(scalars(logdirs[0])[0].get("train/loss", [])) if len(logdirs) == 1 else logdirs
    if tensorboard_steps != expected:
        fail(f"TensorBoard's train/loss in {run} is not one run with each step once: {tensorboard_steps}")
    files = run_files(run)
    run_ids = {f.name for f in files}  # run-<id>.wandb: a resumed segment continues the same run
    wandb_steps = sorted(r["global_step"] for f in files for r in history_rows(f) if "train/loss" in r)
    if len(run_ids) != 1 or wandb_steps != expected:
        fail(f"wandb: {len(files)} offline segment(s) of runs {sorted(run_ids)}, train/loss steps {wandb_steps}")


def check_two_nodes(run: Path, log: str) -> None:
    for attempt in re.split(r"^job \d+ \(attempt \d+\)", log, flags=re.M)[1:]:
        nodes = re.findall(r"^node (n\d) \(127\.0\.0\.1\): torchrun with 1 process", attempt, re.M)
        if sorted(nodes) != ["n1", "n2"]:
            fail(f"expected one torchrun on each of n1 and n2 in every attempt, found {nodes}:\n{log}")
    config = json.loads((run / "config.json").read_text())
    if config.get("world_size") != 2:
        fail(f"config.json says world_size {config.get('world_size')}, not 2")


def uninterrupted(cluster: Cluster, work: Path) -> dict:
    say("job 1: two nodes, uninterrupted")
    run, log = work / "plain", work / "plain.out"
    job = cluster.submit([*CPU_JOB, f"--output={log}"], "examples/slurm/train.sbatch",
                         [*TRAINING, f"--cache_dir={work / 'cache'}", f"--output_dir={run}"], GPUS_PER_NODE="0")
    text = cluster.wait_for_end(job, log)
    if "done: " not in text:
        fail(f"job {job} did not finish its run:\n{text}")
    check_two_nodes(run, text)
    check_each_step_once(run, text)
    say(f"job {job}: one torchrun on n1 and one on n2, world size 2, steps 1..{STEPS} once each")
    return losses(run)


def interrupted(cluster: Cluster, work: Path, name: str, interrupt: list[str], expected: dict) -> None:
    run, log = work / name, work / f"{name}.out"
    job = cluster.submit([*CPU_JOB, f"--output={log}"], "examples/slurm/train.sbatch",
                         [*TRAINING, f"--cache_dir={work / 'cache'}", f"--output_dir={run}"], GPUS_PER_NODE="0")
    wait_for_step(run, STEPS // 4, job, cluster, log)
    cluster.run(*[job if part == "JOB" else part for part in interrupt])
    text = cluster.wait_for_end(job, log)
    resumed = re.search(r"^resumed from \S+ at step (\d+)$", text, re.M)
    if not resumed or "attempt 2" not in text or "done: " not in text:
        fail(f"job {job} was not requeued and resumed to the end:\n{text}")
    check_two_nodes(run, text)
    check_each_step_once(run, text)
    if losses(run) != expected:
        different = sorted(k for k in expected if losses(run).get(k) != expected[k])[:5]
        fail(f"job {job}'s losses differ from the uninterrupted run's, e.g. at {different}")
    say(f"job {job}: stopped at step {resumed.group(1)}, requeued, resumed: each step once in metrics.jsonl, "
        f"TensorBoard and one wandb run, every loss equal to the uninterrupted run's")


def sweep_array(cluster: Cluster, work: Path) -> None:
    say("job array: two local sweep workers, one per node, on a grid of two trials")
    sweep_file, root = work / "grid.yaml", work / "sweep"
    params = {flag.split("=")[0][2:]: {"value": flag.split("=", 1)[1]} for flag in TRAINING if "=" in flag}
    del params["report_to"]  # the local runner takes it from its own flags (--report_to=none below), not the file
    params.update({"fp32": {"value": True}, "max_steps": {"value": 20},
                   "eval_interval": {"value": 10}, "cache_dir": {"value": str(work / "cache")},
                   "learning_rate": {"values": [0.001, 0.002]}})
    sweep_file.write_text(json.dumps({"program": str(ROOT / "train_single_gpu.py"), "method": "grid",
                                      "metric": {"name": "eval/loss", "goal": "minimize"}, "parameters": params}))
    log = work / "sweep-%a.out"
    job = cluster.submit(["--array=0-1", "--gpus-per-node=0", "--cpus-per-task=1", f"--output={log}"],
                         "examples/slurm/sweep.sbatch", [str(sweep_file), f"--output_dir={root}", "--report_to=none"])
    logs = [Path(str(log).replace("%a", str(i))) for i in range(2)]
    deadline = time.monotonic() + 240
    while cluster.in_queue(job):
        if time.monotonic() > deadline:
            cluster.run("scancel", job)
            fail("the sweep array did not finish:\n" + "\n".join(read(p) for p in logs))
        time.sleep(1)
    state = json.loads((root / "sweep_state.json").read_text())
    trials = state["trials"]
    rates = sorted(t["params"]["learning_rate"] for t in trials)
    nodes = sorted(re.search(r"\((n\d)\)", read(p)).group(1) for p in logs)
    if rates != [0.001, 0.002] or any(t["status"] != "finished" for t in trials) or nodes != ["n1", "n2"]:
        fail(f"expected the two trials finished once each by workers on n1 and n2; state {trials}, nodes {nodes}:\n"
             + "\n".join(read(p) for p in logs))
    for trial in trials:
        steps = train_steps(root / trial["name"])
        if steps != list(range(1, 21)):
            fail(f"trial {trial['name']} logged steps {steps}, not 1..20 once each")
    say(f"job array {job}: trials {[t['name'] for t in trials]} finished once each, workers on n1 and n2")


def main() -> int:
    reason = skip_reason()
    if reason:
        print(f"slurm stage SKIPPED: {reason}")
        return 0
    work = Path(tempfile.mkdtemp(prefix="gpt-slurm-stage."))
    work.chmod(0o755)  # munged runs as its own user and must reach its folder inside
    cluster_dir = work / "cluster"
    say("starting a two-node Slurm cluster (tools/slurm_cluster.sh)")
    started = subprocess.run(["bash", str(CLUSTER), "start", str(cluster_dir)], capture_output=True, text=True)
    try:
        if started.returncode:
            if "not installed" in started.stderr:
                print(f"slurm stage SKIPPED: {started.stderr.strip()}")
                return 0
            fail(f"the cluster did not start: {started.stderr.strip()}")
        cluster = Cluster(cluster_dir)
        expected = uninterrupted(cluster, work)
        say("job 2: requeued mid-run with scontrol requeue (as a preemption would)")
        interrupted(cluster, work, "requeued", ["scontrol", "requeue", "JOB"], expected)
        say("job 3: SIGTERM to the batch script only, as --signal=B:TERM@120 sends it before the time limit")
        interrupted(cluster, work, "time-limit", ["scancel", "--signal=TERM", "--batch", "JOB"], expected)
        sweep_array(cluster, work)
    finally:
        subprocess.run(["bash", str(CLUSTER), "stop", str(cluster_dir)])
        shutil.rmtree(work, ignore_errors=True)
    say("slurm stage passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
