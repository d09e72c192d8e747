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
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ..errors import RunStopped, UsageError, notice

# how often every process says it is alive (the tests shorten it; a silent one is named after --dist_timeout)
HEARTBEAT_S = float(os.environ.get("GPT_TRAINER_HEARTBEAT_S", "5"))


@dataclass(frozen=True)
class World:
    rank: int = 0
    local_rank: int = 0
    size: int = 1

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


def start(world: World, device: torch.device, timeout_s: float) -> torch.device:
    """Join the process group; returns this process's device (cuda:LOCAL_RANK on GPUs). A rank that stops answering
    makes the others fail after `timeout_s` instead of waiting forever."""
    if not world.active:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        join("nccl" if device.type == "cuda" else "gloo", world, timeout_s,
             **({"device_id": device} if device.type == "cuda" else {}))
    global _roll
    if "MASTER_PORT" in os.environ:  # every launcher sets it (the process group's own rendezvous needs it)
        _roll = Roll(world, timeout_s)
        _roll.report("joined")
        _roll.start_beating()
    return device


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
    leaves at once; the launcher stops the others."""
    if _roll is not None:
        _roll.stopped.set()
    if world.active and dist.is_initialized():
        if finished:
            dist.barrier()
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

    def __init__(self, world: World, timeout_s: float):
        self.world, self.timeout_s, self.host = world, timeout_s, socket.gethostname()
        # keys of this attempt only: torchrun's store lives on across the restarts of one job
        self.prefix = (f"gpt_trainer/{os.environ.get('TORCHELASTIC_RUN_ID', '')}/"
                       f"{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/")
        self.store = dist.TCPStore(os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ["MASTER_PORT"]),
                                   is_master=False, timeout=timedelta(seconds=max(timeout_s, 30)),
                                   wait_for_workers=False)
        self.lock = threading.Lock()
        self.stopped = threading.Event()

    def start_beating(self) -> None:
        """A heartbeat from a thread of its own for the whole run: a process that is busy alone (preparing a
        corpus) still answers; one that died, froze or lost its node falls silent."""
        def keep_beating():
            while not self.stopped.wait(HEARTBEAT_S):
                with contextlib.suppress(Exception):  # the store's host may be gone at the end: nothing to tell
                    self.beat()
        threading.Thread(target=keep_beating, daemon=True, name="heartbeat").start()

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


_roll: Roll | None = None


def report(doing: str) -> None:
    """Tell the others what this process is doing now (no-op for one process)."""
    if _roll is not None:
        _roll.report(doing)


def note_saved(step: int) -> None:
    """The main process has written latest.pt at `step`: the others name it if the main process is lost."""
    if _roll is not None and _roll.world.is_main:
        _roll.note("saved", str(step))


def last_saved(world: World, decided: int | None) -> int | None:
    """The step of the last latest.pt (None: none this attempt). The main process knows (`decided`); the others take
    its word from the store, since a save they saw decided may not have been finished, or, with the store gone, the
    last save they saw decided."""
    if world.is_main or _roll is None:
        return decided
    try:
        written = _roll.read("saved", 0)
    except dist.DistError:
        return decided
    return int(written) if written is not None else None


def everyone_does(world: World, doing: str, work, timeout_s: float):
    """`work()` on every process, then wait for all: however long some take (a node preparing its token cache while
    another found it ready), as long as they are alive; one silent for `timeout_s` stops the wait, named."""
    if _roll is None or not world.active:
        return work()
    _roll.report(doing)
    result = work()
    _roll.finished(doing)
    _wait_for_the_others(world, doing, timeout_s)
    return result


def _wait_for_the_others(world: World, doing: str, timeout_s: float) -> None:
    """Polls one counter while all goes well; looks at who is missing, and whether they live, every few seconds."""
    last_beat, last_change, started, said, looked = {}, {}, time.monotonic(), 0.0, 0.0
    while _roll.count_finished(doing) < world.size:
        time.sleep(min(1.0, HEARTBEAT_S))
        now = time.monotonic()
        if now - looked < min(HEARTBEAT_S, timeout_s / 4):
            continue
        looked = now
        missing = [rank for rank in range(world.size) if _roll.read(f"done {doing}", rank) is None]
        for rank in missing:
            beat = _roll.read("beat", rank)
            if beat != last_beat.get(rank, "unseen"):
                last_beat[rank], last_change[rank] = beat, now
        silent = [rank for rank in missing if now - last_change[rank] > timeout_s]
        if silent:
            raise RunStopped(f"rank(s) {', '.join(map(str, silent))} stopped answering while {doing}: no sign of "
                             f"life for {timeout_s:g} s (--dist_timeout). {whereabouts(silent)}. Its own log says "
                             f"why (it may have died, or its node lost the network).")
        if world.is_main and missing and now - said >= 60 and now - started >= 30:
            said = now
            notice(f"waiting for rank(s) {', '.join(map(str, missing))} ({whereabouts(missing)}), "
                   f"{now - started:.0f} s so far")


def whereabouts(ranks: list[int]) -> str:
    """`rank 1 on n2: step 40; ...`: what the named processes last said they were doing."""
    said = _roll.others() if _roll else {}
    return "; ".join(f"rank {rank} on {said.get(rank, '?')}" for rank in ranks)


def missing_peers(world: World, error: BaseException) -> str | None:
    """The explanation of a collective that failed because another process did not arrive in time or was lost (gloo
    raises a RuntimeError naming a time-out or a lost connection); None for any other error."""
    text = str(error)
    if not world.active or _roll is None or not any(sign in text for sign in ("Timed out", "Connection", "closed")):
        return None
    try:
        return waited_in_vain(world) if "Timed out" in text else lost(world)
    except dist.DistError:  # the store ended with the process that served it
        return (f"rank {world.rank} lost its connection to the other processes and to the job's store at "
                f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}: the process that served it (rank "
                f"0, or torchrun on the first node) or its machine is gone. Its own log says why (killed, out of "
                f"memory, a lost node).")


def waited_in_vain(world: World) -> str:
    here, said = _roll.read("doing", world.rank) or "?", _roll.others()
    behind = [rank for rank, doing in said.items() if step_in(doing) < step_in(here)] or silent(list(said))
    culprit = (f"Rank(s) {', '.join(map(str, behind))} did not arrive: " if behind
               else "All are alive and reached the same step, so one of them hangs inside it: ")
    return (f"rank {world.rank} ({here}) waited --dist_timeout {_roll.timeout_s:g} s for the other processes. "
            f"{culprit}{whereabouts(behind or sorted(said))}. Its own log says why (an error, a hang, a lost node).")


def lost(world: World) -> str:
    """A peer closed its connection: the ones whose heartbeat stopped are gone (killed, crashed, their node lost)."""
    here = _roll.read("doing", world.rank) or "?"
    gone = silent([rank for rank in range(world.size) if rank != world.rank])
    if not gone:
        return (f"rank {world.rank} ({here}) lost its connection to the other processes, though all of them still "
                f"send heartbeats: the network between the nodes broke. Check it (NCCL_DEBUG=INFO, {DOCTOR}).")
    return (f"rank {world.rank} ({here}) lost its connection to the other processes: rank(s) "
            f"{', '.join(map(str, gone))} stopped (no heartbeat since), last seen {whereabouts(gone)}. Its own log, "
            f"or the launcher's report, says why (killed, out of memory, a lost node).")


def silent(ranks: list[int]) -> list[int]:
    """The ranks whose heartbeat does not move over a few beats: dead, frozen, or cut off."""
    before = {rank: _roll.read("beat", rank) for rank in ranks}
    time.sleep(2.5 * HEARTBEAT_S)
    return [rank for rank in ranks if _roll.read("beat", rank) == before[rank]]


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
