"""Where training text comes from: the user's files, or a named corpus (downloaded once into the cache, verified
by checksum, resumable; or installed locally by Debian's fortunes-zh; or embedded in this package: Tang poems made by
tools/build_builtin_poems.py, licence in poems_builtin_LICENSE.txt)."""

from __future__ import annotations

import codecs
import functools
import gzip
import hashlib
import itertools
import json
import os
import re
import stat
import unicodedata
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from ..config import CHINESE_PROMPTS, TrainConfig
from ..errors import UsageError, notice
from ..system.rundir import MARKER

# chinese-poetry at a fixed commit, so the bytes (and so the token cache) never change under a user.
CHINESE_POETRY_COMMIT = "8ce34a6414c51ee43771db8a575b3074a6ba2299"
FORTUNES_DIR = "/usr/share/games/fortunes"
BUILTIN_POEMS = Path(__file__).with_name("poems_builtin.txt")


@dataclass(frozen=True)
class RemoteCorpus:
    name: str
    base_url: str
    mirror_env: str  # environment variable that replaces base_url, for mirrors and blocked networks
    files: tuple[str, ...]
    sha256: dict = field(default_factory=dict)  # known digests; others are recorded on first download and then enforced

    def url_base(self) -> str:
        return os.environ.get(self.mirror_env, self.base_url).rstrip("/")


REMOTE_CORPORA = {
    "song_ci": RemoteCorpus(
        "song_ci",
        f"https://raw.githubusercontent.com/chinese-poetry/chinese-poetry/{CHINESE_POETRY_COMMIT}",
        "CHINESE_POETRY_BASE_URL",
        tuple(f"ci/ci.song.{i}.json" for i in range(0, 22000, 1000)),
    ),
    "tang": RemoteCorpus(
        "tang",
        f"https://raw.githubusercontent.com/chinese-poetry/chinese-poetry/{CHINESE_POETRY_COMMIT}",
        "CHINESE_POETRY_BASE_URL",
        tuple(f"json/poet.tang.{i}.json" for i in range(0, 58000, 1000)),
    ),
    "shakespeare": RemoteCorpus(
        "shakespeare",
        "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare",
        "SHAKESPEARE_BASE_URL",
        ("input.txt",),
    ),
}


CHUNK_BYTES = 8 << 20  # the text is read, decoded and encoded in line-aligned pieces of about this many bytes
SOURCE_SUFFIXES = (".txt", ".json", ".jsonl")  # each also as .gz


class Corpus:
    """Training text: held in memory (the small named corpora), or files streamed in line-aligned pieces
    (--data_path), so that preparing a corpus of gigabytes never holds it whole."""

    def __init__(self, name: str, text: str | None = None, default_prompts: str | None = None,
                 files: tuple[Path, ...] = (), text_field: str = "text"):
        self.name, self._text, self.default_prompts = name, text, default_prompts
        self.files, self.text_field = tuple(files), text_field
        self._states: tuple | None = None
        self._said: set[str] = set()

    def pieces(self):
        """(text, source bytes) pieces whose concatenation is the whole text; files are joined by a line break."""
        if self._text is not None:
            yield self._text, len(self._text.encode("utf-8"))
            return
        for i, path in enumerate(self.files):
            if i:
                yield "\n", 0
            yield from file_pieces(path, self.text_field, self.note_once)

    def note_once(self, message: str) -> None:
        """A note about a file, said once however often the file is read (preparation reads a corpus twice)."""
        if message not in self._said:
            self._said.add(message)
            notice(message)

    def states(self) -> tuple:
        """Each file's (size, mtime_ns, inode), taken at the first call: what the cache is keyed on, and what
        preparation compares the files with once it has read them."""
        if self._states is None:
            self._states = tuple(file_state(p) for p in self.files)
        return self._states

    def changed_files(self) -> list[Path]:
        """The files whose size, modification time or inode now differ from `states()` (or that are gone)."""
        return [p for p, state in zip(self.files, self.states()) if file_state(p) != state]

    @property
    def text(self) -> str:
        """The whole text in memory: for small corpora and tests; preparation streams `pieces()` instead."""
        return self._text if self._text is not None else "".join(text for text, _ in self.pieces())

    @property
    def parsed(self) -> bool:
        """Whether its text is parsed out of JSON (preparation then keeps the text of its first pass for the second)."""
        return any(source_kind(p) in (".json", ".jsonl") for p in self.files)

    @property
    def source_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.files) if self._text is None else len(self._text.encode("utf-8"))

    def identity(self) -> str:
        """What the token cache is keyed on: each file's path, size and modification time (no need to read a corpus
        of gigabytes to find its cache), or the digest of a text held in memory."""
        if self._text is not None:
            return "text:" + hashlib.sha256(self._text.encode("utf-8")).hexdigest()
        stats = [(str(p.resolve()), size, mtime_ns) for p, (size, mtime_ns, _) in zip(self.files, self.states())]
        return "files:" + hashlib.sha256(json.dumps([stats, self.text_field]).encode()).hexdigest()


def file_state(path: Path) -> tuple | None:
    """(size, mtime_ns, inode) of a file, or None when it is gone."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_size, st.st_mtime_ns, st.st_ino


class CorpusUnavailable(UsageError):
    """A named corpus cannot be had here (no network, package not installed): the Chinese default falls back."""


# ---- reading the user's files ---------------------------------------------------------------------------------------
WIDE_BOMS = ((codecs.BOM_UTF32_LE, "utf-32-le"), (codecs.BOM_UTF32_BE, "utf-32-be"),
             (codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be"))


def wide_encoding(raw: bytes) -> tuple[str, int] | None:
    """(codec, BOM length) for UTF-16/32 text, with a BOM or without one. Without one, UTF-32 is told by where its
    zero bytes fall (two bytes of every four), UTF-16 by decoding the head: text it reads as, with its line breaks
    (whose zero byte is what tells it apart from other encodings), or with zero bytes mostly on one side of each pair
    (ASCII in it). Chinese text has few zero bytes, some on either side (一 is U+4E00, the ideographic space
    U+3000), so their count alone would often pick the wrong byte order."""
    for bom, codec in WIDE_BOMS:  # UTF-32 first: its little-endian BOM begins with UTF-16's
        if raw.startswith(bom):
            return codec, len(bom)
    head = raw[:8192]
    if b"\0" not in head:
        return None
    if len(raw) % 4 == 0 and not any(head[2::4]) and not any(head[3::4]):  # b0 b1 00 00: every code point < 2^16
        return "utf-32-le", 0
    if len(raw) % 4 == 0 and not any(head[0::4]) and not any(head[1::4]):
        return "utf-32-be", 0
    if len(raw) % 2:
        return None
    even, odd = head[0::2].count(0), head[1::2].count(0)
    for codec, mostly_ascii in (("utf-16-le", odd > 4 * even), ("utf-16-be", even > 4 * odd)):
        text = readable_text(head, codec)
        if text is not None and (mostly_ascii or "\n" in text or "\r" in text):
            return codec, 0
    return None


def readable_text(head: bytes, codec: str) -> str | None:
    """The head decoded as `codec` when it reads as text: it decodes (a character cut at its end aside) and at most
    1 % of its characters are control characters, surrogates, private-use or unassigned code points (what bytes of
    another encoding give)."""
    try:
        text = codecs.getincrementaldecoder(codec)().decode(head)
    except UnicodeDecodeError:
        return None
    odd = sum(unicodedata.category(c) in ("Cc", "Cs", "Co", "Cn") and not c.isspace() for c in text)
    return text if text and odd <= len(text) // 100 else None


def decode_bytes(raw: bytes, path: str, note=notice) -> str:
    """UTF-8 (BOM stripped); UTF-16/32 (with or without a BOM) with a note; else GB18030 (a superset of
    GBK/GB2312, common for Chinese text) with a note. Text with NUL characters is refused."""
    wide = wide_encoding(raw)
    if wide:
        codec, bom = wide
        try:
            text = raw[bom:].decode(codec)
        except UnicodeDecodeError as e:
            raise UsageError(f"{path} looks like {codec.upper()} text but does not decode as it (offset {e.start}). "
                             f"Convert it to UTF-8, e.g. `iconv -f {codec.upper()} -t UTF-8 {path} > fixed.txt`."
                             ) from None
        note(f"note: {path} is {codec.upper()} text; decoded it as such.")
    else:
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            try:
                text = raw.decode("gb18030")
            except UnicodeDecodeError:
                raise UsageError(
                    f"{path} is neither UTF-8, UTF-16/32 nor GB18030/GBK text (first bad byte at offset {e.start}). "
                    f"Convert it, e.g. `iconv -f <encoding> -t UTF-8 {path} > fixed.txt`, and pass the converted file."
                ) from None
            note(assumed_gb18030(path, e.start, raw_excerpt(raw, e.start)))
    if "\0" in text:
        raise UsageError(f"{path} contains NUL characters (at character {text.index(chr(0)):,}), so it is not plain "
                         f"text: a binary file, or text in an encoding that was not recognised. Convert it to UTF-8.")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def poem_to_text(item: dict, text_field: str = "text") -> str | None:
    """A chinese-poetry record (`paragraphs` list, with `title` or `rhythmic`) or a {"text": ...} record (the field
    --text_field names)."""
    if isinstance(item.get("paragraphs"), list):
        heading = item.get("rhythmic") or item.get("title") or ""
        body = "".join(str(p) for p in item["paragraphs"])
        return f"{heading}\n{body}\n" if heading else f"{body}\n"
    if isinstance(item.get(text_field), str):
        return item[text_field].rstrip("\n") + "\n"
    return None


def no_records_error(path: str, count: int, text_field: str) -> UsageError:
    return UsageError(f"{path}: none of its {count} JSON records has a `paragraphs` list or a `{text_field}` string, "
                      f"so there is nothing to train on. Use the chinese-poetry layout, {{\"{text_field}\": ...}} "
                      f"records, or --text_field to name the field that holds the text.")


def check_records(path, count: int, kept: int, text_field: str, note) -> None:
    """A file none of whose records has text is refused; one where some lack it says how many were left out."""
    if count and not kept:
        raise no_records_error(str(path), count, text_field)
    if kept < count:
        note(f"note: {path}: {count - kept:,} of its {count:,} JSON records have no `paragraphs` list or "
             f"`{text_field}` string and are left out (--text_field names the field that holds the text).")


def json_records_to_text(records, path: str, text_field: str = "text", note=notice) -> str:
    if isinstance(records, dict):
        records = [records]
    if not isinstance(records, list):
        raise UsageError(f"{path}: expected a JSON list of records with `paragraphs` or `{text_field}`, found "
                         f"{type(records).__name__}.")
    texts = [t for t in (poem_to_text(r, text_field) for r in records if isinstance(r, dict)) if t]
    check_records(path, len(records), len(texts), text_field, note)
    return "\n".join(texts)


def source_kind(path: Path) -> str:
    """.txt, .json or .jsonl, for a file and its gzip-compressed variant (x.jsonl.gz is .jsonl); other names: .txt."""
    suffixes = path.suffixes[-2:] if path.suffix == ".gz" else path.suffixes[-1:]
    return suffixes[0] if suffixes and suffixes[0] in SOURCE_SUFFIXES else ".txt"


def is_source(path: Path) -> bool:
    """A file a folder's corpus is read from: .txt, .json, .jsonl, or one of them gzip-compressed (x.jsonl.gz)."""
    inner = path.suffixes[-2:-1] if path.suffix == ".gz" else path.suffixes[-1:]
    return bool(inner) and inner[0] in SOURCE_SUFFIXES


GZIP_DAMAGE = (EOFError, zlib.error, gzip.BadGzipFile)  # a .gz cut short, corrupted, or not gzip at all


def unreadable(path: Path, error: BaseException) -> UsageError:
    """A file that cannot be read, with the advice that fits the cause."""
    reason = getattr(error, "strerror", None) or error
    if isinstance(error, GZIP_DAMAGE):
        return UsageError(f"{path} cannot be decompressed ({reason}): the file is cut short or damaged. Replace it "
                          f"with a whole copy (`gzip -t` tests one), or move it out of --data_path.")
    if isinstance(error, FileNotFoundError):
        return UsageError(f"{path} vanished while it was being read: it was moved or deleted. Put it back, or let "
                          f"whatever moves it finish, then run again.")
    if isinstance(error, PermissionError):
        return UsageError(f"{path} cannot be read ({reason}). Fix its permissions, or move it out of --data_path.")
    return UsageError(f"{path} cannot be read ({reason}): the disk or file system failed on it. Check it and replace "
                      f"the file, or move it out of --data_path.")


def open_source(path: Path):
    try:
        return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")
    except OSError as e:
        raise unreadable(path, e) from None


def read_blocks(path: Path):
    """The file's bytes in blocks of CHUNK_BYTES (decompressed for .gz); a read error names the file."""
    with open_source(path) as f:
        while True:
            try:
                block = f.read(CHUNK_BYTES)
            except (OSError, *GZIP_DAMAGE) as e:
                raise unreadable(path, e) from None
            if not block:
                return
            yield block


def first_bad_byte(path: Path, codec: str) -> int | None:
    """Where the file stops decoding as `codec`, or None when all of it does (a character cut at the very end aside:
    the incremental decoder holds it back)."""
    decoder, offset = codecs.getincrementaldecoder(codec)(), 0
    for block in read_blocks(path):
        held_back = len(decoder.getstate()[0])  # the start of a character the last block cut: counted already
        try:
            decoder.decode(block)
        except UnicodeDecodeError as e:
            return offset - held_back + e.start
        offset += len(block)
    return None


def detect_encoding(path: Path) -> tuple[str, int | None]:
    """(utf-8-sig, gb18030 or "wide": UTF-16/32, decoded whole; for gb18030 the first byte that is not UTF-8), found
    by streaming the file once per version of it (preparation reads a corpus twice)."""
    try:
        st = path.stat()
    except OSError as e:
        raise unreadable(path, e) from None
    return _detected_encoding(path.resolve(), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=4096)
def _detected_encoding(path: Path, size: int, mtime_ns: int) -> tuple[str, int | None]:
    if wide_encoding(next(read_blocks(path), b"")):
        return "wide", None
    bad = first_bad_byte(path, "utf-8-sig")
    if bad is None:
        return "utf-8-sig", None
    if first_bad_byte(path, "gb18030") is None:
        return "gb18030", bad
    raise UsageError(f"{path} is neither UTF-8, UTF-16/32 nor GB18030/GBK text (first bad byte at offset {bad}). "
                     f"Convert it, e.g. `iconv -f <encoding> -t UTF-8 {path} > fixed.txt`, and pass the converted "
                     f"file.")


def assumed_gb18030(path, offset: int, excerpt: bytes) -> str:
    """The note for a file decoded as GB18030: what was assumed, what the text then reads as, how to choose
    otherwise (text in Latin-1, Shift-JIS or Big5 decodes as GB18030 too, garbled)."""
    reads = excerpt.decode("gb18030", errors="replace").strip()
    return (f"note: {path} is not UTF-8 (byte {offset:,} is not); decoded it as GB18030/GBK, the usual encoding of "
            f"Chinese text, where it reads “{reads}”. If that is garbled, the file is in another encoding (Latin-1, "
            f"Shift-JIS, Big5, ...): convert it to UTF-8, e.g. `iconv -f LATIN1 -t UTF-8 {path} > converted.txt`, "
            f"and pass the converted file.")


def raw_excerpt(raw: bytes, offset: int, width: int = 40, first: int = 0) -> bytes:
    """The line around byte `offset` of `raw` (whose first byte is byte `first` of its file), at most `width` bytes
    either side: from the offset itself when no line starts within them (and the file does not), so that no
    character is cut in two."""
    before = max(0, offset - width)
    newline = raw.rfind(b"\n", before, offset)
    start = newline + 1 if newline >= 0 or first + before == 0 else offset
    end = raw.find(b"\n", offset, offset + width)
    return raw[start:end if end >= 0 else offset + width]


def file_excerpt(path: Path, offset: int, width: int = 40) -> bytes:
    """`raw_excerpt` of a file, read only as far as it needs."""
    kept, position = b"", 0
    for block in read_blocks(path):
        if position + len(block) > offset - width:
            kept += block[max(0, offset - width - position):]
        position += len(block)
        if position >= offset + width:
            break
    skipped = max(0, offset - width)
    return raw_excerpt(kept, offset - skipped, width, skipped)


def text_pieces(path: Path, note=notice):
    """(text, bytes) pieces of a text file, line-aligned (a line longer than a few pieces is cut, never a character
    or a CR LF pair), line breaks made LF. A character cut short at the very end is left out, with a note."""
    codec, bad = detect_encoding(path)
    if codec == "wide":
        raw = b"".join(read_blocks(path))
        yield decode_bytes(raw, str(path), note), len(raw)
        return
    if codec == "gb18030":
        note(assumed_gb18030(path, bad, file_excerpt(path, bad)))
    decoder, chars = codecs.getincrementaldecoder(codec)(), 0
    for data in line_aligned(path, hold_cr=True):
        text = clean_text(decoder.decode(data), path, chars)
        chars += len(text)
        yield text, len(data)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        note(f"note: {path} ends in the middle of a character (a file cut short?); that character is left out.")


def line_aligned(path: Path, hold_cr: bool = False):
    """The file's bytes in pieces that end at a line break (a line longer than four blocks is cut; an incremental
    decoder keeps the character such a cut splits), the rest of the file last. With hold_cr, a piece never ends
    between the CR and LF of a pair, so the pair becomes one line break."""
    rest = b""
    for block in read_blocks(path):
        data = rest + block
        cut = data.rfind(b"\n") + 1 or (len(data) if len(data) > 4 * CHUNK_BYTES else 0)
        if hold_cr and data[cut - 1:cut] == b"\r":
            cut -= 1
        if cut:
            yield data[:cut]
        rest = data[cut:]
    if rest:
        yield rest


def utf8_pieces(path: Path):
    """(text, bytes) line-aligned pieces of a UTF-8 file this program wrote (the first pass's text), decoded exactly
    as written: no byte-order mark or line-break handling."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    for data in line_aligned(path):
        yield decoder.decode(data), len(data)
    decoder.decode(b"", final=True)


def clean_text(text: str, path: Path, chars_before: int) -> str:
    if "\0" in text:
        raise UsageError(f"{path} contains NUL characters (at character {chars_before + text.index(chr(0)):,}), so "
                         f"it is not plain text: a binary file, or text in an encoding that was not recognised. "
                         f"Convert it to UTF-8.")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def jsonl_pieces(path: Path, text_field: str, note=notice):
    """The texts of a JSON-lines file's records (one per line), joined by line breaks, in pieces; a line that is not
    JSON stops preparation, naming the file and the line."""
    lineno, records, kept, partial = 0, 0, 0, ""
    for piece, nbytes in itertools.chain(text_pieces(path, note), [(None, 0)]):  # None: the end, for a last line
        lines = (partial + (piece or "")).split("\n")
        partial = lines.pop() if piece is not None else ""
        filled = [line for line in lines if line.strip()]
        records += len(filled)
        texts = [text for item in parse_json_lines(filled, lines, lineno, path)
                 if isinstance(item, dict) and (text := poem_to_text(item, text_field))]
        lineno += len(lines)
        yield "".join(("\n" if kept or i else "") + text for i, text in enumerate(texts)), nbytes
        kept += len(texts)
    check_records(path, records, kept, text_field, note)


def parse_json_lines(filled: list[str], lines: list[str], first_lineno: int, path: Path) -> list:
    """The records of a piece's non-blank lines, parsed in one call (a JSON array of them: C speed, not a Python
    loop per line); when that fails, line by line, to name the line that is not JSON."""
    try:
        items = json.loads("[" + ",".join(filled) + "]")
        if len(items) == len(filled):  # a line holding two values, "1, 2", would pass as two records
            return items
    except json.JSONDecodeError:
        pass
    items = []
    for offset, line in enumerate(lines, 1):
        if line.strip():
            try:
                items.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise UsageError(f"{path}, line {first_lineno + offset}: not valid JSON ({e.msg}). Fix or remove that "
                                 f"line.") from None
    return items


def file_pieces(path: Path, text_field: str = "text", note=notice):
    """(text, source bytes) pieces of one source file, whatever its format; `note` says what a reader should know."""
    kind = source_kind(path)
    if kind == ".jsonl":
        yield from jsonl_pieces(path, text_field, note)
    elif kind == ".json":
        raw = b"".join(read_blocks(path))
        text = decode_bytes(raw, str(path), note)
        try:
            yield json_records_to_text(json.loads(text), str(path), text_field, note), len(raw)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}).") from None
    else:
        yield from text_pieces(path, note)


def read_source_file(path: Path, text_field: str = "text") -> str:
    return "".join(text for text, _ in file_pieces(path, text_field))


def is_empty(path: Path) -> bool:
    """No bytes to read (its size says so, or a .gz holds nothing); a file that cannot be read says so here."""
    if path.stat().st_size and path.suffix != ".gz":
        return False
    with open_source(path) as f:
        try:
            return not f.read(1)
        except (OSError, *GZIP_DAMAGE) as e:
            raise unreadable(path, e) from None


def special_kind(mode: int) -> str | None:
    """What a file that is not a regular file (nor a folder) is, in words; None for a regular file or a folder."""
    kinds = ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    return next((kind for test, kind in kinds if test(mode)), None)


def listing(paths: list[Path], shown: int = 5) -> str:
    return ", ".join(map(str, paths[:shown])) + (f" and {len(paths) - shown} more" if len(paths) > shown else "")


def source_files(root: Path) -> list[Path]:
    """The source files below a folder, in name order, links followed. A folder reached again (a link back to a
    folder it is inside, or a second link to one folder) is not read again, nor a file reached twice; run folders,
    links that lead nowhere and sources that are not regular files (a named pipe would hang the reading) are left
    out; each of these is named in a note."""
    found, folders_seen, skipped = {}, set(), {"again": [], "nowhere": [], "special": [], "twice": []}

    def visit(folder: Path, identity: tuple) -> None:
        if identity in folders_seen:
            skipped["again"].append(folder)
            return
        folders_seen.add(identity)
        if (folder / MARKER).exists():  # what a run wrote is not corpus
            notice(f"note: {folder} is a training run's folder inside --data_path; its files are not read as text.")
            return
        for entry in sorted(folder.iterdir()):
            try:
                st = entry.stat()  # through links
            except OSError:  # a link whose target is missing or that loops (or an entry that just vanished)
                if entry.is_symlink():
                    skipped["nowhere"].append(entry)
                continue
            if stat.S_ISDIR(st.st_mode):
                visit(entry, (st.st_dev, st.st_ino))
            elif is_source(entry) and special_kind(st.st_mode):
                skipped["special"].append(entry)
            elif is_source(entry) and (st.st_dev, st.st_ino) in found:  # a second link to it, or a hard link
                skipped["twice"].append(entry)
            elif is_source(entry):
                found[st.st_dev, st.st_ino] = entry

    root_stat = root.stat()
    visit(root, (root_stat.st_dev, root_stat.st_ino))
    notes = {"again": "link(s) to a folder already read (a link back to a folder it is inside, or a second link to "
                      "one folder), not read again",
             "nowhere": "link(s) that lead nowhere (the target is missing, or the links loop)",
             "special": "file(s) that are not regular files (a named pipe, a device or a socket: they cannot be read "
                        "twice, as preparation does)",
             "twice": "file(s) reached a second time through links, read once"}
    for reason, paths in skipped.items():
        if paths:
            notice(f"note: skipped {len(paths)} {notes[reason]} in --data_path: {listing(paths)}")
    return sorted(found.values())


def read_data_path(data_path: str, text_field: str = "text") -> Corpus:
    """The files of --data_path, to be streamed: a file, or every .txt/.json/.jsonl (and .gz) file below a folder,
    in name order (see `source_files`); empty files are skipped with a note. A --data_path that is not a regular file
    or a folder (a named pipe, a device) is refused: preparation reads the text twice."""
    path = Path(data_path).expanduser()
    if path.is_symlink() and not path.exists():
        raise UsageError(f"--data_path {data_path} is a symbolic link that leads nowhere (its target is missing, or "
                         f"it loops). Fix the link, or give the file or folder itself.")
    if not path.exists():
        raise UsageError(f"--data_path {data_path} does not exist. Give a text file or a folder of "
                         f".txt/.json/.jsonl files.")
    kind = special_kind(path.stat().st_mode)
    if kind:
        raise UsageError(f"--data_path {data_path} is {kind}, not a regular file: preparation reads the text twice "
                         f"(first the vocabulary, then the ids), and a pipe or a device cannot be read twice. Save "
                         f"the text to a file (e.g. `cat {data_path} > corpus.txt`) and pass that.")
    if not path.is_dir():
        return Corpus(path.name, files=(path,), text_field=text_field)
    files = source_files(path)
    empty = [p for p in files if is_empty(p)]
    if empty:
        notice(f"note: skipped {len(empty)} empty file(s) in --data_path: {', '.join(p.name for p in empty[:5])}")
    files = [p for p in files if p not in empty]
    if not files:
        raise UsageError(f"--data_path {data_path} is a folder with no .txt, .json or .jsonl files in it (or only "
                         f"empty ones).")
    return Corpus(path.name, files=tuple(files), text_field=text_field)


def default_prompts_for(text: str) -> str:
    sample = text[:20000]
    cjk = sum("\u4e00" <= c <= "\u9fff" for c in sample)
    return CHINESE_PROMPTS if cjk > 0.3 * max(1, len(sample.strip())) else "\n"


# ---- downloads ------------------------------------------------------------------------------------------------------
def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download(url: str, dest: Path, expected_sha256: str | None, timeout: float = 30.0) -> str:
    """Fetch url into dest through dest.part, continuing a partial file with an HTTP Range request; returns the
    digest."""
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        resumed = have and response.status == 206
        length = response.headers.get("Content-Length")
        expected_size = (have if resumed else 0) + int(length) if length else None
        with open(part, "ab" if resumed else "wb") as f:
            for chunk in iter(lambda: response.read(1 << 16), b""):
                f.write(chunk)
    size = part.stat().st_size
    if expected_size is not None and size != expected_size:  # http.client ends a cut body quietly, as if complete
        raise ConnectionError(f"the connection closed after {size:,} of {expected_size:,} bytes of {url}; the "
                              f"next start continues from there")
    digest = sha256_file(part)
    if expected_sha256 and digest != expected_sha256:
        part.unlink()
        raise UsageError(
            f"{url} downloaded with SHA-256 {digest}, expected {expected_sha256}: the file or mirror is corrupt or "
            f"changed. It was deleted; try again or set the mirror variable to a trustworthy copy."
        )
    os.replace(part, dest)
    return digest


def fetch_remote_corpus(spec: RemoteCorpus, cache_dir: str) -> Path:
    """Download every file of a corpus once. Digests not known in advance are recorded and then enforced."""
    folder = Path(cache_dir) / "corpora" / spec.name
    folder.mkdir(parents=True, exist_ok=True)
    sums_path = folder / "SHA256SUMS.json"
    sums = json.loads(sums_path.read_text()) if sums_path.exists() else {}
    sums.update(spec.sha256)
    from tqdm import tqdm

    for name in tqdm(spec.files, desc=f"downloading {spec.name}", unit="file", disable=len(spec.files) < 2):
        dest = folder / name.replace("/", "__")
        if dest.exists():
            if name in sums and sha256_file(dest) != sums[name]:
                raise UsageError(f"cached file {dest} does not match its recorded SHA-256; delete it to download "
                                 f"again.")
            continue
        sums[name] = download(f"{spec.url_base()}/{name}", dest, sums.get(name))
        sums_path.write_text(json.dumps(sums, indent=1, sort_keys=True))
    return folder


def remote_corpus(name: str, cache_dir: str) -> Corpus:
    spec = REMOTE_CORPORA[name]
    try:
        folder = fetch_remote_corpus(spec, cache_dir)
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise CorpusUnavailable(
            f"could not download the {name} corpus from {spec.url_base()} ({reason}). Set {spec.mirror_env} to a "
            f"mirror, put the files in {Path(cache_dir) / 'corpora' / name}, or use --data_path."
        ) from None
    texts = [read_source_file(folder / f.replace("/", "__")) for f in spec.files]
    return Corpus(name, "\n".join(texts), "ROMEO:" if name == "shakespeare" else CHINESE_PROMPTS)


# ---- offline corpora ------------------------------------------------------------------------------------------------
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


def fortunes_zh() -> Corpus:
    """Tang 300 and Song 100 from Debian/Ubuntu's fortunes-zh package: entries separated by '%' lines, ANSI-coloured."""
    files = [Path(FORTUNES_DIR) / name for name in ("tang300", "song100")]
    if not all(f.exists() for f in files):
        raise CorpusUnavailable(f"fortunes-zh is not installed (no {files[0]}); `sudo apt-get install fortunes-zh` "
                                f"adds it.")
    entries = []
    for f in files:
        raw = ANSI_ESCAPE.sub("", decode_bytes(f.read_bytes(), str(f)))
        entries += [e.strip() for e in re.split(r"^%$", raw, flags=re.M) if e.strip()]
    return Corpus("fortunes_zh", "\n\n".join(entries) + "\n", CHINESE_PROMPTS)


def builtin() -> Corpus:
    return Corpus("builtin", BUILTIN_POEMS.read_text(encoding="utf-8"), CHINESE_PROMPTS)


def load_named(name: str, cache_dir: str) -> Corpus:
    if name in REMOTE_CORPORA:
        return remote_corpus(name, cache_dir)
    if name == "fortunes_zh":
        return fortunes_zh()
    if name == "builtin":
        return builtin()
    return chinese_default(cache_dir)


def chinese_default(cache_dir: str) -> Corpus:
    """The full Song ci when reachable (or cached), else the Tang poems embedded in this package (fortunes-zh, five
    times smaller, would be memorised by the demo: it is a --corpus of its own, not a fallback)."""
    try:
        return remote_corpus("song_ci", cache_dir)
    except CorpusUnavailable as e:
        notice(f"note: {e}")
    notice("note: training on the embedded Tang poems (about 2,400 poems, 200,000 characters) instead.")
    return builtin()


def load_corpus(cfg: TrainConfig) -> Corpus:
    if cfg.data_path:
        return read_data_path(cfg.data_path, cfg.text_field)
    return load_named(cfg.corpus or "chinese", cfg.resolved_cache_dir())
