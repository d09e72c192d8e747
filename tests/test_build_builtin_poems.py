"""tools/build_builtin_poems.py: which poems it keeps and how it cleans them (from a tarball the test makes)."""

import io
import json
import sys
import tarfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import build_builtin_poems as builder  # noqa: E402


def test_notes_are_removed_and_poems_with_lost_characters_are_left_out(tmp_path):
    records = [{"author": "李白", "title": "靜夜思", "paragraphs": ["床前明月光，疑是地上霜。（一作「看月光」）",
                                                             "舉頭望明月，低頭思故鄉。"]},
               {"author": "李白", "title": "殘篇", "paragraphs": ["□□□香感细风。"]},
               {"author": "杜甫", "title": "春望 [題注]", "paragraphs": ["國破山河在，城春草木深。"]}]
    tarball = tmp_path / "chinese-poetry.tgz"
    with tarfile.open(tarball, "w:gz") as tar:
        raw = json.dumps(records, ensure_ascii=False).encode()
        info = tarfile.TarInfo("package/dist/quantangshi/poet.tang.0.json")
        info.size = len(raw)
        tar.addfile(info, io.BytesIO(raw))
    def to_simplified(text):  # stands in for OpenCC (not installed for the tests): two characters are enough here
        return text.replace("靜", "静").replace("國", "国")

    texts = [builder.poem_text(r, to_simplified) for r in builder.tang_poems(tarball)]
    assert texts == ["静夜思\n床前明月光，疑是地上霜。舉頭望明月，低頭思故鄉。\n", None,
                     "春望\n国破山河在，城春草木深。\n"]
