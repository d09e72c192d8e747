"""Several processes for real: torchrun and accelerate launch with two CPU processes on gloo, each one thread."""

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt_trainer.data.batches import EpochSampler, share_of
from gpt_trainer.system.distributed import World
from tests.conftest import CLASSIC_POEMS, TINY_SHAPE, interrupt_after_lines, plan_for, scalars
from tests.wandb_offline import history_rows, run_files

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def launch(cmd: list[str], env: dict = ENV, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run a launcher to the end; on a time-out stop it with SIGTERM, which it passes on to its worker processes
    (they run in sessions of their own, so killing the launcher alone would leave them behind)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def training(out: Path, cache_dir: Path, *extra: str) -> list[str]:
    return [str(ROOT / "train_single_gpu.py"), f"--data_path={CLASSIC_POEMS}", f"--cache_dir={cache_dir}",
            f"--output_dir={out}", *TINY_SHAPE, "--log_interval=1", *extra]


def weights(out: Path) -> dict:
    return torch.load(out / "checkpoints" / "latest.pt", weights_only=True)["model"]


def test_the_processes_share_each_epoch_once_between_them():
    tokens = np.arange(16 * 40 + 1)
    samplers = [EpochSampler(tokens, 16, seed=3) for _ in range(2)]
    seen = [np.concatenate([share_of(s.next_offsets(8), rank, 2) for _ in range(5)]) for rank, s in enumerate(samplers)]
    assert set(seen[0]).isdisjoint(seen[1])
    assert len(set(seen[0]) | set(seen[1])) == 40 == samplers[0].windows_per_epoch  # the epoch, once


@pytest.mark.slow
def test_one_step_on_two_processes_equals_two_accumulated_micro_batches_on_one(tmp_path, cache_dir):
    flags = ("--max_steps=1", "--eval_interval=1", "--report_to=none", "--dropout=0.0")
    two = launch([*TORCHRUN, *training(tmp_path / "two", cache_dir, *flags)])
    assert two.returncode == 0, two.stderr[-3000:]
    assert "x 2 processes" in two.stdout and "(global batch 8)" in two.stdout
    one = subprocess.run([sys.executable, *training(tmp_path / "one", cache_dir, *flags,
                                                   "--gradient_accumulation_steps=2")],
                         cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = weights(tmp_path / "two"), weights(tmp_path / "one")
    assert all(torch.allclose(a[k], b[k], atol=1e-5, rtol=0) for k in a)
    assert json.loads((tmp_path / "two" / "config.json").read_text())["global_batch_size"] == 8


@pytest.mark.slow
def test_only_the_main_process_writes_and_each_step_is_logged_once(tmp_path, cache_dir):
    env = {**ENV, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "HOME": str(tmp_path / "home")}
    out = tmp_path / "out"
    result = launch([*TORCHRUN, *training(out, cache_dir, "--max_steps=4", "--eval_interval=2", "--report_to=all")],
                    env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("done: 4 steps") == 1 and result.stdout.count("step 4 |") == 1
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if "train/loss" in line]
    assert steps == [1, 2, 3, 4]
    [logdir] = list((out / "logs").iterdir())
    assert scalars(logdir)[0]["train/loss"] == [1, 2, 3, 4]
    [run_file] = run_files(out)  # one wandb run
    assert [row["global_step"] for row in history_rows(run_file) if "train/loss" in row] == [1, 2, 3, 4]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signalled_torchrun_stops_every_process_at_one_step_says_so_and_resume_continues(tmp_path, cache_dir, sig):
    """torchrun passes SIGTERM or SIGINT on to its workers (then waits TORCH_ELASTIC_SHUTDOWN_TIMEOUT before SIGKILL):
    each says it saves, the main one saves and says where; torchrun's own report of the signal follows."""
    out = tmp_path / "out"
    argv = training(out, cache_dir, "--max_steps=100000", "--eval_interval=100000", "--save_interval=100000",
                    "--report_to=none")
    _, err = interrupt_after_lines([*TORCHRUN, *argv], out / "metrics.jsonl", 3, sig, cwd=ROOT, env=ENV, timeout=120)
    stopped_at = torch.load(out / "checkpoints" / "latest.pt", weights_only=True)["trainer"]["step"]
    assert stopped_at >= 3, err[-2000:]
    assert err.count(f"{signal.Signals(sig).name}: saving a checkpoint after this step") == 2, err[-3000:]
    assert (f"stopped at step {stopped_at}; checkpoint saved to {out / 'checkpoints' / 'latest.pt'}. Continue with the "
            f"same command plus --resume.") in err
    resumed = launch([*TORCHRUN, *argv, "--resume", f"--max_steps={stopped_at + 2}"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if "train/loss" in line]
    assert steps == list(range(1, stopped_at + 3))  # each step once, continuing where the stop saved


@pytest.mark.slow
def test_a_stop_asked_of_one_process_is_agreed_at_the_next_log_step_and_all_stop_there(tmp_path, cache_dir):
    """SIGTERM to rank 1 alone, after the log step 8: the processes compare stop requests only at log steps (there
    they wait for the device anyway), so both stop after step 16 (or a later multiple of 8), the same step, and the
    main process saves and says so though it never saw the signal."""
    out = tmp_path / "out"
    argv = training(out, cache_dir, "--max_steps=100000", "--eval_interval=100000", "--save_interval=100000",
                    "--report_to=none", "--log_interval=8")
    torchrun = subprocess.Popen([*TORCHRUN, *argv], cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text():  # step 8 was logged
            assert time.monotonic() < deadline and torchrun.poll() is None, torchrun.communicate()[1][-3000:]
            time.sleep(0.05)
        os.kill(worker_of(torchrun, 1), signal.SIGTERM)
        err = torchrun.communicate(timeout=120)[1]
    finally:
        if torchrun.poll() is None:
            torchrun.send_signal(signal.SIGTERM)
            torchrun.communicate(timeout=60)
    stopped_at = torch.load(out / "checkpoints" / "latest.pt", weights_only=True)["trainer"]["step"]
    assert stopped_at >= 16 and stopped_at % 8 == 0, err[-3000:]
    assert err.count("SIGTERM: saving a checkpoint after this step") == 1, err[-3000:]  # rank 1's alone
    assert f"stopped at step {stopped_at}; checkpoint saved to {out / 'checkpoints' / 'latest.pt'}." in err


def worker_of(launcher: subprocess.Popen, rank: int) -> int:
    """The pid of the training process a torchrun started as `rank`: its child with RANK=rank in its environment."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            environment = (stat.parent / "environ").read_bytes().split(b"\0")
            if parent == launcher.pid and f"RANK={rank}".encode() in environment:
                return int(stat.parent.name)
    raise AssertionError(f"torchrun {launcher.pid} has no process of rank {rank}")


@pytest.mark.slow
@pytest.mark.parametrize("killed", [1, 0])
def test_a_killed_process_is_named_by_the_survivor_with_the_checkpoint_to_continue_from(tmp_path, cache_dir, killed):
    """SIGKILL of one worker: torchrun stops the other with SIGTERM (30 s before its SIGKILL); the survivor ends with
    the sentence, then torchrun prints its own report of the failure (its one traceback)."""
    out, survivor, host = tmp_path / "out", 1 - killed, socket.gethostname()
    latest = out / "checkpoints" / "latest.pt"
    argv = training(out, cache_dir, "--max_steps=100000", "--eval_interval=100000", "--save_interval=4",
                    "--report_to=none")
    torchrun = subprocess.Popen([*TORCHRUN, *argv], cwd=ROOT, env={**ENV, "GPT_TRAINER_HEARTBEAT_S": "0.5"},
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while not latest.exists():  # a checkpoint to name
            assert time.monotonic() < deadline and torchrun.poll() is None, torchrun.communicate()[1][-3000:]
            time.sleep(0.1)
        os.kill(worker_of(torchrun, killed), signal.SIGKILL)
        err = torchrun.communicate(timeout=120)[1]
    finally:
        if torchrun.poll() is None:
            torchrun.send_signal(signal.SIGTERM)
            torchrun.communicate(timeout=60)
    found = re.search(rf"^error: rank {survivor} \({host}: step \d+\) lost its connection to the other processes: "
                      rf"rank\(s\) {killed} stopped \(no heartbeat since\), last seen rank {killed} on {host}: step "
                      rf"\d+\. .* The last checkpoint is {re.escape(str(latest))} \(step (\d+)\): continue with the "
                      rf"same command plus --resume\.$", err, re.MULTILINE)
    assert found, err[-3000:]
    assert int(found.group(1)) == torch.load(latest, weights_only=True)["trainer"]["step"]
    assert err.count("Traceback") == 1 and "ChildFailedError" in err, err[-3000:]  # torchrun's, after the sentence


@pytest.mark.slow
def test_accelerate_launch_runs_the_same_training(tmp_path, cache_dir):
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    # accelerate's own --cpu flag runs a single process; --multi_gpu goes through torchrun, and on a machine
    # without GPUs our program then joins the processes over gloo on the CPU
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes=2",
                  f"--main_process_port={port}"]
    out = tmp_path / "out"
    result = launch([*accelerate, *training(out, cache_dir, "--max_steps=2", "--eval_interval=2", "--report_to=none")])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "x 2 processes" in result.stdout
    assert json.loads((out / "config.json").read_text())["world_size"] == 2


def test_resuming_with_another_number_of_processes_is_reported(tiny_cfg):
    cfg = tiny_cfg("--max_steps=1000")  # a fixed budget: the warm-up fits either way
    one, two = plan_for(cfg), plan_for(cfg, world=World(0, 0, 2))
    assert two.resume_changes({"config": one.flags(), "world_size": 1}) == {"world_size": [1, 2]}
    assert one.resume_changes({"config": one.flags()}) == {}  # checkpoints from before: one process


# ---- several nodes: two processes started by hand with the variables a launcher sets, rank 0 serving the store ----
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(argv_of_rank, env: dict | None = None, one_node: bool = False) -> list[subprocess.Popen]:
    """Rank 0 and rank 1 as two "nodes" of one process each (what srun + a plain launch, or two pods, give), or as
    two processes of `one_node` (each its own LOCAL_RANK: its own GPU), started by hand without a launcher."""
    port = free_port()
    return [subprocess.Popen(argv_of_rank(rank), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env={**ENV, **(env or {}), "RANK": str(rank), "LOCAL_RANK": str(rank if one_node else 0),
                                  "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2" if one_node else "1",
                                  "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
            for rank in (0, 1)]


WAITING_SCRIPT = """
import os, sys, time, torch
os.environ.pop("GPT_TRAINER_HEARTBEAT_S", None)
from gpt_trainer.system import distributed
from gpt_trainer.errors import RunStopped
os.environ["GPT_TRAINER_HEARTBEAT_S"] = "0.2"  # after the import: read when the run starts
world, _ = distributed.start(distributed.launched_world(), torch.device("cpu"), 2.0)
def work():
    if world.rank == 1:
        if sys.argv[1] == "dies":
            os._exit(3)
        time.sleep(5)  # preparing for longer than the 2 s --dist_timeout
    return f"rank {world.rank} prepared"
try:
    print(distributed.everyone_does(world, "preparing the token data", work, 2.0), flush=True)
except RunStopped as e:
    print(f"stopped: {e}", flush=True)
    os._exit(1)
os._exit(0)
"""


@pytest.mark.parametrize("rank_1", ["slow", "dies"])
def test_a_long_preparation_is_waited_for_and_a_process_that_died_meanwhile_is_named(tmp_path, rank_1):
    """Each process sets its heartbeat to 0.2 s after importing the package: the slow one, beating at the default 5 s,
    would be taken for dead after the 2 s --dist_timeout."""
    script = tmp_path / "wait.py"
    script.write_text(WAITING_SCRIPT)
    ranks = start_ranks(lambda rank: [sys.executable, str(script), rank_1])
    outputs = [proc.communicate(timeout=60)[0] for proc in ranks]
    if rank_1 == "slow":  # 5 s of work against a 2 s time-out: alive, so waited for
        assert [proc.returncode for proc in ranks] == [0, 0], outputs
        assert "rank 0 prepared" in outputs[0] and "rank 1 prepared" in outputs[1]
    else:
        assert ranks[0].returncode == 1, outputs
        assert (f"stopped: rank(s) 1 stopped answering while preparing the token data: no sign of life for 2 s "
                f"(--dist_timeout). rank 1 on {socket.gethostname()}: preparing the token data") in outputs[0]


def test_the_roll_call_belongs_to_the_world_start_returns_and_its_pace_is_read_when_the_run_starts(monkeypatch):
    """The package was imported (above) before GPT_TRAINER_HEARTBEAT_S and GPT_TRAINER_FAILED_PEER_GRACE_S are set:
    `start` reads them, and the roll call it makes is the returned world's, beating at that pace; the world it was
    given is left as it was. A stand-in for a job: a gloo group of this one process, joined here, while the world
    says two (so `start` makes a roll call), and a store served by this test."""
    import torch.distributed as dist

    from gpt_trainer.system import distributed

    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(store.port))
    monkeypatch.setenv("GPT_TRAINER_HEARTBEAT_S", "0.05")
    monkeypatch.setenv("GPT_TRAINER_FAILED_PEER_GRACE_S", "7")
    dist.init_process_group("gloo", store=dist.PrefixStore("group", store), rank=0, world_size=1)
    launched = World(0, 0, 2)
    world = launched
    try:
        world, _ = distributed.start(launched, torch.device("cpu"), 5.0)
        assert launched.roll is None and world == launched and world.roll is not None
        assert (world.roll.heartbeat_s, world.roll.failed_peer_grace_s) == (0.05, 7.0)
        time.sleep(1.0)
        assert int(world.roll.read("beat", 0)) >= 5  # about 20 beats in the second, not one in 5 s
        distributed.report(world, "step 3")
        assert world.roll.read("doing", 0) == f"{socket.gethostname()}: step 3"
    finally:
        distributed.stop(world, finished=False)
    assert not dist.is_initialized()


@pytest.mark.slow
def test_a_node_that_does_not_see_the_run_folder_stops_the_resume_naming_it(tmp_path, cache_dir):
    shared = tmp_path / "shared"
    first = launch([sys.executable, *training(shared, cache_dir, "--max_steps=2", "--eval_interval=2")])
    assert first.returncode == 0, first.stderr[-2000:]
    before = sorted(p.relative_to(shared) for p in shared.rglob("*"))
    # rank 1 is on a "node" whose --output_dir is a local folder, not the shared one
    ranks = start_ranks(lambda rank: [sys.executable, *training(shared if rank == 0 else tmp_path / "local", cache_dir,
                                                                  "--max_steps=4", "--eval_interval=2", "--resume")])
    outputs = [proc.communicate(timeout=120)[0] for proc in ranks]
    assert [proc.returncode for proc in ranks] == [2, 2], outputs
    assert (f"rank 0 on {socket.gethostname()} resumes from {shared / 'checkpoints' / 'latest.pt'} (step 2), but rank "
            f"1 on {socket.gethostname()} sees no checkpoint. Every node must see the same output folder") in outputs[0]
    assert sorted(p.relative_to(shared) for p in shared.rglob("*")) == before  # nothing written
    assert not (tmp_path / "local").exists() or not any((tmp_path / "local").iterdir())


@pytest.mark.slow
def test_a_process_that_stops_answering_is_named_after_dist_timeout(tmp_path, cache_dir):
    out = tmp_path / "out"
    ranks = start_ranks(lambda rank: [sys.executable, *training(out, cache_dir, "--max_steps=100000",
                                                                  "--eval_interval=100000", "--dist_timeout=3")],
                        env={"GPT_TRAINER_HEARTBEAT_S": "0.5"})
    try:
        deadline = time.monotonic() + 90
        while not (out / "metrics.jsonl").exists() or len((out / "metrics.jsonl").read_text().splitlines()) < 5:
            assert time.monotonic() < deadline and ranks[0].poll() is None, ranks[0].communicate()[0][-3000:]
            time.sleep(0.1)
        ranks[1].send_signal(signal.SIGSTOP)  # alive but silent: a hung process
        output = ranks[0].communicate(timeout=60)[0]
    finally:
        ranks[1].kill()
        ranks[1].communicate()
    assert ranks[0].returncode == 1, output[-3000:]
    # rank 1 stopped before or inside the step rank 0 waits in: named either way (its heartbeat stopped too)
    found = re.search(rf"rank 0 \({socket.gethostname()}: step (\d+)\) waited --dist_timeout 3 s for the other "
                      rf"processes. Rank\(s\) 1 did not arrive: rank 1 on {socket.gethostname()}: step (\d+)", output)
    assert found and int(found.group(2)) in (int(found.group(1)) - 1, int(found.group(1))), output[-3000:]
    assert "Traceback" not in output


@pytest.mark.slow
def test_doctor_distributed_shows_what_each_process_sees_and_that_they_meet():
    done = launch([*TORCHRUN, "-m", "gpt_trainer.doctor", "--distributed", "--timeout=30"])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for rank in (0, 1):
        assert f"[rank {rank}] RANK:" in done.stdout
        assert re.search(rf"\[rank {rank}\] backend: +gloo \(CPU\)", done.stdout)
        assert re.search(rf"\[rank {rank}\] rendezvous endpoint: +\S+:\d+, reached from 127\.0\.0\.1 on lo",
                         done.stdout)
    assert re.search(r"joined: +all 2 processes: rank 0 on \S+ \(pid \d+\), rank 1 on \S+ \(pid \d+\)", done.stdout)


# ---- a process that cannot go on ends the job within seconds; time-outs: long for start-up, --dist_timeout after ----
TIMEOUT_SCRIPT = """
import os, time, torch
from gpt_trainer.system import distributed
world = distributed.launched_world()
distributed.start(world, torch.device("cpu"), 2.0)
def late_sum():
    if world.rank == 1:
        time.sleep(4)  # longer than the 2 s --dist_timeout
    started = time.monotonic()
    try:
        distributed.all_reduce(torch.ones(1), world)
        return f"waited {time.monotonic() - started:.0f} s"
    except RuntimeError as e:
        return f"failed after {time.monotonic() - started:.0f} s: {distributed.collective_failure(e)}"
print("start-up:", late_sum(), flush=True)
distributed.settle_timeout(world, 2.0)  # what the loop does after the first step
print("training:", late_sum(), flush=True)
os._exit(0)
"""


def test_a_collective_waits_long_in_start_up_and_dist_timeout_after_the_first_step(tmp_path):
    """Before the first step is done (joining, compiling) a collective waits STARTUP_TIMEOUT_S, however short
    --dist_timeout is; after it, --dist_timeout (2 s here) ends one that waits for a late process."""
    script = tmp_path / "timeouts.py"
    script.write_text(TIMEOUT_SCRIPT)
    ranks = start_ranks(lambda rank: [sys.executable, str(script)])
    outputs = [proc.communicate(timeout=60)[0] for proc in ranks]
    assert "start-up: waited 4 s" in outputs[0], outputs
    assert "training: failed after 2 s: timed out" in outputs[0], outputs


@pytest.mark.parametrize("text, kind", [
    ("[/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 2000ms for recv operation "
     "to complete", "timed out"),
    ("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:2463", "lost"),
    ("[Rank 0] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=41, OpType=ALLREDUCE, NumelIn=1, "
     "NumelOut=1, Timeout(ms)=600000) ran for 600081 milliseconds before timing out.", "timed out"),
    ("NCCL communicator was aborted on rank 1.  Original reason for failure was: [Rank 1] Watchdog caught collective "
     "operation timeout: WorkNCCL(SeqNum=9, OpType=ALLREDUCE) ran for 600000 milliseconds before timing out.",
     "timed out"),
    ("NCCL communicator was aborted on rank 0. ", "lost"),
    ("NCCL error in: ProcessGroupNCCL.cpp:3356, remote process exited or there was a network error, NCCL version "
     "2.27.5\nncclRemoteError: A call failed possibly due to a network error or a remote process exiting prematurely.",
     "lost"),
    ("Some NCCL operations have failed or timed out. Due to the asynchronous nature of CUDA kernels, subsequent GPU "
     "operations might run on corrupted/incomplete data.", "lost"),
    ("CUDA error: an illegal memory access was encountered", None),
    ("mat1 and mat2 shapes cannot be multiplied (4x32 and 64x32)", None),
])
def test_gloo_s_and_nccl_s_words_for_a_missing_process_are_recognised(text, kind):
    """The texts gloo and PyTorch's ProcessGroupNCCL (RCCL on ROCm too) put in the errors of collectives, in errors
    constructed here (stand-ins: no NCCL runs here; tests/test_gpu.py has the real one where two GPUs are)."""
    from gpt_trainer.system.distributed import collective_failure

    assert collective_failure(RuntimeError(text)) == kind


OUT_OF_MEMORY_ON_RANK_1 = """
import os, sys, torch
from gpt_trainer.commands.train import main
from gpt_trainer.model.gpt import GPT
forward, calls = GPT.forward, []
def forward_on_a_full_gpu(self, *args, **kwargs):  # stands in for rank 1's GPU running out in its 4th training step
    if self.training and os.environ["RANK"] == "1":
        calls.append(1)
        if len(calls) == 4:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
    return forward(self, *args, **kwargs)
GPT.forward = forward_on_a_full_gpu
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_process_out_of_memory_ends_the_other_within_seconds_naming_it(tmp_path, cache_dir):
    """Rank 1 runs out of memory (a stand-in raises PyTorch's OutOfMemoryError in its 4th training step) while rank 0
    waits for it in the step's gradient exchange: rank 0 ends within seconds, saying that rank 1 ran out of memory,
    not after --dist_timeout (600 s) and not with a guess."""
    outputs, between = out_of_memory_on_rank_1(tmp_path, cache_dir)
    assert between < 10 and "Traceback" not in outputs[0]
    assert "Its own log has the whole message. No checkpoint was saved yet: continue with" in outputs[0]


def out_of_memory_on_rank_1(tmp_path: Path, cache_dir: Path, *flags: str, one_node: bool = False) -> tuple[list, float]:
    """Train on two processes started by hand until rank 1 runs out of memory in its 4th step (a stand-in); check
    what each says; (their outputs, the seconds rank 0 outlived rank 1)."""
    script, out, host = tmp_path / "oom.py", tmp_path / "out", socket.gethostname()
    script.write_text(OUT_OF_MEMORY_ON_RANK_1)
    ranks = start_ranks(lambda rank: [sys.executable, str(script), *training(out, cache_dir, "--max_steps=50",
                                                                             "--eval_interval=1000", *flags)[1:]],
                        one_node=one_node)
    ended = {}
    deadline = time.monotonic() + 180
    while len(ended) < 2 and time.monotonic() < deadline:
        for rank, proc in enumerate(ranks):
            if rank not in ended and proc.poll() is not None:
                ended[rank] = time.monotonic()
        time.sleep(0.05)
    outputs = [proc.communicate(timeout=60)[0] for proc in ranks]
    assert [proc.returncode for proc in ranks] == [1, 1], outputs
    assert "error: out of memory in training step 4: " in outputs[1], outputs[1][-3000:]
    assert re.search(rf"^error: rank 0 \({host}: step 4\) stopped because rank 1 \({host}: step 4\) could not go on: "
                     rf"out of memory in training step 4: .*\. Its own log has the whole message\.", outputs[0],
                     re.MULTILINE), outputs[0][-3000:]
    return outputs, ended[0] - ended[1]


REPORTED_BUT_STILL_THERE = """
import os, time, torch
from gpt_trainer.errors import RunStopped
from gpt_trainer.system import distributed
world, _ = distributed.start(distributed.launched_world(), torch.device("cpu"), 600.0)
distributed.report(world, "step 7")
if world.rank == 1:
    distributed.report_failure(world, RunStopped("out of memory in training step 7: model tiny. Fixes: ..."))
    time.sleep(60)  # said so, but keeps its connections open: nothing ends rank 0's collective
    os._exit(1)
distributed.all_reduce(torch.ones(1), world)  # waits for rank 1, up to the 600 s start-up time-out
print("the collective returned", flush=True)
os._exit(0)
"""


def test_a_process_whose_peer_failed_ends_itself_when_no_error_reaches_it(tmp_path):
    """Rank 1 reports that it cannot go on but does not leave, so rank 0's collective gets no error: what a process
    waiting on a NCCL collective (or on the GPU behind one) sees, stood in for by gloo here. Rank 0's heartbeat thread
    sees the report, gives its main thread GPT_TRAINER_FAILED_PEER_GRACE_S (1 s here) and ends the process with the
    sentence."""
    script, host = tmp_path / "stuck.py", socket.gethostname()
    script.write_text(REPORTED_BUT_STILL_THERE)
    ranks = start_ranks(lambda rank: [sys.executable, str(script)],
                        env={"GPT_TRAINER_HEARTBEAT_S": "0.2", "GPT_TRAINER_FAILED_PEER_GRACE_S": "1"})
    try:
        started = time.monotonic()
        output = ranks[0].communicate(timeout=60)[0]
        took = time.monotonic() - started
    finally:
        ranks[1].kill()
        ranks[1].communicate()
    assert ranks[0].returncode == 1 and took < 15, output
    assert (f"error: rank 0 ({host}: step 7) stopped because rank 1 ({host}: step 7) could not go on: out of memory "
            f"in training step 7: model tiny. Its own log has the whole message. This process did not end by itself "
            f"within 1 s, so it was ended") in output
    assert "the collective returned" not in output
