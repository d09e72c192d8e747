"""Tokens on disk and batches from them: text is streamed, encoded once in worker processes into a memory-mapped
array cached by the corpus's files and the tokenizer, then served as shuffled, non-overlapping windows, an epoch being
one pass over the training tokens. Memory stays bounded by the piece size and the workers, whatever the corpus size."""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import os
import pickle
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..config import TrainConfig
from ..errors import RunStopped, UsageError, notice
from ..system.rundir import held
from .corpora import Corpus, default_prompts_for, listing, load_corpus, sha256_file, utf8_pieces
from .tokenizer import (
    UNICODE_SIZE,
    WORKER_FUNCTIONS,
    CharTokenizer,
    SentencePieceTokenizer,
    characters_in,
    tokenizer_from_json,
    tokenizer_to_json,
    training_sentences,
)

CACHE_FILES = ("train.bin", "val.bin", "tokenizer.json")
# in every cache folder's name: format 1 stored the tokenizer as a pickle (tokenizer.pkl), which anyone who can write a
# shared cache could make run code; format 2 stores it as JSON. A new format gets new folders, so versions sharing a
# cache never rebuild each other's
CACHE_FORMAT = 2


@dataclass
class TokenData:
    train: np.ndarray  # memory-mapped token ids
    val: np.ndarray
    tokenizer: object
    corpus: str
    default_prompts: str
    digest: str = ""  # of the tokens: a resume checks it trains on the data the run was trained on
    folder: Path | None = None  # the cache they are memory-mapped from
    built: bool = False  # prepared by this call (else found complete in the cache)


SP_SENTENCES = 1_000_000  # sentencepiece trains on at most this many lines, a seeded sample (all of a smaller corpus)


def cache_key(identity: str, cfg: TrainConfig, tokenizer=None) -> str:
    """The cache folder's name: the corpus, the tokenizer settings (a given tokenizer, --init_from's: a digest of it,
    so two folders' tokenizers never share a cache and one folder's always finds its own) and the split."""
    content = hashlib.sha256(identity.encode("utf-8")).hexdigest()[:20]
    vocab = f"-v{cfg.vocab_size}" if cfg.tokenizer == "sentencepiece" else ""
    if tokenizer is not None:
        vocab = "-" + hashlib.sha256(json.dumps(tokenizer.to_dict(), sort_keys=True).encode()).hexdigest()[:16]
    return f"{content}-{cfg.tokenizer}{vocab}-split{cfg.train_split}-f{CACHE_FORMAT}"


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class Workers:
    """Worker processes (`python -m gpt_trainer.data.tokenizer`: they import the tokenizer module and numpy, not torch)
    that run one request each at a time; `map` hands out pieces in turn and yields the answers in order, so the
    output does not depend on the number of workers, and at most one piece per worker is in flight (bounded memory).
    With one worker, everything runs here."""

    def __init__(self, count: int):
        package_root = str(Path(__file__).resolve().parent.parent)  # importable even when not installed
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
        self.procs = [subprocess.Popen([sys.executable, "-m", "gpt_trainer.data.tokenizer"], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, env=env) for _ in range(count if count > 1 else 0)]
        self.here: dict = {}  # what this process encodes with (start_worker), when it encodes itself

    def call_each(self, name: str, *argument) -> None:
        """Run a function once in every worker (here too): a worker's set-up."""
        WORKER_FUNCTIONS[name](self.here, *argument)
        for proc in self.procs:
            self._send(proc, name, argument)
        for proc in self.procs:
            self._receive(proc)

    def map(self, name: str, items):
        if not self.procs:
            yield from (WORKER_FUNCTIONS[name](self.here, item) for item in items)
            return
        busy = collections.deque()
        for item in items:
            if len(busy) == len(self.procs):
                proc = busy.popleft()
                yield self._receive(proc)
            else:
                proc = self.procs[len(busy)]
            self._send(proc, name, (item,))
            busy.append(proc)
        while busy:
            yield self._receive(busy.popleft())

    @staticmethod
    def _send(proc, name: str, argument: tuple) -> None:
        pickle.dump((name, argument), proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
        proc.stdin.flush()

    @staticmethod
    def _receive(proc):
        status, answer = pickle.load(proc.stdout)
        if status != "ok" and answer.startswith("UsageError: "):  # bad input, found by a worker: said as such
            raise UsageError(answer.removeprefix("UsageError: "))
        if status != "ok":
            raise RuntimeError(f"a preparation worker failed: {answer}")
        return answer

    def close(self) -> None:
        for proc in self.procs:
            proc.stdin.close()
        for proc in self.procs:
            proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is not None:
            for proc in self.procs:
                proc.kill()
        self.close()


class Progress:
    """A progress bar over the source bytes (MB/s, ETA) with the tokens so far, on a terminal."""

    def __init__(self, what: str, total_bytes: int):
        self.bar = tqdm(total=total_bytes, desc=what, unit="B", unit_scale=True, dynamic_ncols=True,
                        disable=not sys.stderr.isatty(), file=sys.stderr)

    def advance(self, nbytes: int, tokens: int | None = None) -> None:
        self.bar.update(nbytes)
        if tokens is not None:
            self.bar.set_postfix(tokens=f"{tokens:,}", refresh=False)

    def close(self) -> None:
        self.bar.close()


def counted(pieces, progress: Progress, spill=None):
    """The texts of (text, source bytes) pieces, advancing the progress bar; each also written to `spill` if given."""
    for text, nbytes in pieces:
        progress.advance(nbytes)
        if spill:
            spill.write(text.encode("utf-8"))
        yield text


def scan(corpus: Corpus, cfg: TrainConfig, spill=None, tokenizer=None):
    """The first pass: (the tokenizer, the default prompts). Char: every character the corpus uses
    (vectorised); sentencepiece: trained on a seeded sample of at most SP_SENTENCES lines; a given `tokenizer`
    (--init_from's) is used as it is, and the pass stops once it has the prompts, unless the text goes to `spill`
    (which it does too, when given)."""
    progress, head = Progress("reading", corpus.source_bytes), []
    texts = counted(corpus.pieces(), progress, spill)
    if tokenizer is not None:
        blank = True
        for text in tee_head(texts, head):
            blank = blank and not text.strip()
            if not blank and spill is None and sum(map(len, head)) >= PROMPT_HEAD:
                break
        progress.close()
    elif cfg.tokenizer == "char":
        seen = np.zeros(UNICODE_SIZE, dtype=bool)
        for text in tee_head(texts, head):
            seen[characters_in(text)] = True
        progress.close()
        tokenizer = CharTokenizer([chr(c) for c in np.flatnonzero(seen)])
        blank = all(c.isspace() for c in tokenizer.chars)
    else:
        sample, lines = [], 0
        rng = random.Random(cfg.seed)
        for text in tee_head(texts, head):
            for sentence in filter(None, training_sentences(text)):  # sentencepiece skips empty lines anyway
                lines += 1
                if len(sample) < SP_SENTENCES:
                    sample.append((lines, sentence))
                elif (slot := rng.randrange(lines)) < SP_SENTENCES:  # reservoir sampling: each line equally likely
                    sample[slot] = (lines, sentence)
        progress.close()
        sample.sort()  # the corpus's own order, so a corpus smaller than the sample gives the model it always gave
        blank = not any(sentence.strip() for _, sentence in sample)
        started = time.perf_counter()
        if not blank:
            tokenizer = SentencePieceTokenizer.train_on((s for _, s in sample), cfg.vocab_size)
            notice(f"trained a {cfg.vocab_size}-token sentencepiece model on {len(sample):,} of {lines:,} lines in "
                   f"{time.perf_counter() - started:.1f} s (cached: later runs on this corpus reuse it)")
    if blank:
        raise UsageError(f"the corpus {corpus.name} holds no text (it is empty or only whitespace). Point "
                         f"--data_path at your corpus.")
    first = "".join(head)[:PROMPT_HEAD]
    return tokenizer, (corpus.default_prompts or default_prompts_for(first))


PROMPT_HEAD = 20000  # characters from the corpus's beginning that the default prompts are picked from


def tee_head(texts, head: list, wanted: int = PROMPT_HEAD):
    """Pass the texts on, keeping their first `wanted` characters in `head` (for the default prompts)."""
    kept = 0
    for text in texts:
        if kept < wanted:
            head.append(text[: wanted - kept])
            kept += len(head[-1])
        yield text


def build_token_cache(corpus: Corpus, cfg: TrainConfig, folder: Path, given_tokenizer=None) -> None:
    """Tokenizer from a first streaming pass (or `given_tokenizer`), ids from a second (in worker processes, appended
    straight to disk), then the train/val split; written into a staging folder renamed into place at the end, so an
    interrupted preparation leaves no cache that a later run would use, and only once the corpus is found unchanged
    since it was first looked at and every id inside the vocabulary."""
    started = time.perf_counter()
    # char ids are a vectorised table look-up, faster here than the pieces' trip to a worker and back (measured:
    # 79 MB/s in one process, 41 MB/s with two workers); sentencepiece's and the tokenizers library's encoders are
    # the bottleneck that workers share
    workers = (cfg.prepare_workers or usable_cores()) if cfg.tokenizer != "char" else 1
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".staging-"))
    # text parsed out of JSON is kept from the first pass for the second: parsing every record twice halved the speed
    spill = staging / "text.tmp" if corpus.parsed else None
    try:
        with open(spill, "wb") if spill else contextlib.nullcontext() as spilled:
            tokenizer, prompts = scan(corpus, cfg, spilled, given_tokenizer)
        # the largest value of the dtype is never a valid id, so the -1 of a character the first pass did not see
        # (stored as that value) is always caught by check_unchanged
        dtype = np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max else np.uint32
        second = utf8_pieces(spill) if spill else corpus.pieces()
        progress, tokens = Progress("encoding", spill.stat().st_size if spill else corpus.source_bytes), 0
        with open(staging / "train.bin", "wb") as out, Workers(workers) as pool:
            pool.call_each("start_worker", tokenizer.to_dict(), np.dtype(dtype).name)
            for ids in pool.map("encode_piece", counted(second, progress)):
                out.write(ids)
                tokens += len(ids) // np.dtype(dtype).itemsize
                progress.advance(0, tokens)
        progress.close()
        if spill:
            spill.unlink()
        check_unchanged(corpus, staging / "train.bin", dtype, tokenizer.vocab_size)
        split = int(tokens * cfg.train_split)
        split_off_validation(staging, split * np.dtype(dtype).itemsize)
        (staging / "tokenizer.json").write_text(tokenizer_to_json(tokenizer), encoding="utf-8")
        meta = {"dtype": np.dtype(dtype).name, "train_tokens": split, "val_tokens": tokens - split,
                "vocab_size": tokenizer.vocab_size, "corpus": corpus.name, "default_prompts": prompts,
                "source_bytes": corpus.source_bytes, "seconds": round(time.perf_counter() - started, 1),
                "files": {name: {"bytes": (staging / name).stat().st_size, "sha256": sha256_file(staging / name)}
                          for name in CACHE_FILES}}
        (staging / "meta.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False))
        os.rename(staging, folder)
    except OSError as e:
        if e.filename is None and e.errno is not None:  # a write to an open file names none: name the cache
            raise OSError(e.errno, e.strerror, str(folder)) from e
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def check_unchanged(corpus: Corpus, ids_file: Path, dtype, vocab_size: int) -> None:
    """Stop, publishing nothing, when a file of the corpus changed while it was read: its size, modification time or
    inode differ from when preparation began, or the ids hold one outside the vocabulary (the char tokenizer's -1 for
    a character the first pass did not see, stored as the dtype's largest value, which no vocabulary reaches)."""
    changed = corpus.changed_files()
    if changed:
        raise RunStopped(f"{listing(changed, 3)} changed while it was read (its size, modification time or inode "
                         f"differ from when preparation began), so the tokens would not match it; no token cache was "
                         f"written. Run again once the corpus is stable.")
    if largest_id(ids_file, dtype) >= vocab_size:
        raise RunStopped(f"the corpus {corpus.name} changed while it was read (its second reading holds characters "
                         f"the first did not), so the tokens would not match it; no token cache was written. Run "
                         f"again once the corpus is stable.")


def largest_id(path: Path, dtype, piece: int = 1 << 26) -> int:
    """The largest id in a token file, read in pieces (bounded memory); -1 for an empty one."""
    if not path.stat().st_size:
        return -1
    ids = np.memmap(path, dtype=dtype, mode="r")
    largest = max(int(ids[start:start + piece].max()) for start in range(0, len(ids), piece))
    del ids  # unmapped before the file is cut at the split
    return largest


def split_off_validation(staging: Path, train_bytes: int) -> None:
    """train.bin holds every id: copy what follows the split to val.bin, then cut train.bin there."""
    with open(staging / "train.bin", "rb") as source, open(staging / "val.bin", "wb") as val:
        source.seek(train_bytes)
        shutil.copyfileobj(source, val, 1 << 24)
    os.truncate(staging / "train.bin", train_bytes)


def cache_problem(folder: Path) -> str | None:
    """What makes a token cache unusable, said as "is damaged (...)" or "is from an older version (...)", or None.
    Sizes and content digests are checked at every load (a cache that changes under a running process is beyond this
    check). A pickled tokenizer is never read, whatever meta.json says of it."""
    if (folder / "tokenizer.pkl").exists():
        return ("is from an older version (its tokenizer is tokenizer.pkl, a pickle: reading one can run code, so this "
                "version never does)")
    try:
        files = json.loads((folder / "meta.json").read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return "is damaged (meta.json is missing, unreadable or from an older version)"
    for name in CACHE_FILES:
        path, recorded = folder / name, files.get(name, {})
        if not path.exists() or path.stat().st_size != recorded.get("bytes"):
            return f"is damaged ({name} is missing or has the wrong size)"
        if sha256_file(path) != recorded.get("sha256"):
            return f"is damaged ({name} does not match its recorded SHA-256)"
    return None


def prepare_tokens(cfg: TrainConfig, corpus: Corpus | None = None, tokenizer=None) -> TokenData:
    """The token data of the corpus, prepared once: a cache found complete is used without reading the corpus.
    `tokenizer`: a given one (--init_from's, which --tokenizer hf names), used whatever the text."""
    if (cfg.tokenizer == "hf") != (tokenizer is not None):
        raise ValueError("--tokenizer hf is the --init_from folder's tokenizer: pass it, and only it")
    tokens_dir = Path(cfg.resolved_cache_dir()) / "tokens"
    if cfg.data_path:  # the user's files are checked before anything is written (a named corpus downloads: locked)
        corpus = corpus or load_corpus(cfg)
    with held(tokens_dir.parent / ".prepare.lock"):
        for leftover in tokens_dir.glob(".staging-*"):  # a preparation that was killed (the lock says none runs)
            shutil.rmtree(leftover, ignore_errors=True)
        corpus = corpus or load_corpus(cfg)
        folder = tokens_dir / cache_key(corpus.identity(), cfg, tokenizer)
        problem = cache_problem(folder) if folder.exists() else "absent"
        built = bool(problem)
        if problem:
            if folder.exists():
                notice(f"note: the token cache {folder} {problem}; rebuilding it")
                shutil.rmtree(folder)
            build_token_cache(corpus, cfg, folder, tokenizer)
    meta = json.loads((folder / "meta.json").read_text())
    tokenizer = tokenizer_from_json((folder / "tokenizer.json").read_text(encoding="utf-8"))
    train, val = (
        np.memmap(folder / f"{split}.bin", dtype=meta["dtype"], mode="r") if meta[f"{split}_tokens"] else np.zeros(0)
        for split in ("train", "val")
    )
    digest = hashlib.sha256("".join(meta["files"][n]["sha256"] for n in ("train.bin", "val.bin")).encode())
    return TokenData(train, val, tokenizer, corpus.name, meta["default_prompts"], digest.hexdigest()[:20], folder,
                     built)


def prepare_data(cfg: TrainConfig, corpus: Corpus | None = None, tokenizer=None) -> TokenData:
    """The token data of the corpus (`prepare_tokens`), refused when a split is too short for the run's block size."""
    data = prepare_tokens(cfg, corpus, tokenizer)
    need = cfg.block_size + 1
    if len(data.train) < need or len(data.val) < need:
        text = f"--data_path {cfg.data_path}" if cfg.data_path else f"the corpus {data.corpus}"
        raise UsageError(
            f"{text} has {len(data.train):,} training and {len(data.val):,} validation tokens, but "
            f"each split needs at least block_size + 1 = {need}. Use more text, a smaller --block_size, or a different "
            f"--train_split."
        )
    return data
