"""Checkpoints: everything needed to continue a run exactly, assembled in one place from the parts that own it, with
a format version; written atomically so a crash mid-write never leaves a broken checkpoint.

A checkpoint (format 3) holds what the run is (`config`: the run plan's description, `vocab_size`, `tokenizer`,
`corpus`, `world_size`), the RNG states (`rng`), and the `state_dict()` of each part under its name: `model`,
`optimizer`, `scaler`, `sampler` (the data position), `trainer` (step, best and last validation loss, the epoch's
running loss) and `tracker` (run name, wandb and SwanLab ids). The learning rate is not saved: it is a function of the
plan and the step. `load` upgrades older formats, so every reader sees format 3.

It comes in two kinds. A run in one process or under DDP writes one file, `latest.pt` (and `best.pt`), read without
running code: torch's weights-only reader builds tensors and plain data (numbers, strings, bytes, lists, tuples,
dicts) and refuses a file whose pickle asks for anything else (the one allowance is the numpy array that older
checkpoints held). A run under --parallel fsdp writes a folder, `latest/` (and `best/`), in which each process writes
the slices of the model and the optimizer state it holds and reads back the slices it needs, through
torch.distributed.checkpoint: nothing is gathered on one process. The tensors are safetensors files, one per process
(their headers record where each slice lies in the whole tensor); everything else (what the run is, the RNG states,
the optimizer's hyper-parameters, the other parts) is `state.json`; `manifest.json`, written last, records the size and
SHA-256 of every file, so a damaged or missing shard is found before anything is read. None of these files can run
code. `load` reads either kind into the same dict: a folder's model and optimizer stay in their files (`Shards`) until
the parts restore them, each in its own layout, so a checkpoint moves freely between FSDP, DDP and one process; sample
and export consolidate a folder's model on the CPU."""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import json
import math
import os
import pickle
import random
import re
import shutil
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Protocol

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.tensor import DTensor
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from ..config import EARLIER_ARCH, TrainConfig
from ..errors import CheckpointNotFinished, CheckpointNotWritten, UsageError, notice
from ..system import distributed
from ..system.hardware import return_freed_memory
from ..system.rundir import SHARDED_FILES, RunFolder

FORMAT_VERSION = 3
SHARD_FILE_BYTES = 128 << 20  # the size of a sharded checkpoint's files (file_numbers says why)
FULL_DISK_BYTES = 1 << 20  # a write that failed with less free than this failed for want of space
SHAPE_FIELDS = ("arch", "n_layer", "n_head", "n_embd", "block_size", "tokenizer")
# the top-level keys of each format (format 3 is format 2 without its scheduler, which is no longer needed); a file
# without them is not a checkpoint of ours
PARTS = {"format_version", "model", "optimizer", "scaler", "rng", "config", "vocab_size", "tokenizer", "corpus",
         "sampler", "trainer", "tracker"}
FORMAT_KEYS = {1: {"model", "optimizer", "scaler", "rng", "config", "vocab_size", "tokenizer", "corpus",
                   "data_position", "step", "best_val_loss", "last_val_loss", "epoch_loss", "tracking"},
               2: PARTS, 3: PARTS}
NANOGPT_KEYS = {"model", "model_args", "iter_num"}  # what nanoGPT's train.py saves in its ckpt.pt (with others)
# numpy's RNG state in the checkpoints written until 2026-12-03 (formats 1 to 3) held a uint32 array: these rebuild an
# array from its dtype and raw bytes and call no other code (what an array of objects would hold goes through the same
# weights-only reader). The function moved to numpy._core in numpy 2: both names are allowed.
_RECONSTRUCT = np.zeros(0).__reduce__()[0]
NUMPY_ARRAY = [(_RECONSTRUCT, "numpy.core.multiarray._reconstruct"),
               (_RECONSTRUCT, "numpy._core.multiarray._reconstruct"), np.ndarray, np.dtype, type(np.dtype(np.uint32))]


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def save_atomic(state: dict, path: Path) -> None:
    """Write to a temporary file in the same folder, flush it to disk, then rename over the old file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    existed = path.exists()
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # a full disk (torch's writer may wrap it), a read-only folder
        raise not_written(e, path, existed) from None
    finally:
        tmp.unlink(missing_ok=True)


def not_written(error: Exception, path: Path, existed: bool) -> Exception:
    """A checkpoint that could not be written, and why (the previous one is as it was); or, when the run folder itself
    is gone (deleted or unmounted during the save), the error the command words as that."""
    if not path.parent.is_dir():
        return FileNotFoundError(errno.ENOENT, "vanished", str(path.parent.parent))
    return CheckpointNotWritten(path, write_error(error, path.parent), earlier_kept=existed)


def write_error(error: Exception, folder: Path) -> str:
    """The reason a write failed in words: the OS's; or, when torch's zip writer wrapped it (a short write on a disk
    that filled mid-file reads 'unexpected pos N vs M'), no space left when the disk has next to none, else its first
    line without the C++ source location (`[enforce fail at inline_container.cc:...]`)."""
    if getattr(error, "strerror", None):
        return error.strerror
    free = shutil.disk_usage(folder).free
    if free < FULL_DISK_BYTES:
        return f"No space left on device: {free:,} bytes free"
    return first_line(error)


def first_line(error: Exception) -> str:
    """An error of torch's C++ code in words: its first line without the source location (`[enforce fail at
    inline_container.cc:...]`), or its type when it says nothing."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return re.sub(r"^\[enforce fail at [^\]]*\]\s*\.?\s*", "", first) or type(error).__name__


def remove_interrupted_saves(folder: RunFolder) -> list[str]:
    """Delete what saves that a kill interrupted left (call it while holding the folder's lock, so no other run is
    writing): the temporary files of .pt saves and the staging folders of sharded ones. Of the kinds of one checkpoint
    (a kill between writing one kind and removing the other, or between a sharded save's two renames) the newest is
    kept, under its own name. Returns the names of what was removed."""
    strays = sorted(folder.checkpoints.glob(".*.pt.tmp-*"))
    for stray in strays:
        stray.unlink(missing_ok=True)
    removed = [stray.name for stray in strays]
    for name in ("latest", "best"):
        staging = folder.staging_folders(name)
        kept = newest(folder, name)
        older = [path for path in folder.checkpoint_kinds(name) if path != kept and path.exists()]
        for path in (*staging, *older):
            remove_checkpoint(path)
        removed += [path.name for path in (*staging, *older)]
        sharded, aside = folder.checkpoint_kinds(name)[1:]
        if kept == aside:  # the save that was replacing it did not finish: it is the checkpoint again
            os.replace(aside, sharded)
    return removed


def newest(folder: RunFolder, name: str) -> Path | None:
    """The run's `name` checkpoint ("latest" or "best") whatever its kind, or None when there is none. A save of one
    kind removes the other kind after it, and a sharded save sets the folder it replaces aside for a moment; after a
    kill in between, the one written last is the checkpoint."""
    found = [(written, path) for path in folder.checkpoint_kinds(name) if (written := written_at(path)) is not None]
    return max(found)[1] if found else None


def written_at(path: Path) -> int | None:
    """When a checkpoint was finished (ns): a file's modification time, a sharded folder's manifest's (written last); a
    sharded folder without its manifest (damaged) counts from the folder's own time. None: no checkpoint there."""
    if path.is_file():
        return path.stat().st_mtime_ns
    if (path / MANIFEST).is_file():
        return (path / MANIFEST).stat().st_mtime_ns
    if path.is_dir() and any(next(path.glob(pattern), None) for pattern in SHARDED_FILES):
        return path.stat().st_mtime_ns
    return None


def remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint of either kind: a file, or the files a sharded save writes and then their folder (kept when
    something else is in it)."""
    if not path.is_dir() or path.is_symlink():
        path.unlink(missing_ok=True)
        return
    for pattern in SHARDED_FILES:
        for file in path.glob(pattern):
            file.unlink()
    with contextlib.suppress(OSError):
        path.rmdir()


def assemble(parts: dict[str, Stateful], about: dict) -> dict:
    """The whole checkpoint: what the run is, the RNG states, and each part's own state under its name."""
    return {"format_version": FORMAT_VERSION, **about, "rng": rng_states(),
            **{name: part.state_dict() for name, part in parts.items()}}


def restore(state: dict, parts: dict[str, Stateful]) -> None:
    for name, part in parts.items():
        part.load_state_dict(state[name])
    restore_rng_states(state["rng"])


class Checkpointer:
    """The one owner of a run's checkpoints: it assembles what the run is (`about`), the RNG states and every part's
    state, writes them, restores them, and knows the step of the last latest checkpoint on every process, so all of
    them decide alike whether a stop still saves and each can name it when another process is lost. Unsharded, the
    main process writes a .pt; `sharded` (FSDP), every process writes its own slices into a folder (save_sharded)."""

    def __init__(self, folder: RunFolder, parts: dict[str, Stateful], about: dict, world: distributed.World,
                 sharded: bool):
        self.folder, self.parts, self.about = folder, parts, about
        self.world, self.is_main, self.sharded = world, world.is_main, sharded
        self.saved_at: int | None = None  # the step the latest checkpoint was last written at
        self.folder_existed = folder.path.is_dir()  # the command made it; library use may leave it to save()

    def where(self, path: Path) -> Path:
        """Where this run writes the checkpoint `path` names (a run folder's latest.pt or best.pt): sharded, the
        folder of the same name without .pt."""
        return path.with_suffix("") if self.sharded else path

    def save(self, path: Path, step: int) -> None:
        target = self.where(path)
        if self.is_main and self.folder_existed and not self.folder.path.is_dir():  # deleted or unmounted meanwhile
            raise FileNotFoundError(errno.ENOENT, "vanished", str(self.folder.path))
        if self.sharded:
            save_sharded(self.parts, {"format_version": FORMAT_VERSION, **self.about}, target, step, self.is_main)
        elif self.is_main:
            save_atomic(assemble(self.parts, self.about), target)
        if self.is_main:  # the other kind of the same checkpoint, from a segment in another layout, would be stale
            for other in self.folder.checkpoint_kinds(path.stem):
                if other != target:
                    remove_checkpoint(other)
        if path == self.folder.latest:
            self.saved_at = step
            distributed.note_saved(self.world, step)
        return_freed_memory()  # the state's copies and the writer's buffers, freed into the C heap

    def restore(self, state: dict) -> None:
        restore(state, self.parts)
        return_freed_memory()


# ---- the model and the optimizer as checkpoint parts, in every layout -----------------------------------------------
SCATTER = StateDictOptions(full_state_dict=True)  # a .pt's whole tensors, every process keeping its own slices
LOAD_SHARDS = StateDictOptions(strict=False)  # what a sharded checkpoint holds: all but the tied output layer


class ModelState:
    """The model as a checkpoint part. In a .pt: the whole model's state_dict (`state_dict`; unsharded runs write
    .pt). In a sharded checkpoint: this process's tensors, under FSDP its slices, without the tied output layer
    (safetensors refuses two names for one tensor; tying restores it) (`shards`). `load_state_dict` takes either: a
    sharded checkpoint's `Shards`, of which each process reads the slices it holds, or a .pt's whole tensors, of which
    a sharded model keeps its slices."""

    def __init__(self, model: torch.nn.Module, sharded: bool):
        self.model, self.sharded = model, sharded

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def shards(self) -> tuple[dict, dict]:
        """(this process's tensors by name, what state.json keeps beside them: which names are tied to which)."""
        tensors, tied = get_model_state_dict(self.model), tied_names(self.model)
        for name in tied:
            del tensors[name]
        return tensors, {"tied": tied}

    def load_state_dict(self, state: dict | Shards) -> None:
        if isinstance(state, Shards):
            tensors, _ = self.shards()
            state.read_into(tensors)
            set_model_state_dict(self.model, tensors, options=LOAD_SHARDS)
        elif self.sharded:
            set_model_state_dict(self.model, state, options=SCATTER)
        else:
            self.model.load_state_dict(state)


def tied_names(model: torch.nn.Module) -> dict[str, str]:
    """Each parameter name that is another name's parameter (GPT's output layer is its embedding) -> that name."""
    first, tied = {}, {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            tied[name] = first[id(param)]
        else:
            first[id(param)] = name
    return tied


class OptimizerState:
    """The optimizer as a checkpoint part. In a .pt: `optimizer.state_dict()`'s layout, parameters numbered in the
    order of the param groups; a sharded model's optimizer converts that numbering to torch's parameter paths
    (`blocks.0.attn.qkv.weight`) and keeps its slices. In a sharded checkpoint: each parameter's moments and step by
    path (this process's slices) in the safetensors files, the param groups (hyper-parameters, paths) in state.json."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, sharded: bool):
        self.model, self.optimizer, self.sharded = model, optimizer, sharded

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def shards(self) -> tuple[dict, dict]:
        """(this process's state tensors by parameter path, the param groups). A fresh optimizer's state is made
        first (torch steps it once with a learning rate of 0), so there is a tensor to read each value into."""
        by_path = get_optimizer_state_dict(self.model, self.optimizer)
        return by_path["state"], {"param_groups": by_path["param_groups"]}

    def load_state_dict(self, state: dict | Shards) -> None:
        if isinstance(state, Shards):
            tensors, _ = self.shards()
            state.read_into(tensors)
            set_optimizer_state_dict(self.model, self.optimizer,
                                     {"state": tensors, "param_groups": state.plain["param_groups"]})
        elif self.sharded:
            set_optimizer_state_dict(self.model, self.optimizer, self.by_path(state), options=SCATTER)
        else:
            self.optimizer.load_state_dict(state)

    def by_path(self, state: dict) -> dict:
        """A .pt's optimizer state with each parameter's number replaced by its path."""
        path = {id(p): name for name, p in self.model.named_parameters()}  # a tied weight: its first path
        names = [path[id(p)] for group in self.optimizer.param_groups for p in group["params"]]
        return {"state": {names[i]: s for i, s in state["state"].items()},
                "param_groups": [{**group, "params": [names[i] for i in group["params"]]}
                                 for group in state["param_groups"]]}


# ---- sharded checkpoints: a folder of safetensors files, state.json and manifest.json -------------------------------
MANIFEST, STATE = "manifest.json", "state.json"
MANIFEST_VERSION = 1


@dataclass
class Shards:
    """A part's tensors left in the files of a sharded checkpoint until the part is restored (`name`: the part's, the
    prefix of its tensors in the files), and what it saved beside them in state.json (`plain`)."""

    folder: Path
    name: str
    plain: dict = field(default_factory=dict)

    def read_into(self, tensors: dict) -> None:
        """Fill `tensors` (names to tensors, or to dicts of them) in place from the files: a sharded tensor (DTensor)
        gets the slices this process holds, a whole one the whole. Each process reads on its own (no_dist), without
        the process group: what it reads depends only on what it holds. The reader builds its index from the
        safetensors headers (JSON); nothing it reads is unpickled."""
        with self.reading(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # no_dist is meant
            dcp.load({self.name: tensors}, storage_reader=HuggingFaceStorageReader(str(self.folder)), no_dist=True)

    def whole(self) -> dict[str, torch.Tensor]:
        """The part's whole tensors, consolidated on the CPU in this process (sample and export read a folder so),
        with the tied names restored."""
        prefix = f"{self.name}."
        tensors = {key.removeprefix(prefix): torch.empty(meta.size, dtype=meta.properties.dtype)
                   for key, meta in self.index().items() if key.startswith(prefix)}
        self.read_into(tensors)
        for name, same in self.plain.get("tied", {}).items():
            tensors[name] = tensors[same]
        return tensors

    def index(self) -> dict:
        """Every tensor of the files (all parts'), by name, with its whole shape and dtype: what their headers say.
        Reading it parses each file's header and nothing more."""
        with self.reading():
            return HuggingFaceStorageReader(str(self.folder)).read_metadata().state_dict_metadata

    @contextlib.contextmanager
    def reading(self):
        """Files that hold what their manifest says but cannot be read as a checkpoint's tensors (a header or a tie
        changed on purpose, another program's files) in a sentence; a failure of the machine (OSError) as it is."""
        try:
            yield
        except CheckpointException as e:  # what torch.distributed.checkpoint raises for a failure while it reads
            error = next(iter(e.failures.values()))[0]
            if isinstance(error, OSError):
                raise error from None
            raise not_ours(self.folder, error) from None
        except (ValueError, KeyError, TypeError, AssertionError, RuntimeError, SafetensorError) as e:
            raise not_ours(self.folder, e) from None


def not_ours(folder: Path, error: BaseException) -> UsageError:
    return UsageError(f"{folder} is not a checkpoint written by train_single_gpu.py: its tensors cannot be read as one "
                      f"({type(error).__name__}: {(str(error).strip().splitlines() or ['no detail'])[0][:200]}). It "
                      f"was changed after it was written, or it is another program's. Point at a checkpoint of a "
                      f"run's checkpoints folder.")


def save_sharded(parts: dict[str, Stateful], about: dict, target: Path, step: int, is_main: bool) -> None:
    """Write a sharded checkpoint: every process writes the tensors it holds into a staging folder beside `target`
    (torch.distributed.checkpoint, safetensors files of its own) and hashes them; the main process then writes
    state.json (everything else) and the manifest, and renames the folder into place. Every process returns once the
    checkpoint is there. A save that fails (a full disk) removes its staging folder and leaves the previous checkpoint
    as it was; a kill leaves the staging folder, which no reader takes for a checkpoint and the next start removes."""
    run = RunFolder(target.parent.parent)
    staging = run.staging(target.name, step)
    existed = newest(run, target.name) is not None
    if is_main:
        remove_checkpoint(staging)  # what an earlier attempt at this very save left
        staging.mkdir(parents=True)
    everyone(None)  # the folder is there, and empty, before any process writes into it
    tensors, plain = {}, {}
    for name, part in parts.items():
        if hasattr(part, "shards"):
            tensors[name], plain[name] = part.shards()
        else:
            plain[name] = part.state_dict()
    try:
        write_shards(tensors, staging, target, existed)
        digests = {name: record for found in everyone(own_files(staging)) for name, record in found.items()}
        problem = None
        if is_main:
            try:
                finish_sharded(staging, target, {**about, "rng": rng_states(), **plain}, digests, step)
            except OSError as e:
                problem = not_written(e, target, existed)
        main_failed = everyone(problem is not None)[0]  # every process waits until the checkpoint is in place
        if problem:
            raise problem
        if main_failed:
            raise CheckpointNotFinished(target)
    except Exception:
        if is_main:
            remove_checkpoint(staging)
        raise


def write_shards(tensors: dict, staging: Path, target: Path, existed: bool) -> None:
    """Every process's tensors into its own safetensors files in `staging` (torch.distributed.checkpoint, a
    collective); a failure of the machine on any process (a full disk) stops every one of them, in words."""
    writer = HuggingFaceStorageWriter(str(staging), fqn_to_index_mapping=file_numbers(tensors), save_distributed=True)
    try:
        with warnings.catch_warnings():  # one process (library use) writes without a process group, as meant
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.save(tensors, storage_writer=writer, no_dist=not dist.is_initialized())
    except CheckpointException as e:
        error = next((failure[0] for failure in e.failures.values() if isinstance(failure[0], OSError)), None)
        if error is None:
            raise
        raise not_written(error, target, existed) from None


def file_numbers(tensors: dict) -> dict[str, int]:
    """Each tensor's name as torch.distributed.checkpoint flattens it (`model.blocks.0.attn.qkv.weight`) -> the file,
    numbered from 1, it goes into: files of about SHARD_FILE_BYTES each. The writer builds a whole file in memory, twice
    over (safetensors' bytes of each tensor, then of the file), and a reader maps a whole file while it reads from it:
    one file per process would hold two or three more copies of its slices while it saves or resumes. Every process
    takes the main process's numbering (the sizes of its slices), so the names must be the same everywhere."""
    numbers, number, filled = {}, 1, 0
    for name, value in flat_items(tensors):
        size = value.to_local().nbytes if isinstance(value, DTensor) else getattr(value, "nbytes", 0)
        if filled and filled + size > SHARD_FILE_BYTES:
            number, filled = number + 1, 0
        numbers[name], filled = number, filled + size
    return numbers


def flat_items(tree: dict, prefix: str = "") -> Iterator[tuple[str, object]]:
    """The leaves of nested dicts with their keys joined by dots, as torch.distributed.checkpoint names them."""
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from flat_items(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def everyone(value: object) -> list:
    """`value` from every process, in rank order (one process: its own). Also a barrier."""
    if not dist.is_initialized():
        return [value]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def own_files(staging: Path) -> dict[str, dict]:
    """The size and SHA-256 of each file this process wrote (torch.distributed.checkpoint numbers the processes from 1
    in rank order: `shard-00002-model-00003-of-00014.safetensors` is rank 1's third file)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    return {path.name: file_record(path) for path in sorted(staging.glob(f"shard-{rank + 1:05d}-*.safetensors"))}


def file_record(path: Path) -> dict:
    """A file's size and SHA-256, read in blocks (a shard may be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def finish_sharded(staging: Path, target: Path, state: dict, digests: dict[str, dict], step: int) -> None:
    """The main process's part of a sharded save: state.json, then the manifest (the last file: a folder with one is
    complete), then the folder renamed into place."""
    data = json.dumps(to_json(state), ensure_ascii=False).encode("utf-8")
    write_synced(staging / STATE, data)
    files = {**digests, STATE: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}}
    manifest = {"written_by": "gpt-trainer", "manifest_version": MANIFEST_VERSION,
                "format_version": state["format_version"], "step": step,
                "layout": {"parallel": "fsdp", "processes": state.get("world_size")}, "files": files}
    write_synced(staging / MANIFEST, json.dumps(manifest, indent=2).encode("utf-8"))
    sync_folder(staging)
    place(staging, target)


def write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def sync_folder(path: Path) -> None:
    """Make a folder's entries (new files, renames) durable; where folders cannot be opened, the OS decides."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def place(staging: Path, target: Path) -> None:
    """Rename a finished folder into place. A folder cannot be renamed over one that holds files: the old one is set
    aside first and removed after; a kill between the two renames leaves it set aside, where `newest` finds it."""
    aside = RunFolder(target.parent.parent).checkpoint_kinds(target.name)[2]
    if target.exists():
        remove_checkpoint(aside)
        os.replace(target, aside)
    os.replace(staging, target)
    remove_checkpoint(aside)
    sync_folder(target.parent)


# state.json is JSON; what JSON lacks is written as an object with one of these keys: a tuple (the Python RNG's
# state, AdamW's betas), bytes (a sentencepiece model), a small tensor (the torch and CUDA RNG states) and a dict whose
# keys are not all strings. Reading builds these plain values and nothing else.
TUPLE, BYTES, TENSOR, ITEMS = "__tuple__", "__bytes__", "__tensor__", "__items__"
TAGS = (TUPLE, BYTES, TENSOR, ITEMS)
JSON_DTYPES = {str(dtype).removeprefix("torch."): dtype for dtype in (
    torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16, torch.bfloat16,
    torch.float32, torch.float64)}


def to_json(value: object) -> object:
    """Plain data (what the parts' state_dict() hold) as JSON values."""
    if isinstance(value, dict):
        if all(isinstance(key, str) for key in value) and not (len(value) == 1 and next(iter(value)) in TAGS):
            return {key: to_json(item) for key, item in value.items()}
        return {ITEMS: [[to_json(key), to_json(item)] for key, item in value.items()]}
    if isinstance(value, tuple):
        return {TUPLE: [to_json(item) for item in value]}
    if isinstance(value, list):
        return [to_json(item) for item in value]
    if isinstance(value, bytes):
        return {BYTES: base64.b64encode(value).decode("ascii")}
    if isinstance(value, torch.Tensor):
        whole = value.detach().cpu().contiguous()
        raw = whole.reshape(-1).view(torch.uint8).numpy().tobytes()
        return {TENSOR: {"dtype": str(whole.dtype).removeprefix("torch."), "shape": list(whole.shape),
                         "data": base64.b64encode(raw).decode("ascii")}}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"a {type(value).__name__} cannot be written to {STATE}")


def from_json(value: dict) -> object:
    """One JSON object read back (json.loads' object_hook: its members are read already)."""
    if len(value) != 1 or next(iter(value)) not in TAGS:
        return value
    tag, held = next(iter(value.items()))
    if tag == TUPLE:
        return tuple(held)
    if tag == BYTES:
        return base64.b64decode(held, validate=True)
    if tag == ITEMS:
        return {key: item for key, item in held}
    dtype, shape = JSON_DTYPES[held["dtype"]], [int(n) for n in held["shape"]]
    raw = base64.b64decode(held["data"], validate=True)
    if len(raw) != math.prod(shape) * dtype.itemsize:
        raise ValueError(f"a tensor of shape {shape} and {dtype} cannot be {len(raw)} bytes")
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(shape).clone() if raw \
        else torch.empty(shape, dtype=dtype)


def load_sharded(folder: Path, device: torch.device | str, whole_model: bool) -> dict:
    """A sharded checkpoint, verified against its manifest: state.json read, the model and optimizer left in their
    files (`Shards`), or the model consolidated whole on `device` (whole_model)."""
    files = read_manifest(folder)
    problem = sharded_damage(folder, files)
    if problem:
        raise DamagedCheckpoint(f"the checkpoint {folder} is damaged ({problem}): it changed after it was written.")
    try:
        state = json.loads((folder / STATE).read_text(encoding="utf-8"), object_hook=from_json)
        state["model"] = Shards(folder, "model", {"tied": dict(state["model"]["tied"])})
        state["optimizer"] = Shards(folder, "optimizer", {"param_groups": list(state["optimizer"]["param_groups"])})
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in state["model"].plain["tied"].items()):
            raise ValueError("the tied names are not names")
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, RuntimeError, RecursionError) as e:
        raise UsageError(f"{folder} is not a checkpoint written by train_single_gpu.py: its {STATE} cannot be read "
                         f"as one ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else 'no detail'}). "
                         f"Point at a checkpoint of a run's checkpoints folder.") from None
    state = upgrade(state, folder)
    index = state["model"].index()  # every header parses, before a resume changes a file
    untied = [same for same in state["model"].plain["tied"].values() if f"model.{same}" not in index]
    if untied:
        raise not_ours(folder, KeyError(f"the tied {untied[0]} is not among its tensors"))
    if whole_model:
        state["model"] = on_device(state["model"].whole(), device)
    return state


def on_device(tensors: dict[str, torch.Tensor], device: torch.device | str) -> dict[str, torch.Tensor]:
    """The tensors moved to `device`, names that shared a tensor still sharing one."""
    moved = {}
    return {name: moved.setdefault(id(t), t.to(device)) for name, t in tensors.items()}


def read_manifest(folder: Path) -> dict[str, dict]:
    """The files a sharded checkpoint's manifest lists (name -> bytes and sha256). A folder without one, or with one
    that is not what a save writes, is not a readable checkpoint."""
    path = folder / MANIFEST
    if not path.is_file():
        why = "there is no such folder" if not folder.exists() else f"it has no {MANIFEST}, which a save writes last"
        raise UnreadableCheckpoint(f"{folder} is not a readable checkpoint ({why}): a save or a copy that did not "
                                   f"finish, or not a checkpoint.")
    try:
        files = json.loads(path.read_text(encoding="utf-8"))["files"]
        if not (isinstance(files, dict) and STATE in files and all(
                Path(name).name == name and not name.startswith(".") and type(record["bytes"]) is int
                and isinstance(record["sha256"], str) for name, record in files.items())):
            raise ValueError("not the files of a checkpoint")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UnreadableCheckpoint(f"{folder} is not a readable checkpoint: its {MANIFEST} is not the one a save "
                                   f"writes ({type(e).__name__}). It was changed after it was written, or the folder "
                                   f"is not a checkpoint.") from None
    return files


def sharded_damage(folder: Path, files: dict[str, dict]) -> str | None:
    """What is wrong with a sharded checkpoint's files, or None: a file of the manifest missing, of another size or
    with other bytes (SHA-256), or a safetensors file it does not list (the reader would read it too)."""
    missing = [name for name in files if not (folder / name).is_file()]
    if missing:
        return f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing"
    resized = next((name for name, record in files.items() if (folder / name).stat().st_size != record["bytes"]), None)
    if resized:
        return (f"{resized} has {(folder / resized).stat().st_size:,} bytes, {files[resized]['bytes']:,} when it "
                f"was written")
    stray = sorted(path.name for path in folder.glob("*.safetensors") if path.name not in files)
    if stray:
        return f"it holds {', '.join(stray)}, which its {MANIFEST} does not list"
    changed = next((name for name, record in files.items()
                    if file_record(folder / name)["sha256"] != record["sha256"]), None)
    return f"{changed} does not match the SHA-256 recorded when it was written" if changed else None


class DamagedCheckpoint(UsageError):
    """A checkpoint whose bytes changed after it was written (a bad disk, a copy cut short)."""


class UnreadableCheckpoint(DamagedCheckpoint):
    """A file that cannot be read as a checkpoint at all: empty, cut short, missing, or another kind of file."""


class RefusedCheckpoint(UsageError):
    """A file whose pickle asks to run code (or to build more than tensors and plain data): refused unrun."""


def damage(path: Path) -> str | None:
    """What is wrong with a checkpoint's bytes, or None. torch.save writes a zip container that records a CRC-32 of
    every member, which torch.load does not check: a block of zeros in the weights would load as zero weights."""
    if not zipfile.is_zipfile(path):
        return None  # not a zip at all (cut short, or another kind of file): load says so
    try:
        with zipfile.ZipFile(path) as container:
            bad = container.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        return f"its zip container is broken: {e}"
    return f"{bad} does not match the CRC-32 recorded when it was written" if bad else None


def load(path: Path | str, device: torch.device | str = "cpu", lazy: bool = False) -> dict:
    """A checkpoint of either kind, verified (a .pt against its CRCs, a folder against its manifest) and read without
    running code, in the current format. A folder's model is consolidated whole on `device` and its optimizer left in
    its files (`Shards`). `lazy` (a resume): the tensors stay in the files until the parts read them, each in its own
    layout: a folder's model too, and a .pt memory-mapped (the processes of a job share the OS's one copy of its
    pages instead of reading it each)."""
    path = Path(path)
    if path.is_dir():
        return load_sharded(path, device, whole_model=not lazy)
    problem = damage(path)
    if problem:
        raise DamagedCheckpoint(f"the checkpoint {path} is damaged ({problem}): it changed after it was written.")
    try:
        with torch.serialization.safe_globals(NUMPY_ARRAY):
            state = torch.load(path, map_location=device, weights_only=True, mmap=lazy)
    except pickle.UnpicklingError as e:
        if zipfile.is_zipfile(path):  # intact (its CRCs hold), yet its pickle asks for more than plain data
            raise refusal(path, e) from None
        raise unreadable(path, e) from None
    except Exception as e:  # cut short, empty, missing, or another kind of file
        raise unreadable(path, e) from None
    return upgrade(state, path)


def unreadable(path: Path, error: Exception) -> UnreadableCheckpoint:
    """Why a file cannot be read, in words (torch's message for a file cut short speaks of zip archives and miniz)."""
    if not path.is_file():
        return UnreadableCheckpoint(f"{path} is not a readable checkpoint: there is no such file.")
    if not path.stat().st_size:
        why = "the file is empty"
    elif not zipfile.is_zipfile(path):
        why = "it is not the zip container torch.save writes"
    else:  # a zip without torch's members, say: the first sentence of what torch said
        why = getattr(error, "strerror", None) or first_line(error).split(". ")[0]
    return UnreadableCheckpoint(f"{path} is not a readable checkpoint ({why}): it was cut short (a save or a copy "
                                f"that did not finish), or it is not a checkpoint.")


def refusal(path: Path, error: pickle.UnpicklingError) -> RefusedCheckpoint:
    """Name what the file's pickle asks to call: read from its opcodes, never run."""
    with torch.serialization.safe_globals(NUMPY_ARRAY):
        asked = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    told = next((after for line, after in zip(lines, lines[1:]) if "WeightsUnpickler error" in line), "")
    what = (f"would call {', '.join(asked[:3])}" if asked
            else f"asks for more than plain data ({told or 'an object the weights-only reader does not build'})")
    return RefusedCheckpoint(f"{path} was refused, and nothing in it was run: loading it {what}, and a checkpoint is "
                             f"read as tensors and plain data only. It was not written by train_single_gpu.py, or it "
                             f"was changed to run code: use a checkpoint you trust (a latest.pt or best.pt from a "
                             f"run's checkpoints folder).")


def upgrade(state: dict, path: Path) -> dict:
    """Bring a checkpoint of any earlier format to the current one."""
    version = check_ours(state, path)
    while version != FORMAT_VERSION:
        state = UPGRADES[version](state)
        version = state["format_version"]
    return state


def check_ours(state: object, path: Path) -> int:
    """The format of a checkpoint written by train_single_gpu.py; anything else is refused, saying what it is
    (nanoGPT's ckpt.pt, say, also has `model` and `config`)."""
    keys = set(state) if isinstance(state, dict) else set()
    version = state.get("format_version", 1) if isinstance(state, dict) else None
    version = version if type(version) is int else None  # a format is a plain int: anything else is not ours
    if NANOGPT_KEYS <= keys:
        raise UsageError(f"{path} is nanoGPT's checkpoint (it has model_args and iter_num), not one written by "
                         f"train_single_gpu.py: its weights have other names and it holds no tokenizer, so it cannot "
                         f"be resumed, sampled or exported here. Point at a latest.pt or best.pt from a run's "
                         f"checkpoints folder.")
    if version is not None and version > FORMAT_VERSION and {"model", "config"} <= keys:
        raise UsageError(f"{path} has checkpoint format {version}, but this gpt-trainer reads formats 1 to "
                         f"{FORMAT_VERSION}. Upgrade gpt-trainer to read it.")
    if version not in FORMAT_KEYS or not FORMAT_KEYS[version] <= keys or not isinstance(state["config"], dict):
        held = (f"its keys: {', '.join(sorted(map(str, keys))[:6])}{', ...' if len(keys) > 6 else ''}" if keys
                else f"it holds {'an empty dict' if isinstance(state, dict) else type(state).__name__}")
        raise UsageError(f"{path} is not a checkpoint written by train_single_gpu.py ({held}; a file of another "
                         f"program?). Point at a latest.pt or best.pt from a run's checkpoints folder.")
    return version


def _from_format_1(old: dict) -> dict:
    """Format 1 (until 2026-11) kept the trainer's counters and the tracker's state as loose top-level keys."""
    keep = ("model", "optimizer", "scaler", "rng", "config", "vocab_size", "tokenizer", "corpus")
    return {"format_version": 2, **{key: old[key] for key in keep}, "sampler": old["data_position"],
            "trainer": {key: old[key] for key in ("step", "best_val_loss", "last_val_loss", "epoch_loss")},
            "tracker": old["tracking"]}


def _from_format_2(old: dict) -> dict:
    """Format 2 (until 2026-12) also saved the learning-rate scheduler's state; the schedule is now rebuilt from the
    run plan and the step, so it is dropped."""
    return {**{key: value for key, value in old.items() if key != "scheduler"}, "format_version": 3}


UPGRADES = {1: _from_format_1, 2: _from_format_2}  # format -> the function that brings it one format forward


def rng_states() -> dict:
    """Every RNG's state as plain data: numpy's as the dict of `get_state(legacy=False)` with its key array as a list
    of ints, which the weights-only reader loads without numpy's pickling."""
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"]["key"] = numpy_state["state"]["key"].tolist()
    states = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        # the GPU this process draws on (the current device: distributed.start sets it), not every GPU it can see: a
        # state per GPU of an 8-GPU node has no GPU to go to where a resume has 2
        states["cuda"] = [torch.cuda.get_rng_state()]
    return states


def restore_rng_states(states: dict) -> None:
    """The saved states back into every RNG; the GPU's into this process's GPU alone. Checkpoints before 2026-12 hold
    one GPU state per GPU the writing process saw (torch.cuda.get_rng_state_all); the first is the one it drew on
    (the main process of a job is on its node's first GPU), so a resume on fewer GPUs restores that one too."""
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])  # takes the dict, and the tuple with an array that older checkpoints hold
    torch.set_rng_state(states["torch"])
    if states.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"][0])


def load_for_resume(path: Path) -> tuple[dict, Path]:
    """(the checkpoint, its path) to resume from, its tensors left in its files (load's `lazy`). A damaged or
    unreadable latest checkpoint of a run folder (a changed byte, a copy cut short, a shard missing) falls back to its
    best one when that one loads, with a note; otherwise the run stops, saying so. A refused or foreign file stops the
    run: it is not damage, and the user should know."""
    run = RunFolder(path.parent.parent)
    fallback = newest(run, "best") if path.name in {p.name for p in run.checkpoint_kinds("latest")} else None
    try:
        return load(path, lazy=True), path
    except DamagedCheckpoint as e:
        saved = load_if_intact(fallback)
        if saved is None:
            raise DamagedCheckpoint(f"{e} There is no intact checkpoint to fall back to: start the run again with "
                                    f"--overwrite, or into another --output_dir.") from None
        notice(f"note: {e} Resuming from {fallback} (step {saved['trainer']['step']}) instead; the steps after it "
               f"are trained again.")
        return saved, fallback


def load_if_intact(path: Path | None) -> dict | None:
    """The checkpoint at `path`, its tensors left in its files; None when there is none, or it is damaged or
    unreadable."""
    if path is None or not path.exists():
        return None
    try:
        return load(path, lazy=True)
    except DamagedCheckpoint:
        return None


def checkpoint_at(path: Path) -> Path | None:
    """The checkpoint a path names: a .pt file, the folder of a sharded checkpoint, or a run folder's latest checkpoint
    (whatever its kind); None when it names none."""
    if path.is_file() or (path / MANIFEST).is_file():
        return path
    return newest(RunFolder(path), "latest") if path.is_dir() else None


def find_resume_checkpoint(resume: str | None, folder: RunFolder) -> Path | None:
    """--resume: the latest checkpoint of the run folder (None if there is none yet), or an explicit file, sharded
    checkpoint or run folder."""
    if resume is None:
        return None
    if resume == "latest":
        return newest(folder, "latest")
    path = checkpoint_at(Path(resume).expanduser())
    if path is None:
        raise UsageError(f"--resume {resume}: no checkpoint there. Give a .pt file, the folder of a sharded checkpoint "
                         f"(an --parallel fsdp run's checkpoints/latest), a run's output_dir, or plain --resume.")
    return path


def check_same_text(saved: dict, digest: str, allowed: bool, path: Path) -> None:
    """A resume continues on the text the run was trained on, unless --allow_new_data says otherwise (a checkpoint
    from before digests were recorded is taken as it is)."""
    before = saved["config"].get("corpus_digest")
    if before and digest and before != digest and not allowed:
        raise UsageError(f"cannot resume from {path}: the training text differs from the one this run was trained on "
                         f"(the run's text had digest {before}, this one {digest}). Point --data_path or --corpus at "
                         f"the original text, or pass --allow_new_data to continue on this one (config.json then "
                         f"records the change).")


def check_same_shape(saved: dict, cfg: TrainConfig, tokenizer, path: Path) -> None:
    """A checkpoint only fits a model of the same shape and vocabulary; say exactly what differs."""
    current = {**{k: getattr(cfg, k) for k in SHAPE_FIELDS}, "vocabulary size": tokenizer.vocab_size}
    recorded = {"arch": EARLIER_ARCH, **saved["config"]}  # a checkpoint from before --arch holds a gpt2
    before = {**{k: recorded.get(k) for k in SHAPE_FIELDS}, "vocabulary size": saved["vocab_size"]}
    diffs = [f"{k}: checkpoint {before[k]!r}, now {current[k]!r}" for k in current if before[k] != current[k]]
    if not diffs and saved["tokenizer"] != tokenizer.to_dict():
        diffs = ["vocabulary: same size, different tokens (another corpus?)"]
    if diffs:
        started = saved["config"].get("init_from")
        origin = f" (it started from --init_from {started})" if started and started != cfg.init_from else ""
        raise UsageError(
            f"cannot resume from {path}: the model shape differs ({'; '.join(diffs)}). Pass the same --arch, "
            f"--model_size, overrides, --init_from and data as the original run{origin} (see its config.json), or "
            f"train into a new --output_dir."
        )
