"""Rebuild gpt_trainer/data/poems_builtin.txt, the offline corpus: Tang poems from chinese-poetry (MIT licence; the
poems themselves are over a thousand years old and in the public domain), in simplified characters.

The corpus must be big enough that the demo (about 800 K tokens seen) does not memorise it: about 200,000 characters,
so the demo sees each one about four times and validation loss still falls at its end (BENCHMARKS.md).

    npm pack chinese-poetry@2.0.1                       # the data as one tarball, from the npm registry
    pip install opencc-python-reimplemented==0.1.7      # traditional -> simplified; only this tool needs it
    python tools/build_builtin_poems.py chinese-poetry-2.0.1.tgz

The output depends only on the tarball (checked by its SHA-256): poems of the poets below, notes and unknown
characters removed, shuffled with a fixed seed (so validation, the file's last tenth, mixes every poet), cut at a poem
boundary."""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import sys
import tarfile
from pathlib import Path

TARBALL_SHA256 = "25b549e46919c3a0569db6b68ddc96956b04a484ea4518ad2bbd4f137e307e86"
POETS = ("李白", "杜甫", "王維", "孟浩然", "李商隱", "杜牧", "王昌齡", "岑參", "高適", "劉禹錫", "韋應物", "白居易")
TARGET_CHARS = 200_000
OUT = Path(__file__).resolve().parents[1] / "gpt_trainer" / "data" / "poems_builtin.txt"
NOTE = re.compile(r"（[^）]*）|\([^)]*\)|〖[^〗]*〗|\[[^\]]*\]|\{[^}]*\}|[\s　]")
UNWANTED = re.compile(r"[□A-Za-z0-9（）()〖〗\[\]{}]")  # lost characters, or a note the pattern above could not remove


def tang_poems(tarball: Path):
    with tarfile.open(tarball) as tar:
        names = [m for m in tar.getnames() if re.fullmatch(r"package/dist/quantangshi/poet\.tang\.\d+\.json", m)]
        names.sort(key=lambda n: int(n.split(".")[-2]))
        for name in names:
            yield from json.load(tar.extractfile(name))


def poem_text(record: dict, to_simplified) -> str | None:
    title, body = NOTE.sub("", record["title"]), NOTE.sub("", "".join(record["paragraphs"]))
    if not title or not body or UNWANTED.search(title + body):
        return None
    return to_simplified(f"{title}\n{body}\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tarball", type=Path, help="chinese-poetry-2.0.1.tgz from `npm pack chinese-poetry@2.0.1`")
    args = parser.parse_args(argv)
    digest = hashlib.sha256(args.tarball.read_bytes()).hexdigest()
    if digest != TARBALL_SHA256:
        sys.exit(f"{args.tarball} has SHA-256 {digest}, expected {TARBALL_SHA256} (chinese-poetry 2.0.1).")
    from opencc import OpenCC

    to_simplified = OpenCC("t2s").convert
    poems = [t for t in (poem_text(r, to_simplified) for r in tang_poems(args.tarball) if r["author"] in POETS) if t]
    random.Random(0).shuffle(poems)
    kept, size = [], 0
    for poem in poems:
        if size + len(poem) > TARGET_CHARS:
            break
        kept.append(poem)
        size += len(poem) + 1
    OUT.write_text("\n".join(kept), encoding="utf-8")
    print(f"wrote {OUT}: {len(kept):,} poems, {size:,} characters, {len(set(''.join(kept))):,} distinct")
    return 0


if __name__ == "__main__":
    sys.exit(main())
