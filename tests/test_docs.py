"""The documentation: README.md and README.zh-CN.md are short landing pages, docs/ and docs/zh-CN/ hold the same pages
in both languages (same file names, same heading structure, same commands), every relative link resolves, the flag
tables are the parser's, and every training command shown parses. Fast: no network, no training."""

import re
import shlex
import sys
from pathlib import Path

import pytest

from gpt_trainer.config import parse_args
from gpt_trainer.errors import UsageError

ROOT = Path(__file__).resolve().parents[1]
LANDING_PAGES = ("README.md", "README.zh-CN.md")
MAX_LANDING_BYTES = 15 * 1024  # issue 19: the landing page stays at most 15 KB
TOPICS = {"training.md", "data.md", "tracking.md", "sweeps.md", "distributed.md", "docker.md", "troubleshooting.md",
          "flags.md", "benchmarks.md", "development.md", "clusters.md", "huggingface.md", "memory.md", "gguf.md"}

FENCE = re.compile(r"^```([\w-]*)[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)
COMMAND_LANGUAGES = ("bash", "sh", "shell", "console")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def read(name: str) -> str:
    return (ROOT / name).read_text(encoding="utf-8")


def english_pages() -> list[str]:
    return sorted(p.name for p in (ROOT / "docs").glob("*.md"))


def page_pairs() -> list[tuple[str, str]]:
    """(English, Chinese) for the landing page and every docs/ page."""
    return [LANDING_PAGES] + [(f"docs/{name}", f"docs/zh-CN/{name}") for name in english_pages()]


def code_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced code block."""
    return FENCE.findall(text)


def without_code(text: str) -> str:
    """The text with fenced blocks and inline code removed (a `# comment` in a block is not a heading)."""
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))


def headings(text: str) -> list[tuple[int, str]]:
    return [(len(hashes), title.strip()) for hashes, title in re.findall(r"^(#{1,6}) (.+)$", FENCE.sub("", text), re.M)]


def heading_levels(text: str) -> list[int]:
    return [level for level, _ in headings(text)]


def commands(text: str) -> list[str]:
    """The command lines of the shell blocks, comments dropped and spaces normalised (comments may be translated)."""
    lines = []
    for language, body in code_blocks(text):
        if language in COMMAND_LANGUAGES:
            for line in body.splitlines():
                command = " ".join(re.sub(r"(^|\s)#.*$", "", line).split())
                if command:
                    lines.append(command)
    return lines


def printed(text: str) -> list[str]:
    """The lines of the bare ``` blocks: what a command prints (identical in both languages)."""
    return [line for language, body in code_blocks(text) if not language for line in body.splitlines()]


def slug(title: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation (ASCII and full-width) dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    seen: dict[str, int] = {}
    result = set()
    for _, title in headings(text):
        base = slug(title)
        result.add(base if base not in seen else f"{base}-{seen[base]}")
        seen[base] = seen.get(base, 0) + 1
    return result


def broken_links(path: Path, text: str) -> list[str]:
    """The relative links in `text` (a file at `path`) whose file, or heading anchor, does not exist."""
    broken = []
    for target in LINK.findall(without_code(text)):
        if re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*:", target):  # https:, mailto: ...: not ours to check
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file) if file else path
        if not dest.exists():
            broken.append(target)
        elif anchor and dest.suffix == ".md":
            dest_text = text if dest == path else dest.read_text(encoding="utf-8")
            if anchor not in anchors(dest_text):
                broken.append(target)
    return broken


def training_commands(text: str) -> list[list[str]]:
    """The flags of every `train_single_gpu.py` command in a page's bash blocks (continuation lines joined)."""
    blocks = [body for language, body in code_blocks(text) if language == "bash"]
    lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
    found = [line.split("train_single_gpu.py", 1)[1].split(" #")[0] for line in lines if "train_single_gpu.py" in line]
    return [shlex.split(c) for c in found if "..." not in c and "$" not in c]  # `...` and `$F`: placeholders


@pytest.mark.parametrize("name", LANDING_PAGES)
def test_the_landing_pages_are_at_most_15_kb(name):
    size = len((ROOT / name).read_bytes())
    assert size <= MAX_LANDING_BYTES, f"{name} is {size} bytes; move text to docs/"


def test_both_languages_have_the_same_pages():
    chinese = sorted(p.name for p in (ROOT / "docs" / "zh-CN").glob("*.md"))
    assert english_pages() == chinese
    assert TOPICS <= set(english_pages())


def test_the_landing_pages_map_every_page_and_name_the_test_command():
    for landing, folder in (("README.md", "docs"), ("README.zh-CN.md", "docs/zh-CN")):
        targets = {target.partition("#")[0] for target in LINK.findall(without_code(read(landing)))}
        assert {f"{folder}/{name}" for name in english_pages()} <= targets, landing
        assert "./dev.sh test" in commands(read(landing))  # CI's .ci/run calls it; the README must name it


def test_the_helpers_see_headings_commands_and_output_as_meant():
    text = ("# Title\n\n```bash\n# a comment, not a heading\nls -l    # list\n```\n\n"
            "```\ndone: 1 step\n```\n## `--x` (y)\n")
    assert headings(text) == [(1, "Title"), (2, "`--x` (y)")]
    assert commands(text) == ["ls -l"] and printed(text) == ["done: 1 step"]
    assert slug("SwanLab（国内推荐）") == "swanlab国内推荐" and slug("Speed: compile, TF32") == "speed-compile-tf32"


@pytest.mark.parametrize("english, chinese", page_pairs())
def test_each_page_has_the_same_headings_commands_and_output_in_both_languages(english, chinese):
    en, zh = read(english), read(chinese)
    assert heading_levels(en), f"{english} has no headings"
    assert heading_levels(en) == heading_levels(zh), f"{english} and {chinese} differ in their headings"
    assert commands(en) == commands(zh), f"{english} and {chinese} differ in their commands"
    assert printed(en) == printed(zh), f"{english} and {chinese} differ in what the commands print"
    drifted = zh.replace("\n## ", "\n### ", 1) if "\n## " in zh else zh + "\n## extra\n"  # the control: caught
    assert heading_levels(en) != heading_levels(drifted)


def all_pages() -> list[Path]:
    return sorted(ROOT.glob("README*.md")) + sorted((ROOT / "docs").rglob("*.md"))


def test_every_relative_link_points_to_a_file_and_heading_that_exist():
    pages = all_pages()
    assert len(pages) >= 2 + 2 * len(TOPICS)
    for path in pages:
        assert broken_links(path, path.read_text(encoding="utf-8")) == [], path.relative_to(ROOT)
    planted = ("[ok](docs/training.md) [gone](docs/no_such_page.md) [anchor](docs/training.md#no-such-heading) "
               "[web](https://example.com/x.md) `[code](not/checked.md)`")  # the control: both bad links caught
    assert broken_links(ROOT / "README.md", planted) == ["docs/no_such_page.md", "docs/training.md#no-such-heading"]


def test_the_flag_tables_are_the_parser_s():
    sys.path.insert(0, str(ROOT / "tools"))
    import readme_flags

    assert set(readme_flags.PAGES) == {"docs/flags.md", "docs/zh-CN/flags.md"}
    for name in readme_flags.PAGES:
        text = read(name)
        assert readme_flags.with_current_table(text) == text, f"{name} drifted: run ./dev.sh flags"
        drifted = text.replace("| `--dropout` | `0.1` |", "| `--dropout` | `0.2` |")  # a hand edit: caught
        assert drifted != text and readme_flags.with_current_table(drifted) == text
    assert readme_flags.main(["--check"]) == 0


def test_every_training_command_in_the_readmes_and_docs_parses_and_both_languages_show_the_same():
    shown = []
    for english, chinese in page_pairs():
        en, zh = training_commands(read(english)), training_commands(read(chinese))
        assert en == zh, f"{english} and {chinese} show different training commands"
        shown += en
    assert len(training_commands(read("README.md"))) >= 5 and len(shown) >= 8
    for argv in shown:
        parse_args(argv)  # a misspelt or removed flag raises a UsageError naming it
    with pytest.raises(UsageError, match="--epoch"):  # the control: a typo of the kind this catches
        parse_args([*shown[0], "--epoch=5"])


def test_every_dev_sh_command_the_docs_show_exists():
    subcommands = set(re.findall(r"^  ([a-z-]+)\)$", read("dev.sh"), re.M))
    named = re.compile(r"\./dev\.sh ([a-z][a-z-]*)")
    for path in all_pages():
        missing = set(named.findall(path.read_text(encoding="utf-8"))) - subcommands
        assert not missing, f"{path.relative_to(ROOT)} shows ./dev.sh {missing}, which dev.sh does not have"
    assert {"demo", "setup", "test", "tensorboard", "torch-build"} <= subcommands
    assert set(named.findall("run ./dev.sh tensorbord")) - subcommands == {"tensorbord"}  # the control: caught


def extra_names(extra: str) -> list[str]:
    """The distributions a `pip install -e .` (extra "") or `.[extra]` adds, by name; our own extras expanded."""
    import tomllib

    project = tomllib.loads(read("pyproject.toml"))["project"]
    wanted = project["dependencies"] if not extra else project["optional-dependencies"][extra]
    names = []
    for requirement in wanted:
        name = re.match(r"[A-Za-z0-9._-]+", requirement)[0]
        inner = re.fullmatch(r"gpt-trainer\[(\w+)\]", requirement)
        names += extra_names(inner[1]) if inner else [name]
    return names


@pytest.mark.parametrize("name", LANDING_PAGES)
@pytest.mark.parametrize("extra", ["", "hf", "dev"])
def test_the_install_comments_name_what_each_install_brings(name, extra):
    target = "." if not extra else f'".[{extra}]"'
    lines = [line for language, body in code_blocks(read(name)) if language == "bash" for line in body.splitlines()
             if line.startswith(f"pip install -e {target} ")]
    assert len(lines) == 1, f"{name} has no `pip install -e {target}` line"
    comment = lines[0].split("#", 1)[1]
    missing = [dist for dist in extra_names(extra) if dist not in comment]
    assert not missing, f"{name}: the comment on `pip install -e {target}` does not name {missing} (pyproject.toml)"
