"""Checkpoints: everything needed to continue a run exactly, assembled in one place from the parts that own it, with
a format version; written atomically so a crash mid-write never leaves a broken file.

A checkpoint (format 3) holds what the run is (`config`: the run plan's description, `vocab_size`, `tokenizer`,
`corpus`, `world_size`), the RNG states (`rng`), and the `state_dict()` of each part under its name: `model`,
`optimizer`, `scaler`, `sampler` (the data position), `trainer` (step, best and last validation loss, the epoch's
running loss) and `tracker` (run name, wandb and SwanLab ids). The learning rate is not saved: it is a function of the
plan and the step. `load` upgrades older formats, so every reader sees format 3.

A checkpoint is read without running code: torch's weights-only reader builds tensors and plain data (numbers,
strings, bytes, lists, tuples, dicts) and refuses a file whose pickle asks for anything else. What a run saves is
plain data (numpy's RNG state too); the one allowance is the numpy array that older checkpoints held.

A run under --parallel fsdp writes the same file: `FullModel` and `FullOptimizer` gather the sharded states into the
whole model's and into the optimizer's usual layout (integer parameter ids), and scatter them back on loading, so a
checkpoint moves freely between FSDP, DDP and one process."""

from __future__ import annotations

import errno
import os
import pickle
import random
import re
import shutil
import zipfile
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from ..config import TrainConfig
from ..errors import RunStopped, UsageError, notice
from ..system import distributed
from ..system.rundir import RunFolder

FORMAT_VERSION = 3
FULL_DISK_BYTES = 1 << 20  # a write that failed with less free than this failed for want of space
SHAPE_FIELDS = ("n_layer", "n_head", "n_embd", "block_size", "tokenizer")
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
        if not path.parent.is_dir():  # the run folder was deleted or unmounted during the save
            raise FileNotFoundError(errno.ENOENT, "vanished", str(path.parent.parent)) from None
        kept = "The previous one is kept" if existed else "There was no earlier one"
        raise RunStopped(f"could not write the checkpoint {path} ({write_error(e, path.parent)}). {kept}. Free some "
                         f"space or fix the folder, then continue with the same command plus --resume.") from None
    finally:
        tmp.unlink(missing_ok=True)


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
    """Delete the temporary files of saves that a kill interrupted (call it while holding the folder's lock, so no
    other run is writing); returns their names."""
    strays = sorted(folder.checkpoints.glob(".*.pt.tmp-*"))
    for stray in strays:
        stray.unlink(missing_ok=True)
    return [stray.name for stray in strays]


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
    state, writes them (the main process; with `collective` parts, a sharded model's, every process first helps
    gather them), restores them, and knows the step of the last latest.pt on every process, so all of them decide
    alike whether a stop still saves and each can name it when another process is lost."""

    def __init__(self, folder: RunFolder, parts: dict[str, Stateful], about: dict, is_main: bool, collective: bool):
        self.folder, self.parts, self.about = folder, parts, about
        self.is_main, self.collective = is_main, collective
        self.saved_at: int | None = None  # the step latest.pt was last written at
        self.folder_existed = folder.path.is_dir()  # the command made it; library use may leave it to save()

    def save(self, path: Path, step: int) -> None:
        if self.is_main or self.collective:
            state = assemble(self.parts, self.about)
            if self.is_main:
                if self.folder_existed and not self.folder.path.is_dir():  # deleted or unmounted during the run
                    raise FileNotFoundError(errno.ENOENT, "vanished", str(self.folder.path))
                save_atomic(state, path)
        if path == self.folder.latest:
            self.saved_at = step
            distributed.note_saved(step)

    def restore(self, state: dict) -> None:
        restore(state, self.parts)


# ---- FSDP: the sharded model and optimizer seen as whole ones -------------------------------------------------------
GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)  # rank 0 gets every tensor, on the CPU; others {}
SCATTER = StateDictOptions(full_state_dict=True)  # every process passes the whole state (each one read the file)


class FullModel:
    """An FSDP-sharded model as a checkpoint part: `state_dict()` is the whole model's state with the usual keys (the
    tied `lm_head.weight` included), `load_state_dict()` takes such a state and keeps this process's shard. Both are
    collectives: every process calls them at the same point; only rank 0 gets the tensors of `state_dict()`."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def state_dict(self) -> dict:
        return get_model_state_dict(self.model, options=GATHER)

    def load_state_dict(self, state: dict) -> None:
        set_model_state_dict(self.model, state, options=SCATTER)


class FullOptimizer:
    """The optimizer of an FSDP-sharded model as a checkpoint part, in the layout `optimizer.state_dict()` of an
    unsharded model has (parameters numbered in the order of the param groups). torch's full optimizer state names
    parameters by their path instead (`blocks.0.attn.qkv.weight`); the numbering is converted here, both ways, so a
    file has one layout whoever wrote it. Collectives, like FullModel's."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer

    def names(self) -> list[str]:
        """The path of each parameter in the optimizer's order: the position is its number in a state_dict()."""
        path = {id(p): name for name, p in self.model.named_parameters()}  # a tied weight: its first path
        return [path[id(p)] for group in self.optimizer.param_groups for p in group["params"]]

    def state_dict(self) -> dict:
        by_path = get_optimizer_state_dict(self.model, self.optimizer, options=GATHER)
        if not by_path:  # a process other than rank 0
            return {}
        number = {name: i for i, name in enumerate(self.names())}
        return {"state": {number[name]: state for name, state in by_path["state"].items()},
                "param_groups": [{**group, "params": [number[name] for name in group["params"]]}
                                 for group in by_path["param_groups"]]}

    def load_state_dict(self, state: dict) -> None:
        names = self.names()
        by_path = {"state": {names[i]: s for i, s in state["state"].items()},
                   "param_groups": [{**group, "params": [names[i] for i in group["params"]]}
                                    for group in state["param_groups"]]}
        set_optimizer_state_dict(self.model, self.optimizer, by_path, options=SCATTER)


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


def load(path: Path | str, device: torch.device | str = "cpu") -> dict:
    """A checkpoint verified against its CRCs and read without running code, in the current format."""
    path = Path(path)
    problem = damage(path)
    if problem:
        raise DamagedCheckpoint(f"the checkpoint {path} is damaged ({problem}): it changed after it was written.")
    try:
        with torch.serialization.safe_globals(NUMPY_ARRAY):
            state = torch.load(path, map_location=device, weights_only=True)
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
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])  # takes the dict, and the tuple with an array that older checkpoints hold
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def load_for_resume(path: Path) -> tuple[dict, Path]:
    """(the checkpoint, its path) to resume from. A damaged or unreadable latest.pt of a run folder (a changed byte, a
    copy cut short) falls back to its best.pt when that one loads, with a note; otherwise the run stops, saying so. A
    refused or foreign file stops the run: it is not damage, and the user should know."""
    fallback = RunFolder(path.parent.parent).best if path.name == "latest.pt" else None
    try:
        return load(path), path
    except DamagedCheckpoint as e:
        saved = load_if_intact(fallback)
        if saved is None:
            raise DamagedCheckpoint(f"{e} There is no intact checkpoint to fall back to: start the run again with "
                                    f"--overwrite, or into another --output_dir.") from None
        notice(f"note: {e} Resuming from {fallback} (step {saved['trainer']['step']}) instead; the steps after it "
               f"are trained again.")
        return saved, fallback


def load_if_intact(path: Path | None) -> dict | None:
    """The checkpoint at `path`; None when there is none, or it is damaged or unreadable."""
    if path is None or not path.exists():
        return None
    try:
        return load(path)
    except DamagedCheckpoint:
        return None


def find_resume_checkpoint(resume: str | None, folder: RunFolder) -> Path | None:
    """--resume: the latest checkpoint of the run folder (None if there is none yet), or an explicit file or run
    folder."""
    if resume is None:
        return None
    if resume == "latest":
        return folder.latest if folder.latest.exists() else None
    path = Path(resume).expanduser()
    if path.is_dir():
        path = RunFolder(path).latest if RunFolder(path).latest.exists() else path / "latest.pt"
    if not path.is_file():
        raise UsageError(f"--resume {resume}: no checkpoint there. Give a .pt file, a run's output_dir, or plain "
                         f"--resume.")
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
    before = {**{k: saved["config"].get(k) for k in SHAPE_FIELDS}, "vocabulary size": saved["vocab_size"]}
    diffs = [f"{k}: checkpoint {before[k]!r}, now {current[k]!r}" for k in current if before[k] != current[k]]
    if not diffs and saved["tokenizer"] != tokenizer.to_dict():
        diffs = ["vocabulary: same size, different tokens (another corpus?)"]
    if diffs:
        started = saved["config"].get("init_from")
        origin = f" (it started from --init_from {started})" if started and started != cfg.init_from else ""
        raise UsageError(
            f"cannot resume from {path}: the model shape differs ({'; '.join(diffs)}). Pass the same --model_size, "
            f"overrides, --init_from and data as the original run{origin} (see its config.json), or train into a new "
            f"--output_dir."
        )
