"""Where training text comes from: the user's files, or a named corpus (downloaded once into the cache, verified
by checksum, resumable; or installed locally by Debian's fortunes-zh; or embedded in this package: Tang poems made by
tools/build_builtin_poems.py, licence in poems_builtin_LICENSE.txt)."""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from .config import CHINESE_PROMPTS, TrainConfig
from .errors import UsageError, notice
from .rundir import MARKER

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


@dataclass
class Corpus:
    name: str
    text: str
    default_prompts: str


class CorpusUnavailable(UsageError):
    """A named corpus cannot be had here (no network, package not installed): the Chinese default falls back."""


# ---- reading the user's files ---------------------------------------------------------------------------------------
WIDE_BOMS = ((codecs.BOM_UTF32_LE, "utf-32-le"), (codecs.BOM_UTF32_BE, "utf-32-be"),
             (codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be"))


def wide_encoding(raw: bytes) -> tuple[str, int] | None:
    """(codec, BOM length) for UTF-16/32 text, with a BOM or without one (then told by where its zero bytes fall:
    line breaks and punctuation put them at every other byte, or at two bytes of every four)."""
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
    even, odd = head[0::2].count(0), head[1::2].count(0)
    if len(raw) % 2 == 0 and odd > 4 * even:
        return "utf-16-le", 0
    if len(raw) % 2 == 0 and even > 4 * odd:
        return "utf-16-be", 0
    return None


def decode_bytes(raw: bytes, path: str) -> str:
    """UTF-8 (BOM stripped); UTF-16/32 (with or without a BOM) with a notice; else GB18030 (a superset of
    GBK/GB2312, common for Chinese text) with a notice. Text with NUL characters is refused."""
    wide = wide_encoding(raw)
    if wide:
        codec, bom = wide
        try:
            text = raw[bom:].decode(codec)
        except UnicodeDecodeError as e:
            raise UsageError(f"{path} looks like {codec.upper()} text but does not decode as it (offset {e.start}). "
                             f"Convert it to UTF-8, e.g. `iconv -f {codec.upper()} -t UTF-8 {path} > fixed.txt`."
                             ) from None
        notice(f"note: {path} is {codec.upper()} text; decoded it as such.")
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
            notice(f"note: {path} is not UTF-8; decoded it as GB18030/GBK.")
    if "\0" in text:
        raise UsageError(f"{path} contains NUL characters (at character {text.index(chr(0)):,}), so it is not plain "
                         f"text: a binary file, or text in an encoding that was not recognised. Convert it to UTF-8.")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def poem_to_text(item: dict) -> str | None:
    """A chinese-poetry record (`paragraphs` list, with `title` or `rhythmic`) or a {"text": ...} record."""
    if isinstance(item.get("paragraphs"), list):
        heading = item.get("rhythmic") or item.get("title") or ""
        body = "".join(str(p) for p in item["paragraphs"])
        return f"{heading}\n{body}\n" if heading else f"{body}\n"
    if isinstance(item.get("text"), str):
        return item["text"].rstrip("\n") + "\n"
    return None


def json_records_to_text(records, path: str) -> str:
    if isinstance(records, dict):
        records = [records]
    if not isinstance(records, list):
        raise UsageError(f"{path}: expected a JSON list of records with `paragraphs` or `text`, found "
                         f"{type(records).__name__}.")
    texts = [t for t in (poem_to_text(r) for r in records if isinstance(r, dict)) if t]
    if records and not texts:
        raise UsageError(
            f"{path}: none of its {len(records)} JSON records has a `paragraphs` list or a `text` string, "
            f"so there is nothing to train on. Use the chinese-poetry layout or {{\"text\": ...}} records."
        )
    return "\n".join(texts)


def read_source_file(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UsageError(f"{path} cannot be read ({e.strerror}). Fix its permissions, or move it out of the "
                         f"--data_path folder.") from None
    text = decode_bytes(raw, str(path))
    if path.suffix == ".json":
        try:
            return json_records_to_text(json.loads(text), str(path))
        except json.JSONDecodeError as e:
            raise UsageError(f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}).") from None
    if path.suffix == ".jsonl":
        records = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise UsageError(f"{path}, line {lineno}: not valid JSON ({e.msg}).") from None
        return json_records_to_text(records, str(path))
    return text


def read_data_path(data_path: str) -> Corpus:
    path = Path(data_path).expanduser()
    if not path.exists():
        raise UsageError(f"--data_path {data_path} does not exist. Give a text file or a folder of "
                         f".txt/.json/.jsonl files.")
    if path.is_dir():
        run_folders = {marker.parent for marker in path.rglob(MARKER)}  # what a run wrote is not corpus
        for folder in sorted(run_folders):
            notice(f"note: {folder} is a training run's folder inside --data_path; its files are not read as text.")
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".json", ".jsonl") and p.is_file()
                       and not run_folders & set(p.parents))
        if not files:
            raise UsageError(f"--data_path {data_path} is a folder with no .txt, .json or .jsonl files in it.")
        text = "\n".join(read_source_file(p) for p in files)
    else:
        text = read_source_file(path)
    if not text.strip():
        raise UsageError(f"--data_path {data_path} holds no text (it is empty or only whitespace). Point it at your "
                         f"corpus.")
    return Corpus(path.name, text, default_prompts_for(text))


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
        return read_data_path(cfg.data_path)
    return load_named(cfg.corpus or "chinese", cfg.resolved_cache_dir())
