"""Tokens on disk and batches from them: text is encoded once into a memory-mapped array, cached by corpus content
and tokenizer, then served as shuffled, non-overlapping windows, an epoch being one pass over the training tokens."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import TrainConfig
from .errors import UsageError, notice
from .corpora import Corpus, load_corpus, sha256_file
from .tokenizer import CharTokenizer, SentencePieceTokenizer, tokenizer_from_dict


CACHE_FILES = ("train.bin", "val.bin", "tokenizer.pkl")
_verified: set = set()  # (file, size) whose digest this process has checked


@dataclass
class TokenData:
    train: np.ndarray  # memory-mapped token ids
    val: np.ndarray
    tokenizer: object
    corpus: str
    default_prompts: str
    digest: str = ""  # of the text the tokens came from: a resume checks it is the text the run was trained on


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]


def cache_key(text: str, cfg: TrainConfig) -> str:
    content = text_digest(text)
    vocab = f"-v{cfg.vocab_size}" if cfg.tokenizer == "sentencepiece" else ""
    return f"{content}-{cfg.tokenizer}{vocab}-split{cfg.train_split}"


def build_token_cache(text: str, cfg: TrainConfig, folder: Path) -> None:
    """Train the tokenizer on the whole corpus, encode it and write train/val arrays, atomically as one folder."""
    if cfg.tokenizer == "sentencepiece":
        started = time.perf_counter()
        tokenizer = SentencePieceTokenizer.train(text, cfg.vocab_size)  # a size it cannot fill stops here, unannounced
        notice(f"trained a {cfg.vocab_size}-token sentencepiece model on {len(text):,} characters in "
               f"{time.perf_counter() - started:.1f} s (cached: later runs on this corpus reuse it)")
    else:
        tokenizer = CharTokenizer.train(text)
    ids = np.asarray(tokenizer.encode(text), dtype=np.uint32)
    dtype = np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32
    split = int(len(ids) * cfg.train_split)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".staging-"))
    ids[:split].astype(dtype).tofile(staging / "train.bin")
    ids[split:].astype(dtype).tofile(staging / "val.bin")
    with open(staging / "tokenizer.pkl", "wb") as f:
        pickle.dump(tokenizer.to_dict(), f)
    meta = {"dtype": np.dtype(dtype).name, "train_tokens": split, "val_tokens": len(ids) - split,
            "vocab_size": tokenizer.vocab_size, "characters": len(text),
            "files": {name: {"bytes": (staging / name).stat().st_size, "sha256": sha256_file(staging / name)}
                      for name in CACHE_FILES}}
    (staging / "meta.json").write_text(json.dumps(meta, indent=1))
    try:
        os.rename(staging, folder)
    except OSError:  # another process finished the same cache first
        shutil.rmtree(staging, ignore_errors=True)


def cache_damage(folder: Path) -> str | None:
    """What is wrong with a token cache, or None. Sizes are checked at every load, content digests at the first load
    in each process (a cache that changes under a running process is beyond this check)."""
    try:
        files = json.loads((folder / "meta.json").read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return "meta.json is missing, unreadable or from an older version"
    for name in CACHE_FILES:
        path, recorded = folder / name, files.get(name, {})
        if not path.exists() or path.stat().st_size != recorded.get("bytes"):
            return f"{name} is missing or has the wrong size"
        if (path, recorded["bytes"]) not in _verified:
            if sha256_file(path) != recorded.get("sha256"):
                return f"{name} does not match its recorded SHA-256"
            _verified.add((path, recorded["bytes"]))
    return None


def prepare_data(cfg: TrainConfig, corpus: Corpus | None = None) -> TokenData:
    corpus = corpus or load_corpus(cfg)
    folder = Path(cfg.resolved_cache_dir()) / "tokens" / cache_key(corpus.text, cfg)
    damage = cache_damage(folder) if folder.exists() else "absent"
    if damage:
        if folder.exists():
            notice(f"note: the token cache {folder} is damaged ({damage}); rebuilding it")
            shutil.rmtree(folder)
        build_token_cache(corpus.text, cfg, folder)
    meta = json.loads((folder / "meta.json").read_text())
    with open(folder / "tokenizer.pkl", "rb") as f:
        tokenizer = tokenizer_from_dict(pickle.load(f))
    train, val = (
        np.memmap(folder / f"{split}.bin", dtype=meta["dtype"], mode="r") if meta[f"{split}_tokens"] else np.zeros(0)
        for split in ("train", "val")
    )
    need = cfg.block_size + 1
    if len(train) < need or len(val) < need:
        raise UsageError(
            f"the corpus {corpus.name} has {len(train):,} training and {len(val):,} validation tokens, but each split "
            f"needs at least block_size + 1 = {need}. Use more text, a smaller --block_size, or a different "
            f"--train_split."
        )
    return TokenData(train, val, tokenizer, corpus.name, corpus.default_prompts, text_digest(corpus.text))


def windows_in(tokens: np.ndarray, block_size: int) -> int:
    """How many non-overlapping training windows (block_size + 1 tokens, sharing one at the seams) the tokens hold."""
    return (len(tokens) - 1) // block_size


class EpochSampler:
    """Hands out training windows: each epoch is a fresh, seeded permutation of non-overlapping windows (with a
    random shift, so epochs see different boundaries). Its whole state is (epoch, position): resume is exact."""

    def __init__(self, tokens: np.ndarray, block_size: int, seed: int):
        self.tokens, self.block_size, self.seed = tokens, block_size, seed
        self.windows_per_epoch = windows_in(tokens, block_size)
        self.epoch, self.position = 0, 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch])
        slack = len(self.tokens) - 1 - self.windows_per_epoch * self.block_size
        shift = int(rng.integers(0, slack + 1))
        return shift + rng.permutation(self.windows_per_epoch) * self.block_size

    @property
    def epochs_done(self) -> float:
        return self.epoch + self.position / self.windows_per_epoch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._epoch_order(self.epoch)

    def next_offsets(self, count: int) -> np.ndarray:
        offsets = []
        for _ in range(count):
            if self.position == self.windows_per_epoch:
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._epoch_order(self.epoch)
            offsets.append(self._order[self.position])
            self.position += 1
        return np.asarray(offsets)


def gather_windows(tokens: np.ndarray, offsets: np.ndarray, block_size: int) -> torch.Tensor:
    """(N, block_size + 1) int64 tensor of the windows starting at offsets: inputs are [:, :-1], targets [:, 1:]."""
    rows = np.stack([tokens[o : o + block_size + 1] for o in offsets]).astype(np.int64)
    return torch.from_numpy(rows)


def to_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":  # pinned memory lets the copy overlap with compute instead of blocking it
        return batch.pin_memory().to(device, non_blocking=True)
    return batch.to(device)


def validation_windows(tokens: np.ndarray, block_size: int, count: int) -> torch.Tensor:
    """A fixed, evenly spread set of validation windows, so every evaluation measures the same thing."""
    last_start = len(tokens) - block_size - 1
    offsets = np.linspace(0, last_start, num=count).astype(np.int64)
    return gather_windows(tokens, offsets, block_size)


def share_of(offsets: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """This process's contiguous share of a step's windows: together the processes take each window once, and
    process r takes what micro-batches r*accum ... (r+1)*accum - 1 of one process would."""
    return offsets.reshape(world_size, -1)[rank]
