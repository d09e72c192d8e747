"""Several processes (torchrun, accelerate launch): PyTorch's own process group, NCCL on CUDA (RCCL on ROCm goes by
the same name) and gloo on the CPU. Without a launcher's environment everything here is a no-op for one process.

Each process also notes what it is doing in the job's key-value store (the one torchrun, or rank 0, serves at
MASTER_ADDR:MASTER_PORT), so a process that waits for the others can say which of them it waits for, and a long step
that only some processes take (preparing a corpus) is told from a process that died."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import threading
import time
import dataclasses
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from ..errors import RunStopped, UsageError, notice

# How often every process says it is alive (a silent one is named after --dist_timeout). The tests shorten it through
# GPT_TRAINER_HEARTBEAT_S, read when a run starts (start), not when this module is imported.
HEARTBEAT_S = 5.0
# The least time a collective may wait until the first step is done (torchtitan's long start-up time-out): joining,
# loading a checkpoint and compiling the first step take minutes on some processes and seconds on others; from the
# second step on --dist_timeout applies (settle_timeout).
STARTUP_TIMEOUT_S = 600.0
# How long a process whose peer reported a failure gives its own main thread to end with the sentence before it ends
# itself: a main thread waiting on a GPU that an aborted NCCL communicator did not release never gets an error. The
# tests shorten it through GPT_TRAINER_FAILED_PEER_GRACE_S, read when a run starts.
FAILED_PEER_GRACE_S = 30.0


@dataclass(frozen=True)
class World:
    """Who this process is among the job's processes; once `start` joined them, also the job's roll call (`roll`:
    what each process does, read when one waits for the others; None for one process)."""
    rank: int = 0
    local_rank: int = 0
    size: int = 1
    roll: Roll | None = field(default=None, compare=False, repr=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1


def launched_world() -> World:
    """What torchrun / accelerate launch set (RANK, LOCAL_RANK, WORLD_SIZE); one process without them."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    return World(int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")), size)


def start(world: World, device: torch.device, timeout_s: float) -> tuple[World, torch.device]:
    """Join the process group; returns this process's world, which holds the job's roll call from now on, and its
    device (cuda:LOCAL_RANK on GPUs). A rank that stops answering makes the others fail after `timeout_s` instead of
    waiting forever (until the first step is done, after STARTUP_TIMEOUT_S if that is longer)."""
    if not world.active:
        return world, device
    if device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        join("nccl" if device.type == "cuda" else "gloo", world, timeout_s,
             **({"device_id": device} if device.type == "cuda" else {}))
        set_timeout(max(timeout_s, STARTUP_TIMEOUT_S))
    if "MASTER_PORT" in os.environ:  # every launcher sets it (the process group's own rendezvous needs it)
        roll = Roll(world, timeout_s, seconds_from_environment("GPT_TRAINER_HEARTBEAT_S", HEARTBEAT_S),
                    seconds_from_environment("GPT_TRAINER_FAILED_PEER_GRACE_S", FAILED_PEER_GRACE_S))
        roll.report("joined")
        roll.start_beating()
        world = dataclasses.replace(world, roll=roll)
    return world, device


def seconds_from_environment(name: str, default: float) -> float:
    """A pace the tests change through the environment, read when a run starts."""
    return float(os.environ.get(name, default))


def set_timeout(timeout_s: float) -> None:
    """How long every collective of the process group may wait for the others from now on."""
    dist.distributed_c10d._set_pg_timeout(timedelta(seconds=timeout_s))


def settle_timeout(world: World, timeout_s: float) -> None:
    """After the first step: the start-up's long allowance ends, and a collective that waits `timeout_s`
    (--dist_timeout) for a process that hangs or vanished fails. Every process changes it at the same point, after a
    barrier (torchtitan's way): one still finishing its first step under the long time-out is not met by one already
    on the short one."""
    if not world.active or not dist.is_initialized():
        return
    dist.barrier()
    set_timeout(timeout_s)


# ---- meeting the others: the rendezvous at MASTER_ADDR:MASTER_PORT ------------------------------------------------
# torchrun joins its own rendezvous (--rdzv_endpoint, --master_addr) before it starts this program, and reports its
# failures itself; what reaches this code is the meeting of the training processes at MASTER_ADDR:MASTER_PORT: the
# launcher's store under torchrun (up already), or rank 0's own when the processes were started by hand.
DOCTOR = "`python -m gpt_trainer.doctor --distributed`, started the same way on each machine, shows what each sees"


def join(backend: str, world: World, timeout_s: float, **options) -> None:
    """Join the process group; a rendezvous that cannot be reached or completed within `timeout_s` ends the run with a
    sentence naming the endpoint, what failed and the fix, instead of torch's traceback."""
    host, port = rendezvous_endpoint(world)
    reach(world, host, port, timeout_s)
    try:
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s), **options)
    except dist.DistError as error:
        raise RunStopped(could_not_join(world, host, port, timeout_s, why_not_joined(port, error))) from None


def rendezvous_endpoint(world: World) -> tuple[str, int]:
    """MASTER_ADDR and MASTER_PORT, which every launcher sets; a process started by hand may lack them."""
    host, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    unset = [name for name, value in (("MASTER_ADDR", host), ("MASTER_PORT", port)) if not value]
    if unset:
        raise UsageError(f"WORLD_SIZE={world.size} makes this process rank {world.rank} of several, but "
                         f"{' and '.join(unset)} {'is' if len(unset) == 1 else 'are'} not set: every process needs "
                         f"rank 0's address (MASTER_ADDR) and a free port there (MASTER_PORT), the same on each. "
                         f"Start the job with torchrun, which sets them, or set both.")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"MASTER_PORT must be a port number from 1 to 65535 (got {port!r}).")
    return host, int(port)


def hosts_the_store(world: World) -> bool:
    """Rank 0 of processes started by hand opens the rendezvous itself; under torchrun its agent does."""
    return world.rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"


def reach(world: World, host: str, port: int, timeout_s: float) -> None:
    """Wait until the rendezvous answers, for at most `timeout_s`: rank 0 may start after the others, and a name may
    resolve only once its machine is up. The one that opens the port only needs the name to resolve. Checked here,
    in plain sockets, because torch's store retries silently until its time-out and then raises a stack trace."""
    deadline = time.monotonic() + timeout_s
    while (problem := knock(host, port, not hosts_the_store(world), deadline - time.monotonic())) is not None:
        if time.monotonic() >= deadline:
            raise RunStopped(could_not_join(world, host, port, timeout_s, problem))
        time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))


def knock(host: str, port: int, connect: bool, wait_s: float) -> str | None:
    """None when host:port accepts a connection (connect=False: when the name resolves); else what failed, in
    words."""
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        return f"the name {host} does not resolve ({error.strerror})"
    if not connect:
        return None
    try:
        socket.create_connection((host, port), timeout=min(max(wait_s, 0.1), 5.0)).close()
    except ConnectionRefusedError:
        return f"nothing listens on port {port} there (connection refused)"
    except TimeoutError:
        return (f"{host} does not answer on port {port} (a wrong or unreachable address, or a firewall that drops "
                f"the packets)")
    except OSError as error:
        return f"{host} cannot be reached ({error.strerror or error})"
    return None


def why_not_joined(port: int, error: BaseException) -> str:
    """What torch's rendezvous said, in words: rank 0's port taken, the others not arriving, or something at the
    endpoint that is not a rendezvous."""
    text = str(error)
    if "EADDRINUSE" in text or "address already in use" in text:
        return (f"port {port} is in use on this machine (another job, or a run still ending), so rank 0 cannot open "
                f"it: choose another MASTER_PORT, the same for every process")
    arrived = re.search(r"(\d+)/(\d+) clients joined", text)
    if arrived:
        return f"rank 0 opened it, but only {arrived.group(1)} of the {arrived.group(2)} processes arrived"
    return (f"something answers there, but not as the job's rendezvous ({text.splitlines()[0][:200]}): another "
            f"program on that port, or a proxy in between")


def could_not_join(world: World, host: str, port: int, timeout_s: float, problem: str) -> str:
    check = ("that the other processes run, with MASTER_ADDR set to this machine as they reach it and the same "
             "MASTER_PORT" if hosts_the_store(world) else "that MASTER_ADDR is rank 0's machine as this one reaches it "
             "(under torchrun: its --rdzv_endpoint or --master_addr), that rank 0 runs with the same MASTER_PORT")
    return (f"rank {world.rank} could not join the rendezvous at {host}:{port} (MASTER_ADDR:MASTER_PORT) within "
            f"{timeout_s:g} s (--dist_timeout): {problem}. Check {check}, and that no firewall blocks the port; "
            f"{DOCTOR}.")


def stop(world: World, finished: bool) -> None:
    """Leave the process group. Processes that finished wait for each other first: gloo can abort a process that
    tears its group down while another still uses it (the main process samples after training). One that failed
    leaves at once (report_failure has told the others); under NCCL it aborts its communicators, since an orderly
    shutdown would wait for collectives that the others may never join."""
    if world.roll is not None:
        world.roll.stopped.set()
        world.roll.ending.set()
    if world.active and dist.is_initialized():
        if finished:
            dist.barrier()
        elif dist.get_backend() == "nccl":
            with contextlib.suppress(Exception):  # already aborted, or broken: the process ends either way
                dist.group.WORLD.abort()
            return
        dist.destroy_process_group()


def shard(model: torch.nn.Module, precision: str) -> None:
    """--parallel fsdp (FSDP2): each transformer block is one unit, then the root (the tied embedding and output
    weight, the positions, the final norm); every process keeps a dim-0 slice of each parameter, gathers a unit's
    whole weights just before it runs and frees them after, and reduce-scatters the gradients. A bf16 run computes in
    bf16 through FSDP's policy (parameters cast once per gather, gradients reduced in fp32), torchtitan's way, instead
    of autocast; fp32 runs keep fp32 throughout. Shard before building the optimizer: sharding replaces the
    parameters."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if precision == "bf16"
              else MixedPrecisionPolicy())
    for block in model.blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)


def all_reduce(tensor: torch.Tensor, world: World, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if world.active:
        dist.all_reduce(tensor, op=op)
    return tensor


# ---- who is doing what: the job's roll call ------------------------------------------------------------------------
class Roll:
    """This process's line in the job's store: where it runs and what it does; read by the others when they wait."""

    def __init__(self, world: World, timeout_s: float, heartbeat_s: float = HEARTBEAT_S,
                 failed_peer_grace_s: float = FAILED_PEER_GRACE_S):
        self.world, self.timeout_s, self.host = world, timeout_s, socket.gethostname()
        self.heartbeat_s, self.failed_peer_grace_s = heartbeat_s, failed_peer_grace_s
        # keys of this attempt only: torchrun's store lives on across the restarts of one job
        self.prefix = (f"gpt_trainer/{os.environ.get('TORCHELASTIC_RUN_ID', '')}/"
                       f"{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/")
        self.store = dist.TCPStore(os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ["MASTER_PORT"]),
                                   is_master=False, timeout=timedelta(seconds=max(timeout_s, 30)),
                                   wait_for_workers=False)
        self.lock = threading.Lock()
        self.stopped = threading.Event()  # no more heartbeats
        self.ending = threading.Event()  # the main thread is on its way out (it failed, explained a lost peer, or left)

    def start_beating(self) -> None:
        """A heartbeat from a thread of its own for the whole run: a process that is busy alone (preparing a
        corpus) still answers; one that died, froze or lost its node falls silent. With each beat it also looks
        whether another process reported that it could not go on (end_with_the_failed)."""
        def keep_beating():
            while not self.stopped.wait(self.heartbeat_s):
                with contextlib.suppress(Exception):  # the store's host may be gone at the end: nothing to tell
                    self.beat()
                    failed = self.first_failure()
                    if failed is not None and failed[0] != self.world.rank and not self.ending.is_set():
                        self.end_with_the_failed()
                        return
        threading.Thread(target=keep_beating, daemon=True, name="heartbeat").start()

    def end_with_the_failed(self) -> None:
        """Another process cannot go on. gloo fails this one's collectives by itself once the other has left; NCCL
        would leave them waiting for --dist_timeout, so its communicators are aborted, which ends the collectives
        and the GPU work waiting on them with an error the main thread explains (missing_peers). If the main thread
        has not ended within failed_peer_grace_s, the process ends here, with the sentence."""
        if dist.is_initialized() and dist.get_backend() == "nccl":
            with contextlib.suppress(Exception):
                dist.group.WORLD.abort()
        if not self.ending.wait(self.failed_peer_grace_s):
            notice(f"error: {failed_peer(self)} This process did not end by itself within "
                   f"{self.failed_peer_grace_s:g} s, so it was ended: continue from the last checkpoint with the same "
                   f"command plus --resume.")
            os._exit(1)

    def fail(self, what: str) -> None:
        """Tell the others this process cannot go on, and why; the first to tell is the one they name."""
        with self.lock:
            order = self.store.add(f"{self.prefix}failed", 1)
            self.store.set(f"{self.prefix}failed/{order}", f"{self.world.rank} {what}")

    def first_failure(self) -> tuple[int, str] | None:
        """(rank, why) of the first process that reported it could not go on; None while none has."""
        key = f"{self.prefix}failed/1"
        with self.lock:
            if not self.store.check([key]):
                return None
            rank, what = self.store.get(key).decode().split(" ", 1)
        return int(rank), what

    def report(self, doing: str) -> None:
        self.note("doing", f"{self.host}: {doing}")

    def note(self, what: str, value: str) -> None:
        with self.lock:
            self.store.set(f"{self.prefix}{what}/{self.world.rank}", value)

    def beat(self) -> None:
        with self.lock:
            self.store.add(f"{self.prefix}beat/{self.world.rank}", 1)

    def finished(self, doing: str) -> None:
        with self.lock:
            self.store.set(f"{self.prefix}done {doing}/{self.world.rank}", "1")
            self.store.add(f"{self.prefix}done {doing}", 1)

    def count_finished(self, doing: str) -> int:
        with self.lock:
            return self.store.add(f"{self.prefix}done {doing}", 0)

    def read(self, what: str, rank: int) -> str | None:
        key = f"{self.prefix}{what}/{rank}"
        with self.lock:
            return self.store.get(key).decode() if self.store.check([key]) else None

    def others(self) -> dict[int, str]:
        """What each other process last said it was doing."""
        return {rank: self.read("doing", rank) or "(never joined)" for rank in range(self.world.size)
                if rank != self.world.rank}


def report(world: World, doing: str) -> None:
    """Tell the others what this process is doing now (no-op for one process)."""
    if world.roll is not None:
        world.roll.report(doing)


def note_saved(world: World, step: int) -> None:
    """The main process has written latest.pt at `step`: the others name it if the main process is lost."""
    if world.roll is not None and world.is_main:
        world.roll.note("saved", str(step))


def last_saved(world: World, decided: int | None) -> int | None:
    """The step of the last latest.pt (None: none this attempt). The main process knows (`decided`); the others take
    its word from the store, since a save they saw decided may not have been finished, or, with the store gone, the
    last save they saw decided."""
    if world.is_main or world.roll is None:
        return decided
    try:
        written = world.roll.read("saved", 0)
    except dist.DistError:
        return decided
    return int(written) if written is not None else None


def everyone_does(world: World, doing: str, work, timeout_s: float):
    """`work()` on every process, then wait for all: however long some take (a node preparing its token cache while
    another found it ready), as long as they are alive; one silent for `timeout_s` stops the wait, named."""
    roll = world.roll
    if roll is None or not world.active:
        return work()
    roll.report(doing)
    result = work()
    roll.finished(doing)
    _wait_for_the_others(roll, doing, timeout_s)
    return result


def _wait_for_the_others(roll: Roll, doing: str, timeout_s: float) -> None:
    """Polls one counter while all goes well; looks at who is missing, and whether they live, every few seconds."""
    world, last_beat, last_change, started, said, looked = roll.world, {}, {}, time.monotonic(), 0.0, 0.0
    while roll.count_finished(doing) < world.size:
        time.sleep(min(1.0, roll.heartbeat_s))
        now = time.monotonic()
        if now - looked < min(roll.heartbeat_s, timeout_s / 4):
            continue
        looked = now
        missing = [rank for rank in range(world.size) if roll.read(f"done {doing}", rank) is None]
        for rank in missing:
            beat = roll.read("beat", rank)
            if beat != last_beat.get(rank, "unseen"):
                last_beat[rank], last_change[rank] = beat, now
        silent = [rank for rank in missing if now - last_change[rank] > timeout_s]
        if silent:
            raise RunStopped(f"rank(s) {', '.join(map(str, silent))} stopped answering while {doing}: no sign of "
                             f"life for {timeout_s:g} s (--dist_timeout). {whereabouts(roll, silent)}. Its own log "
                             f"says why (it may have died, or its node lost the network).")
        if world.is_main and missing and now - said >= 60 and now - started >= 30:
            said = now
            notice(f"waiting for rank(s) {', '.join(map(str, missing))} ({whereabouts(roll, missing)}), "
                   f"{now - started:.0f} s so far")


def whereabouts(roll: Roll, ranks: list[int]) -> str:
    """`rank 1 on n2: step 40; ...`: what the named processes last said they were doing."""
    said = roll.others()
    return "; ".join(f"rank {rank} on {said.get(rank, '?')}" for rank in ranks)


# What a collective raises when another process did not arrive in time or left. gloo: a time-out or a closed
# connection. NCCL (and RCCL on ROCm, through the same ProcessGroupNCCL): its watchdog's time-out, a communicator
# aborted (by the watchdog, or by end_with_the_failed after a peer reported its failure), a peer that exited
# (ncclRemoteError), and the wrapper torch puts around a failed or timed-out NCCL operation.
TIMED_OUT_SIGNS = ("Timed out", "Watchdog caught collective operation timeout", "milliseconds before timing out")
LOST_SIGNS = ("Connection", "closed", "NCCL communicator was aborted", "remote process exited or there was a network "
              "error", "Some NCCL operations have failed or timed out")


def report_failure(world: World, error: BaseException) -> None:
    """This process cannot go on (out of memory, a bug, a lost peer): tell the others, in the first sentence of its
    error, so they end within seconds naming it (failed_peer) instead of waiting in their next collective for
    --dist_timeout (NCCL does not notice a process that left). No-op for one process."""
    roll = world.roll
    if roll is None or not world.active:
        return
    roll.ending.set()
    text = str(error).strip()
    what = re.split(r"(?<=\.)\s", text.splitlines()[0], maxsplit=1)[0].rstrip(".") if text else ""
    if not isinstance(error, (RunStopped, UsageError)):  # a bug: its kind says more than its words
        what = f"{type(error).__name__}: {what}" if what else type(error).__name__
    with contextlib.suppress(Exception):  # the store may be gone with the process that served it
        roll.fail(what[:300])


def failed_peer(roll: Roll) -> str | None:
    """The sentence of a process whose peer reported that it could not go on (the first that did); None when none
    did, or this process was the first."""
    failed, here = roll.first_failure(), roll.world.rank
    if failed is None or failed[0] == here:
        return None
    rank, what = failed
    return (f"rank {here} ({roll.read('doing', here) or '?'}) stopped because rank {rank} "
            f"({roll.read('doing', rank) or '?'}) could not go on: {what}. Its own log has the whole message.")


def collective_failure(error: BaseException) -> str | None:
    """"timed out" when `error` says a collective waited too long for another process, "lost" when it says one left
    or a communicator was aborted, None for anything else."""
    text = str(error)
    if any(sign in text for sign in TIMED_OUT_SIGNS):  # before LOST_SIGNS: an aborted communicator names its reason
        return "timed out"
    return "lost" if any(sign in text for sign in LOST_SIGNS) else None


def missing_peers(world: World, error: BaseException) -> str | None:
    """The explanation of a collective that failed because another process did not arrive in time, was lost, or
    reported that it could not go on (TIMED_OUT_SIGNS, LOST_SIGNS: gloo's words and NCCL's); None for any other
    error."""
    kind, roll = collective_failure(error), world.roll
    if not world.active or roll is None or kind is None:
        return None
    roll.ending.set()  # this thread explains it: the heartbeat thread need not end the process
    try:
        return failed_peer(roll) or (waited_in_vain(roll) if kind == "timed out" else lost(roll))
    except dist.DistError:  # the store ended with the process that served it
        return (f"rank {world.rank} lost its connection to the other processes and to the job's store at "
                f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}: the process that served it (rank "
                f"0, or torchrun on the first node) or its machine is gone. Its own log says why (killed, out of "
                f"memory, a lost node).")


def waited_in_vain(roll: Roll) -> str:
    world = roll.world
    here, said = roll.read("doing", world.rank) or "?", roll.others()
    behind = [rank for rank, doing in said.items() if step_in(doing) < step_in(here)] or silent(roll, list(said))
    culprit = (f"Rank(s) {', '.join(map(str, behind))} did not arrive: " if behind
               else "All are alive and reached the same step, so one of them hangs inside it: ")
    return (f"rank {world.rank} ({here}) waited --dist_timeout {roll.timeout_s:g} s for the other processes. "
            f"{culprit}{whereabouts(roll, behind or sorted(said))}. Its own log says why (an error, a hang, a lost "
            f"node).")


def lost(roll: Roll) -> str:
    """A peer closed its connection: the ones whose heartbeat stopped are gone (killed, crashed, their node lost)."""
    world = roll.world
    here = roll.read("doing", world.rank) or "?"
    gone = silent(roll, [rank for rank in range(world.size) if rank != world.rank])
    if not gone:
        return (f"rank {world.rank} ({here}) lost its connection to the other processes, though all of them still "
                f"send heartbeats: the network between the nodes broke. Check it (NCCL_DEBUG=INFO, {DOCTOR}).")
    return (f"rank {world.rank} ({here}) lost its connection to the other processes: rank(s) "
            f"{', '.join(map(str, gone))} stopped (no heartbeat since), last seen {whereabouts(roll, gone)}. Its own "
            f"log, or the launcher's report, says why (killed, out of memory, a lost node).")


def silent(roll: Roll, ranks: list[int]) -> list[int]:
    """The ranks whose heartbeat does not move over a few beats: dead, frozen, or cut off."""
    before = {rank: roll.read("beat", rank) for rank in ranks}
    time.sleep(2.5 * roll.heartbeat_s)
    return [rank for rank in ranks if roll.read("beat", rank) == before[rank]]


def step_in(doing: str) -> int:
    found = re.search(r"step (\d+)", doing)
    return int(found.group(1)) if found else -1


def check_same_checkpoint(world: World, found: tuple) -> None:
    """Every process must resume from the same checkpoint: one on a node that does not see the run folder (not on
    shared storage) would start fresh beside the others."""
    if not world.active:
        return
    everyone = [None] * world.size
    dist.all_gather_object(everyone, (socket.gethostname(), *found))
    main_host, *main_found = everyone[0]
    astray = [(rank, host, what) for rank, (host, *what) in enumerate(everyone) if what != main_found]
    if astray:
        rank, host, (path, step) = astray[0]
        sees = f"sees {path} at step {step}" if path else "sees no checkpoint"
        raise UsageError(f"--resume: rank 0 on {main_host} resumes from {main_found[0] or 'nothing'}"
                         f"{f' (step {main_found[1]})' if main_found[1] is not None else ''}, but rank {rank} on "
                         f"{host} {sees}. Every node must see the same output folder: put --output_dir on storage "
                         f"all nodes share (NFS, Lustre, a ReadWriteMany volume). Nothing was changed.")
