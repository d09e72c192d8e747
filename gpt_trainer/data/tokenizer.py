"""Tokenizers: char-level (BabyGPT style), sentencepiece, and a Hugging Face `tokenizers` tokenizer read from an
--init_from folder. Each serialises to a plain dict that travels inside every checkpoint, so sampling needs nothing but
the checkpoint, and to JSON text for the token cache (data only: reading it runs no code, as a pickle could)."""

from __future__ import annotations

import base64
import io
import json
import re
from typing import Iterable

import numpy as np

from ..errors import UsageError


class CharTokenizer:
    kind = "char"

    def __init__(self, chars: list[str]):
        self.chars = chars
        self.index = {c: i for i, c in enumerate(chars)}

    @classmethod
    def train(cls, text: str) -> "CharTokenizer":
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        return [self.index[c] for c in text]

    def encode_known(self, text: str) -> tuple[list[int], str]:
        """Encode a prompt, dropping characters the corpus never contained; returns the ids and what was dropped."""
        ids = [self.index[c] for c in text if c in self.index]
        return ids, "".join(c for c in text if c not in self.index)

    def decode(self, ids) -> str:
        return "".join(self.chars[i] for i in ids)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "chars": "".join(self.chars)}


class SentencePieceTokenizer:
    kind = "sentencepiece"

    def __init__(self, model_proto: bytes):
        import sentencepiece as spm

        self.model_proto = model_proto
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)

    @classmethod
    def train(cls, text: str, vocab_size: int) -> "SentencePieceTokenizer":
        return cls.train_on(training_sentences(text), vocab_size)

    @classmethod
    def train_on(cls, sentences: Iterable[str], vocab_size: int) -> "SentencePieceTokenizer":
        import sentencepiece as spm

        model = io.BytesIO()  # from an iterator into memory: the model records no temporary path, so the same
        try:  # sentences always give the same model, byte for byte
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(sentences),
                model_writer=model,
                vocab_size=vocab_size,
                model_type="bpe",
                character_coverage=0.9995,  # Chinese has thousands of characters; rare ones fall back to bytes
                byte_fallback=True,  # so every character, even 𠀀, round-trips
                normalization_rule_name="identity",  # keep full-width punctuation exactly as written
                remove_extra_whitespaces=False,
                add_dummy_prefix=False,  # a dummy space per line would not survive the round trip
                required_chars="▁",  # the whitespace piece, else spaces in a space-free corpus decode as '▁'
                split_digits=True,
                input_sentence_size=2_000_000,
                shuffle_input_sentence=True,
                minloglevel=2,
            )
        except RuntimeError as e:
            raise UsageError(vocab_size_problem(str(e), vocab_size)) from None
        return cls(model.getvalue())

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_known(self, text: str) -> tuple[list[int], str]:
        return self.encode(text), ""

    def decode(self, ids) -> str:
        # byte-fallback pieces of a character cut off (at the end of a sample, or generated out of order) decode to
        # U+FFFD: leave them out rather than show replacement marks
        return self.sp.decode([int(i) for i in ids]).replace("\ufffd", "")

    def to_dict(self) -> dict:
        return {"kind": self.kind, "model_proto": self.model_proto}


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer (a tokenizer.json, or one built from a BERT vocab.txt) of a transformers
    model folder (--init_from). Text is encoded without special tokens: a BERT post-processor would put [CLS] and
    [SEP] around every piece of the corpus. `vocab_size` is the model's (config.json's vocab_size), which may exceed
    the tokenizer's own ids (padding rows); those ids decode to nothing. A WordPiece (BERT) tokenizer drops line
    breaks and decodes with a space between tokens (`床 前 明 月 光`), as transformers' BertTokenizer does."""

    kind = "hf"

    def __init__(self, json_text: str, vocab_size: int | None = None):
        from tokenizers import Tokenizer

        self.json = json_text
        self.tk = Tokenizer.from_str(json_text)
        self.size = max(self.tk.get_vocab(with_added_tokens=True).values()) + 1  # the ids it can produce
        self.model_vocab = vocab_size or self.size
        unk = getattr(self.tk.model, "unk_token", None)
        self.unk_id = self.tk.token_to_id(unk) if unk else None

    @property
    def vocab_size(self) -> int:
        return self.model_vocab

    def encode(self, text: str) -> list[int]:
        try:
            return self.tk.encode(text, add_special_tokens=False).ids
        except Exception as e:  # noqa: BLE001 - the library raises a bare Exception
            # a tokenizer without an unknown token (an exported char vocabulary) meeting text outside its vocabulary
            outside = sorted(c for c in set(text) if not c.isspace() and self.tk.token_to_id(c) is None)[:10]
            which = f" (characters it lacks include {''.join(outside)!r})" if outside else ""
            raise UsageError(f"the --init_from tokenizer cannot encode this text{which}: {e}. Train on text its "
                             f"vocabulary covers, or start from a model whose tokenizer has an unknown "
                             f"token.") from None

    def encode_known(self, text: str) -> tuple[list[int], str]:
        """A prompt's ids without the unknown-token ones; returns the ids and the text those stood for (without an
        unknown token: the characters outside the vocabulary, left out as the char tokenizer leaves them out)."""
        try:
            encoding = self.tk.encode(text, add_special_tokens=False)
        except Exception:  # noqa: BLE001 - the library raises a bare Exception
            known = "".join(c for c in text if self.tk.token_to_id(c) is not None)
            return self.encode(known), "".join(c for c in text if self.tk.token_to_id(c) is None)
        known = [i for i in encoding.ids if i != self.unk_id]
        dropped = "".join(text[a:b] for i, (a, b) in zip(encoding.ids, encoding.offsets) if i == self.unk_id)
        return known, dropped

    def decode(self, ids) -> str:
        return self.tk.decode([int(i) for i in ids if i < self.size])

    def to_dict(self) -> dict:
        return {"kind": self.kind, "json": self.json, "vocab_size": self.model_vocab}


SENTENCE_CHARS = 1000  # sentencepiece skips input lines over 4,192 bytes; a CJK character takes 3


def training_sentences(text: str):
    """The corpus as sentencepiece's training lines: long lines (a corpus with no line breaks is one) cut into pieces
    it keeps, instead of dropped; the tokens are then encoded from the whole text, so nothing is lost."""
    for line in text.split("\n"):
        for start in range(0, max(len(line), 1), SENTENCE_CHARS):
            yield line[start:start + SENTENCE_CHARS]


def tokenizer_from_dict(state: dict):
    if state["kind"] == "char":
        return CharTokenizer(list(state["chars"]))
    if state["kind"] == "sentencepiece":
        return SentencePieceTokenizer(state["model_proto"])
    if state["kind"] == "hf":
        return HFTokenizer(state["json"], state["vocab_size"])
    raise ValueError(f"unknown tokenizer kind {state['kind']!r}")


def tokenizer_to_json(tokenizer) -> str:
    """The tokenizer as JSON text (the token cache's tokenizer.json), the sentencepiece model's bytes in base64."""
    state = tokenizer.to_dict()
    if isinstance(state.get("model_proto"), bytes):
        state = {**state, "model_proto": base64.b64encode(state["model_proto"]).decode("ascii")}
    return json.dumps(state, ensure_ascii=False, sort_keys=True)


def tokenizer_from_json(text: str):
    """The tokenizer `tokenizer_to_json` wrote."""
    state = json.loads(text)
    if state.get("kind") == "sentencepiece":
        state["model_proto"] = base64.b64decode(state["model_proto"], validate=True)
    return tokenizer_from_dict(state)


def vocab_size_problem(error: str, vocab_size: int) -> str:
    """Our message for sentencepiece's vocabulary-size errors, naming the sizes that work (its own advice names
    options of its command line, not flags of ours)."""
    too_high = re.search(r"value <= (\d+)", error)
    if too_high:
        return (f"--vocab_size {vocab_size} is more than this corpus can fill: the largest sentencepiece vocabulary "
                f"it supports is {too_high.group(1)}. Use --vocab_size {too_high.group(1)} or less, or --tokenizer "
                f"char.")
    too_low = re.search(r"smaller than required_chars\. \d+ vs (\d+)", error)
    if too_low:
        return (f"--vocab_size {vocab_size} is too small for this corpus: its characters (after the rarest 0.05 %) "
                f"and the special tokens need at least {too_low.group(1)}. Use --vocab_size {too_low.group(1)} or "
                f"more, or --tokenizer char.")
    return (f"sentencepiece could not train a {vocab_size}-token vocabulary on this corpus ({error.splitlines()[0]}). "
            f"Try another --vocab_size, or --tokenizer char.")


# ---- encoding in worker processes (this module is light: a worker imports it, not torch) ---------------------------
UNICODE_SIZE = 0x110000


def code_points(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


def characters_in(text: str) -> np.ndarray:
    """The code points a piece of text uses (vectorised: one count per code point, not a Python loop per
    character)."""
    return np.flatnonzero(np.bincount(code_points(text)))


def start_worker(worker: dict, tokenizer_state: dict, dtype: str) -> None:
    """Fill `worker`, what one process encodes with (held by the loop that serves its requests: serve, or
    tokens.Workers when it encodes too), from the tokenizer's state and the cache's dtype."""
    worker.update(dtype=dtype, kind=tokenizer_state["kind"])
    if tokenizer_state["kind"] == "char":
        table = np.full(UNICODE_SIZE, -1, dtype=np.int64)
        table[[ord(c) for c in tokenizer_state["chars"]]] = np.arange(len(tokenizer_state["chars"]))
        worker["table"] = table
    else:
        worker["tokenizer"] = tokenizer_from_dict(tokenizer_state)


def encode_piece(worker: dict, text: str) -> bytes:
    """The ids of a piece of text as bytes of the cache's dtype, with what `start_worker` put in `worker`."""
    if worker["kind"] == "char":
        ids = worker["table"][code_points(text)]
    else:
        ids = np.asarray(worker["tokenizer"].encode(text), dtype=np.int64)
    return ids.astype(worker["dtype"]).tobytes()


WORKER_FUNCTIONS = {"start_worker": start_worker, "encode_piece": encode_piece}


def serve() -> None:
    """A worker process (`python -m gpt_trainer.data.tokenizer`): answer (function name, argument) requests read from
    stdin with pickled results on stdout, until stdin closes. It imports this module and numpy only."""
    import pickle
    import sys

    requests, answers, worker = sys.stdin.buffer, sys.stdout.buffer, {}
    while True:
        try:
            name, argument = pickle.load(requests)
        except EOFError:
            return
        try:
            answer = ("ok", WORKER_FUNCTIONS[name](worker, *argument))
        except Exception as e:  # noqa: BLE001 - sent back to the parent, which raises it
            answer = ("error", f"{type(e).__name__}: {e}")
        pickle.dump(answer, answers, protocol=pickle.HIGHEST_PROTOCOL)
        answers.flush()


if __name__ == "__main__":
    serve()
