"""`python -m gpt_trainer.prepare`: the token cache a training run will find, prepared ahead of it, once, safely."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpt_trainer.commands.prepare import main
from tests.conftest import CLASSIC_POEMS

REPO_ROOT = Path(__file__).resolve().parent.parent
# the realistic corpus: a Song ci text shared beside the checkout, or the file GPT_TRAINER_SONG_CI names
SHARED_SONG_CI = Path("..") / "shared" / "data" / "song_ci.txt"


def song_ci() -> tuple[Path | None, str]:
    """The Song ci text, or None and the skip's reason: where it was looked for (said relative to the checkout, which
    the shared copy lies beside, never inside) and how to give one."""
    given = os.environ.get("GPT_TRAINER_SONG_CI")
    path = Path(given) if given else REPO_ROOT / SHARED_SONG_CI
    if path.is_file():
        return path, ""
    where = f"GPT_TRAINER_SONG_CI={given} is not a file" if given else \
        f"no shared Song ci text at {SHARED_SONG_CI}, beside the checkout"
    return None, f"{where}; set GPT_TRAINER_SONG_CI to a song_ci.txt to run this case"


def complete_caches(cache: Path) -> list:
    tokens = cache / "tokens"
    return sorted(p for p in tokens.iterdir() if not p.name.startswith(".")) if tokens.exists() else []


def staging_folders(cache: Path) -> list:
    return sorted((cache / "tokens").glob(".staging-*"))


def test_prepare_reports_the_tokens_and_the_cache_then_finds_it_complete(tmp_path, capsys):
    cache = tmp_path / "cache"
    argv = [f"--data_path={CLASSIC_POEMS}", f"--cache_dir={cache}", "--tokenizer=char", "--train_split=0.8"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    [folder] = complete_caches(cache)
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["train_tokens"] > 0 and meta["val_tokens"] > 0
    assert (f"classic_poems.txt: {meta['train_tokens']:,} train + {meta['val_tokens']:,} validation tokens, "
            f"vocabulary {meta['vocab_size']:,} (char), prepared in ") in out
    assert out.rstrip().endswith(f": {folder}")
    assert main(argv) == 0
    again = capsys.readouterr().out
    assert f"(char), found complete in the cache: {folder}" in again and "prepared in" not in again
    assert complete_caches(cache) == [folder]


def test_prepare_refuses_a_training_flag_and_writes_nothing(tmp_path, capsys):
    cache = tmp_path / "cache"
    assert main([f"--data_path={CLASSIC_POEMS}", f"--cache_dir={cache}", "--max_steps", "3"]) == 2
    err = capsys.readouterr().err
    assert "--max_steps" in err and "Traceback" not in err
    assert not cache.exists()


def test_a_malformed_json_line_exits_2_naming_the_file_and_line_and_leaves_no_cache(tmp_path, capsys):
    corpus, cache = tmp_path / "records.jsonl", tmp_path / "cache"
    lines = [json.dumps({"text": "床前明月光，疑是地上霜。" * 3}, ensure_ascii=False)] * 40
    lines[36] = '{"text": "举头望明月'
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert main([f"--data_path={corpus}", f"--cache_dir={cache}"]) == 2
    err = capsys.readouterr().err
    assert f"error: {corpus}, line 37: not valid JSON" in err and "Traceback" not in err
    assert complete_caches(cache) == [] and staging_folders(cache) == []


def test_a_corpus_too_short_for_training_s_default_block_is_prepared_with_advice_for_training(tmp_path, capsys):
    """prepare takes no --block_size: it publishes the cache and says what training needs, naming train's flag and
    the largest value that fits (which training then accepts, and one more it refuses)."""
    from gpt_trainer.config import parse_args
    from gpt_trainer.data.tokens import prepare_data
    from gpt_trainer.errors import UsageError

    corpus, cache = tmp_path / "short.txt", tmp_path / "cache"
    corpus.write_text("春江花月夜" * 40, encoding="utf-8")  # 200 tokens: 180 train, 20 validation
    assert main([f"--data_path={corpus}", f"--cache_dir={cache}"]) == 0
    captured = capsys.readouterr()
    assert "180 train + 20 validation tokens" in captured.out and len(complete_caches(cache)) == 1
    assert ("note: training needs at least block_size + 1 tokens in each split, and the shorter split here has 20: "
            "too few for train_single_gpu.py's default --block_size 256. To train on it, train with --block_size 19 "
            "or less, or use more text or another --train_split (then prepare again).") in captured.err
    flags = [f"--data_path={corpus}", f"--cache_dir={cache}"]
    assert not prepare_data(parse_args([*flags, "--block_size=19"])).built  # the advice holds, on this very cache
    with pytest.raises(UsageError, match=r"needs at least block_size \+ 1 = 21"):
        prepare_data(parse_args([*flags, "--block_size=20"]))


def test_prepare_with_a_cache_dir_that_is_a_file_exits_2_with_a_sentence_and_writes_nothing(tmp_path, capsys):
    cache = tmp_path / "cache.txt"
    cache.write_text("my notes\n")
    assert main([f"--data_path={CLASSIC_POEMS}", f"--cache_dir={cache}"]) == 2
    err = capsys.readouterr().err
    assert err == f"error: --cache_dir {cache} is a file, not a folder. Choose another --cache_dir.\n"
    assert cache.read_text() == "my notes\n" and sorted(p.name for p in tmp_path.iterdir()) == ["cache.txt"]


def test_each_note_about_a_file_is_said_once_per_preparation(tmp_path, capsys):
    """Preparation reads a text corpus twice (the vocabulary, then the ids): its notes come once."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "a_poems.txt").write_bytes(CLASSIC_POEMS.read_bytes())
    (data / "cut.txt").write_bytes("春江花月夜\n海上明月".encode("utf-8")[:-1])
    (data / "wide.txt").write_bytes("静夜思\n床前明月光\n".encode("utf-16-le"))
    assert main([f"--data_path={data}", f"--cache_dir={tmp_path / 'cache'}"]) == 0
    err = capsys.readouterr().err
    assert err.count("ends in the middle of a character") == 1 and err.count("is UTF-16-LE text") == 1, err


def test_ctrl_c_during_prepare_says_to_run_it_again_not_to_resume_and_leaves_no_staging(tmp_path, monkeypatch, capsys):
    """A real SIGINT to this process, sent between the two passes (a hook on the first pass times it)."""
    from gpt_trainer.data import tokens as data

    real_scan = data.scan

    def scan_then_ctrl_c(*args, **kwargs):
        found = real_scan(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGINT)
        return found
    monkeypatch.setattr(data, "scan", scan_then_ctrl_c)
    cache = tmp_path / "cache"
    assert main([f"--data_path={CLASSIC_POEMS}", f"--cache_dir={cache}"]) == 130
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == "error: stopped by Ctrl-C. To finish the job, run the same command again."
    assert "--resume" not in err and "checkpoint" not in err
    assert complete_caches(cache) == [] and staging_folders(cache) == []


# ---- as separate processes ------------------------------------------------------------------------------------------
def prepare_cmd(corpus: Path, cache: Path, *extra: str) -> list:
    return [sys.executable, "-m", "gpt_trainer.prepare", f"--data_path={corpus}", f"--cache_dir={cache}", *extra]


def worktree_env() -> dict:
    """This checkout's code, whatever is installed in the environment."""
    paths = [str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "PYTHONUNBUFFERED": "1"}


def big_corpus(tmp_path: Path, source: str) -> tuple[Path, str]:
    """About 20 MB of text (the shared Song ci, or the classic poems, repeated) and a vocabulary size that fits it:
    sentencepiece, whose encoding in the workers takes seconds, so there is time to kill a preparation in it."""
    if source == "song_ci":
        path, missing = song_ci()
        if path is None:
            pytest.skip(missing)
        raw, vocab = path.read_bytes(), "6500"
    else:
        raw, vocab = CLASSIC_POEMS.read_bytes(), "1500"
    corpus = tmp_path / f"{source}_big.txt"
    corpus.write_bytes(raw * max(1, 20_000_000 // len(raw)))
    return corpus, vocab


def test_the_song_ci_skip_says_where_it_looked_and_how_to_give_the_text(tmp_path, monkeypatch):
    monkeypatch.setenv("GPT_TRAINER_SONG_CI", str(tmp_path / "absent.txt"))
    assert song_ci() == (None, f"GPT_TRAINER_SONG_CI={tmp_path / 'absent.txt'} is not a file; set GPT_TRAINER_SONG_CI "
                               "to a song_ci.txt to run this case")
    (tmp_path / "absent.txt").write_text("词\n")
    assert song_ci() == (tmp_path / "absent.txt", "")
    monkeypatch.delenv("GPT_TRAINER_SONG_CI")
    monkeypatch.setattr(sys.modules[__name__], "REPO_ROOT", tmp_path / "checkout")  # nothing beside this one
    path, reason = song_ci()
    assert path is None and reason.startswith("no shared Song ci text at ../shared/data/song_ci.txt, beside the ")
    assert "in this checkout" not in reason and str(tmp_path) not in reason


def run_prepare(corpus: Path, cache: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(prepare_cmd(corpus, cache, *extra), env=worktree_env(), capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("source", ["classic", "song_ci"])
def test_a_preparation_killed_mid_way_leaves_no_cache_and_the_next_run_prepares_it_whole(tmp_path, source):
    corpus, vocab = big_corpus(tmp_path, source)
    cache, flags = tmp_path / "cache", ("--tokenizer=sentencepiece", f"--vocab_size={vocab}", "--prepare_workers=2")
    proc = subprocess.Popen(prepare_cmd(corpus, cache, *flags), env=worktree_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 240
    while proc.poll() is None and time.time() < deadline:  # killed once it is writing tokens into its staging folder
        if any((s / "train.bin").exists() and (s / "train.bin").stat().st_size for s in staging_folders(cache)):
            break
        time.sleep(0.01)
    assert proc.poll() is None, f"the preparation ended before it could be killed: {proc.communicate()}"
    os.killpg(proc.pid, signal.SIGKILL)  # the command and its encoding workers, as the OOM killer or a node loss would
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    for _ in range(100):  # the workers are gone too
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        pytest.fail("a worker of the killed preparation is still running")
    assert complete_caches(cache) == [] and len(staging_folders(cache)) == 1

    second = run_prepare(corpus, cache, *flags)
    assert second.returncode == 0, second.stderr
    assert "prepared in" in second.stdout
    [folder] = complete_caches(cache)
    assert staging_folders(cache) == []
    clean = run_prepare(corpus, tmp_path / "clean", *flags)
    assert clean.returncode == 0, clean.stderr
    [clean_folder] = complete_caches(tmp_path / "clean")
    assert clean_folder.name == folder.name
    for name in ("train.bin", "val.bin"):
        assert (folder / name).read_bytes() == (clean_folder / name).read_bytes(), name


@pytest.mark.slow
def test_two_processes_on_one_node_prepare_the_cache_once(tmp_path):
    corpus, cache = tmp_path / "poems.txt", tmp_path / "cache"
    corpus.write_bytes(CLASSIC_POEMS.read_bytes() * 700)  # 10 MB: a few seconds of sentencepiece encoding
    flags = ("--tokenizer=sentencepiece", "--vocab_size=1500", "--prepare_workers=1")
    procs = [subprocess.Popen(prepare_cmd(corpus, cache, *flags), env=worktree_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(proc.communicate(timeout=300), proc.returncode) for proc in procs]
    assert [code for _, code in results] == [0, 0], results
    outs = sorted(out for (out, _), _ in results)
    assert ["found complete in the cache" in out for out in outs] == [True, False], outs
    assert "prepared in" in outs[1] and "prepared in" not in outs[0]
    [folder] = complete_caches(cache)
    assert all(out.rstrip().endswith(f": {folder}") for out in outs)
    errs = "".join(err for (_, err), _ in results)
    assert errs.count("trained a 1500-token sentencepiece model") == 1  # the second one waited, then trained nothing
