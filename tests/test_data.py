import json
import os
import shutil

import numpy as np
import pytest
import torch

from gpt_trainer.data import tokens as data_module
from gpt_trainer.data.batches import EpochSampler, TrainBatches, validation_windows
from gpt_trainer.data.corpora import Corpus
from gpt_trainer.data.tokenizer import CharTokenizer
from gpt_trainer.data.tokens import prepare_data
from gpt_trainer.errors import UsageError


def test_tokens_are_cached_on_disk_and_not_recomputed(tiny_cfg, tmp_path, monkeypatch):
    cfg = tiny_cfg(f"--cache_dir={tmp_path / 'cache'}")
    first = prepare_data(cfg)
    assert isinstance(first.train, np.memmap) and first.train.dtype == np.uint16
    assert first.tokenizer.decode(first.train[:8].tolist()) == "春江花月夜\n春江"

    def must_not_run(*args):
        raise AssertionError("tokenized again although the cache holds these tokens")
    monkeypatch.setattr(data_module, "build_token_cache", must_not_run)
    second = prepare_data(cfg)
    assert np.array_equal(second.train, first.train) and np.array_equal(second.val, first.val)
    assert len(first.train) == int(0.9 * (len(first.train) + len(first.val)))


def test_a_different_corpus_gets_its_own_cache(tiny_cfg, tmp_path):
    cfg = tiny_cfg(f"--cache_dir={tmp_path}")
    a = prepare_data(cfg, Corpus("a", "甲乙丙丁" * 50, ""))
    b = prepare_data(cfg, Corpus("b", "子丑寅卯辰" * 50, ""))
    assert a.tokenizer.vocab_size == 4 and b.tokenizer.vocab_size == 5
    assert len(list((tmp_path / "tokens").iterdir())) == 2


def test_sentencepiece_is_announced_only_once_trained_never_before_a_size_error(tiny_cfg, tmp_path, capsys):
    with pytest.raises(UsageError, match="the largest sentencepiece vocabulary it supports is"):
        prepare_data(tiny_cfg(f"--cache_dir={tmp_path}", "--tokenizer=sentencepiece", "--vocab_size=100000"))
    assert "sentencepiece model" not in capsys.readouterr().err and not list(tmp_path.glob("tokens/*"))
    prepare_data(tiny_cfg(f"--cache_dir={tmp_path}", "--tokenizer=sentencepiece", "--vocab_size=2000"))
    assert "trained a 2000-token sentencepiece model on 166 of 166 lines" in capsys.readouterr().err  # the control


def test_corpus_shorter_than_a_block_is_a_usage_error(tiny_cfg, tmp_path):
    with pytest.raises(UsageError, match=r"needs at least block_size \+ 1 = 17"):
        prepare_data(tiny_cfg(f"--cache_dir={tmp_path}"), Corpus("short", "春江花月夜" * 4, ""))


def test_an_epoch_visits_every_window_once_and_resumes_exactly():
    tokens = np.arange(1001)
    sampler = EpochSampler(tokens, block_size=10, seed=3)
    first_epoch = sampler.next_offsets(sampler.windows_per_epoch)
    assert sampler.windows_per_epoch == 100
    assert len(set((first_epoch - first_epoch.min()) // 10)) == 100  # non-overlapping, each once
    sampler.next_offsets(37)
    saved = sampler.state_dict()
    expected = sampler.next_offsets(150)  # crosses into the third epoch
    resumed = EpochSampler(tokens, block_size=10, seed=3)
    resumed.load_state_dict(saved)
    assert np.array_equal(resumed.next_offsets(150), expected)
    assert not np.array_equal(expected[63:163], first_epoch)  # a fresh order each epoch


def batches_of(tokens, rank=0, world_size=1) -> TrainBatches:
    return TrainBatches(tokens, block_size=10, seed=3, windows_per_step=8, rank=rank, world_size=world_size,
                        device=torch.device("cpu"))


def test_prefetched_batches_are_the_sampler_s_and_a_checkpoint_never_counts_the_one_ahead():
    tokens = np.arange(1001)  # 100 windows: the 13th step crosses into the second epoch
    plain, ahead = batches_of(tokens), batches_of(tokens)
    taken = [plain.next() for _ in range(20)]
    for expected in taken[:12]:
        assert torch.equal(ahead.next(), expected)
        ahead.prefetch()  # the next step's batch, drawn while this one trains
    assert ahead.state_dict() == {"epoch": 0, "position": 96} and ahead.epoch == 0  # not the prefetched one
    assert ahead.epochs_done == 0.96
    resumed = batches_of(tokens)
    resumed.load_state_dict(ahead.state_dict())  # a resume draws the prefetched-but-untrained batch again
    ahead.load_state_dict(ahead.state_dict())  # and so does an out-of-memory retreat in the same process
    for expected in taken[12:]:
        assert torch.equal(resumed.next(), expected) and torch.equal(ahead.next(), expected)
        ahead.prefetch()
    assert resumed.epoch == ahead.epoch == 1


def test_each_process_takes_its_share_of_each_step_s_windows():
    tokens = np.arange(1001)
    whole = batches_of(tokens).next()
    shares = [batches_of(tokens, rank, 2).next() for rank in range(2)]
    assert shares[0].shape == (4, 11) and torch.equal(torch.cat(shares), whole)
    assert torch.equal(whole[:, 1:] - whole[:, :-1], torch.ones(8, 10, dtype=torch.int64))  # windows of the tokens


def test_validation_windows_are_fixed_and_in_range():
    tokens = np.arange(200)
    windows = validation_windows(tokens, block_size=16, count=5)
    assert windows.shape == (5, 17)
    assert windows[0, 0] == 0 and windows[-1, -1] == 199
    assert np.array_equal(windows, validation_windows(tokens, 16, 5))


def damage_truncate(folder):
    path = folder / "train.bin"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def damage_scramble(folder):  # same size, in-vocabulary ids: only the digest can tell
    ids = np.fromfile(folder / "train.bin", dtype=np.uint16)
    np.random.default_rng(0).permutation(ids).tofile(folder / "train.bin")


def damage_tokenizer(folder):
    path = folder / "tokenizer.json"
    path.write_bytes(b"\0" * path.stat().st_size)


def damage_meta(folder):
    (folder / "meta.json").unlink()


@pytest.mark.parametrize("damage", [damage_truncate, damage_scramble, damage_tokenizer, damage_meta])
def test_a_damaged_token_cache_is_rebuilt_with_a_notice_never_trained_on(tiny_cfg, tmp_path, monkeypatch, capsys,
                                                                         damage):
    cfg = tiny_cfg(f"--cache_dir={tmp_path / 'cache'}")
    good = prepare_data(cfg)
    expected = (np.array(good.train), np.array(good.val))
    [folder] = (tmp_path / "cache" / "tokens").iterdir()
    damage(folder)
    again = prepare_data(cfg)
    assert "is damaged" in capsys.readouterr().err
    assert np.array_equal(again.train, expected[0]) and np.array_equal(again.val, expected[1])
    assert data_module.cache_problem(folder) is None


class Payload:
    """What an attacker who can write a shared cache would plant: unpickling it calls open(marker, "w")."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.mark.parametrize("tokenizer", ["char", "sentencepiece"])
def test_the_cache_stores_the_tokenizer_as_json_and_a_planted_pickle_is_never_run(tiny_cfg, tmp_path, monkeypatch,
                                                                                  capsys, tokenizer):
    import hashlib
    import pickle

    cfg = tiny_cfg(f"--cache_dir={tmp_path / 'cache'}", f"--tokenizer={tokenizer}", "--vocab_size=1500")
    good = prepare_data(cfg)
    folder, marker = good.folder, tmp_path / "payload-ran"
    assert sorted(p.name for p in folder.iterdir()) == ["meta.json", "tokenizer.json", "train.bin", "val.bin"]
    state = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))  # plain JSON data
    assert state["kind"] == tokenizer and vocabulary(good.tokenizer) == vocabulary(
        data_module.tokenizer_from_json((folder / "tokenizer.json").read_text(encoding="utf-8")))
    planted = pickle.dumps(Payload(marker))
    with open(tmp_path / "control.pkl", "wb") as f:  # the control: pickle.load runs it
        f.write(planted)
    with open(tmp_path / "control.pkl", "rb") as f:
        pickle.load(f)
    assert marker.exists()
    marker.unlink()
    # an older version's cache, complete as it wrote it: meta.json lists tokenizer.pkl with its true digest
    (folder / "tokenizer.json").unlink()
    (folder / "tokenizer.pkl").write_bytes(planted)
    meta = json.loads((folder / "meta.json").read_text())
    meta["files"] = {**{n: meta["files"][n] for n in ("train.bin", "val.bin")},
                     "tokenizer.pkl": {"bytes": len(planted), "sha256": hashlib.sha256(planted).hexdigest()}}
    (folder / "meta.json").write_text(json.dumps(meta))
    capsys.readouterr()
    again = prepare_data(cfg)
    assert not marker.exists()
    assert f"the token cache {folder} is from an older version" in capsys.readouterr().err
    assert again.built and again.folder == folder and not (folder / "tokenizer.pkl").exists()
    assert np.array_equal(again.train, good.train) and vocabulary(again.tokenizer) == vocabulary(good.tokenizer)


def test_an_older_version_s_cache_folder_is_left_alone_so_versions_sharing_a_cache_never_rebuild_each_other_s(
        tiny_cfg, tmp_path):
    import pickle

    cfg = tiny_cfg(f"--cache_dir={tmp_path}")
    folder = prepare_data(cfg).folder
    older = folder.with_name(folder.name.removesuffix(f"-f{data_module.CACHE_FORMAT}"))  # the name it had before
    shutil.copytree(folder, older)
    (older / "tokenizer.json").unlink()
    (older / "tokenizer.pkl").write_bytes(pickle.dumps(Payload(tmp_path / "payload-ran")))
    shutil.rmtree(folder)
    kept = {p.name: p.read_bytes() for p in older.iterdir()}
    assert prepare_data(cfg).built
    assert {p.name: p.read_bytes() for p in older.iterdir()} == kept and not (tmp_path / "payload-ran").exists()


# ---- a corpus that changes while it is prepared ----------------------------------------------------------------------
def change_between_passes(monkeypatch, change):
    """Runs `change` right after preparation's first pass: it stands in for another process writing the corpus
    file at that moment (the write itself is real; only its timing is arranged)."""
    real_scan = data_module.scan

    def scan_then_change(*args, **kwargs):
        found = real_scan(*args, **kwargs)
        change()
        return found
    monkeypatch.setattr(data_module, "scan", scan_then_change)


def assert_nothing_published(cache):
    tokens = cache / "tokens"
    assert not tokens.exists() or list(tokens.iterdir()) == []


def test_a_file_that_changes_between_the_passes_publishes_no_cache(tiny_cfg, tmp_path, monkeypatch):
    from gpt_trainer.errors import RunStopped
    from tests.conftest import CLASSIC_POEMS

    corpus, cache = tmp_path / "poems.txt", tmp_path / "cache"
    corpus.write_text(CLASSIC_POEMS.read_text(encoding="utf-8"), encoding="utf-8")
    line = corpus.read_text(encoding="utf-8").splitlines(keepends=True)[1]  # characters the vocabulary has

    def append_a_known_line():
        with open(corpus, "a", encoding="utf-8") as f:
            f.write(line)
    change_between_passes(monkeypatch, append_a_known_line)
    with pytest.raises(RunStopped, match=rf"^{corpus} changed while it was read \(its size, modification time or "
                                         r"inode differ .*no token cache was written\. Run again once"):
        prepare_data(tiny_cfg(f"--data_path={corpus}", f"--cache_dir={cache}"))
    assert_nothing_published(cache)


def test_ids_outside_the_vocabulary_publish_no_cache_even_when_the_file_looks_unchanged(tiny_cfg, tmp_path,
                                                                                        monkeypatch):
    """Rewritten in place with its size and modification time put back: only the ids can tell (a character the first
    pass never saw would be stored as id 65535 and stop training with an IndexError)."""
    from gpt_trainer.errors import RunStopped
    from tests.conftest import CLASSIC_POEMS

    corpus, cache = tmp_path / "poems.txt", tmp_path / "cache"
    text = CLASSIC_POEMS.read_text(encoding="utf-8")
    corpus.write_text(text, encoding="utf-8")
    assert "龘" not in text

    def rewrite_in_place():
        before = corpus.stat()
        with open(corpus, "r+b") as f:  # the same inode, the same size: one character swapped for a new one
            f.write("龘".encode("utf-8") + text.encode("utf-8")[3:6])
        os.utime(corpus, ns=(before.st_atime_ns, before.st_mtime_ns))
    change_between_passes(monkeypatch, rewrite_in_place)
    with pytest.raises(RunStopped, match=r"the corpus poems\.txt changed while it was read \(its second reading holds "
                                         r"characters the first did not\).*no token cache was written"):
        prepare_data(tiny_cfg(f"--data_path={corpus}", f"--cache_dir={cache}"))
    assert_nothing_published(cache)
    monkeypatch.undo()
    assert prepare_data(tiny_cfg(f"--data_path={corpus}", f"--cache_dir={cache}")).built  # stable now: prepared


# ---- streaming preparation: the ids the whole-text algorithm gave, whatever the pieces and the workers ---------------
def mixed_folder(root):
    """A --data_path folder of every format: the classic poems (.txt), chinese-poetry .json, .jsonl and GBK text."""
    import json

    from tests.conftest import CLASSIC_POEMS

    folder = root / "mixed"
    folder.mkdir()
    (folder / "a_classic.txt").write_text(CLASSIC_POEMS.read_text(encoding="utf-8"), encoding="utf-8")
    poems = [{"title": "静夜思", "paragraphs": ["床前明月光，疑是地上霜。", "举头望明月，低头思故乡。"]},
             {"rhythmic": "虞美人", "paragraphs": ["春花秋月何时了？往事知多少。"]}] * 10
    (folder / "b_ci.song.0.json").write_text(json.dumps(poems, ensure_ascii=False), encoding="utf-8")
    (folder / "c_records.jsonl").write_text("\n".join(json.dumps({"text": f"鹅鹅鹅，曲项向天歌。{i}\n白毛浮绿水"},
                                                                 ensure_ascii=False) for i in range(30)) + "\n",
                                            encoding="utf-8")
    (folder / "d_gbk.txt").write_bytes(("春眠不觉晓，处处闻啼鸟。\r\n夜来风雨声，花落知多少。\r\n" * 20).encode("gbk"))
    return folder


def vocabulary(tokenizer) -> list:
    """The pieces (and sentencepiece's scores) in id order: the model proto also records where it was trained."""
    if tokenizer.kind == "char":
        return tokenizer.chars
    return [(tokenizer.sp.id_to_piece(i), tokenizer.sp.get_score(i)) for i in range(tokenizer.vocab_size)]


@pytest.mark.parametrize("chunk", [None, 512])  # None: the default piece size, 512: many pieces (no line is cut)
@pytest.mark.parametrize("source", ["classic", "mixed"])
@pytest.mark.parametrize("tokenizer", ["char", "sentencepiece"])
def test_prepared_ids_equal_those_of_the_whole_text_algorithm(tiny_cfg, tmp_path, monkeypatch, source, tokenizer,
                                                              chunk):
    from gpt_trainer.data import corpora
    from gpt_trainer.data.corpora import read_data_path
    from gpt_trainer.data.tokenizer import CharTokenizer, SentencePieceTokenizer
    from tests.conftest import CLASSIC_POEMS

    if chunk:
        monkeypatch.setattr(corpora, "CHUNK_BYTES", chunk)
    path = CLASSIC_POEMS if source == "classic" else mixed_folder(tmp_path)
    cfg = tiny_cfg(f"--data_path={path}", f"--cache_dir={tmp_path / 'cache'}", f"--tokenizer={tokenizer}",
                   "--vocab_size=1500")
    data = prepare_data(cfg)
    text = read_data_path(str(path)).text
    assert "白毛浮绿水" in text and "花落知多少" in text if source == "mixed" else "春江花月夜" in text
    whole = CharTokenizer.train(text) if tokenizer == "char" else SentencePieceTokenizer.train(text, 1500)
    expected = np.array(whole.encode(text))
    assert data.tokenizer.vocab_size == whole.vocab_size and vocabulary(data.tokenizer) == vocabulary(whole)
    assert np.array_equal(np.concatenate([data.train, data.val]), expected)
    assert len(data.train) == int(len(expected) * cfg.train_split)


@pytest.mark.parametrize("tokenizer", ["char", "sentencepiece"])
def test_the_number_of_workers_does_not_change_a_byte_of_the_cache(tiny_cfg, tmp_path, monkeypatch, tokenizer):
    from gpt_trainer.data import corpora
    from tests.conftest import CLASSIC_POEMS

    big = tmp_path / "big.txt"
    big.write_text(CLASSIC_POEMS.read_text(encoding="utf-8") * 20, encoding="utf-8")
    monkeypatch.setattr(corpora, "CHUNK_BYTES", 16 << 10)
    assert len(list(corpora.read_data_path(str(big)).pieces())) > 10
    folders = []
    for workers in (1, 3):
        cfg = tiny_cfg(f"--data_path={big}", f"--cache_dir={tmp_path / f'cache{workers}'}", f"--tokenizer={tokenizer}",
                       "--vocab_size=1500", f"--prepare_workers={workers}")
        data = prepare_data(cfg)
        assert data.built
        folders.append(data.folder)
    assert folders[0].name == folders[1].name
    for name in ("train.bin", "val.bin", "tokenizer.json"):
        assert (folders[0] / name).read_bytes() == (folders[1] / name).read_bytes(), name


def test_a_complete_cache_is_used_without_reading_the_corpus_and_a_changed_file_makes_a_new_one(tiny_cfg, tmp_path,
                                                                                                monkeypatch):
    from gpt_trainer.data import corpora
    from tests.conftest import CLASSIC_POEMS

    corpus = tmp_path / "poems.txt"
    corpus.write_text(CLASSIC_POEMS.read_text(encoding="utf-8"), encoding="utf-8")
    cfg = tiny_cfg(f"--data_path={corpus}", f"--cache_dir={tmp_path / 'cache'}")
    first = prepare_data(cfg)
    assert first.built

    def must_not_read(*args, **kwargs):
        raise AssertionError("read the corpus although its cache is complete")
    with monkeypatch.context() as patched:
        patched.setattr(corpora, "file_pieces", must_not_read)
        again = prepare_data(cfg)
    assert not again.built and again.folder == first.folder
    assert np.array_equal(again.train, first.train) and np.array_equal(again.val, first.val)
    with open(corpus, "a", encoding="utf-8") as f:
        f.write("新添一行，缓存随之而变。\n")
    changed = prepare_data(cfg)
    assert changed.built and changed.folder != first.folder and changed.folder.parent == first.folder.parent
    added = len("新添一行，缓存随之而变。\n")
    assert len(changed.train) + len(changed.val) == len(first.train) + len(first.val) + added


def test_text_parsed_out_of_json_keeps_its_own_line_breaks_through_both_passes(tiny_cfg, tmp_path):
    """A CR inside a JSON string is text, not a line break: the first pass keeps the parsed text for the second,
    which must encode exactly it (a re-read that made CR into LF would change the ids)."""
    folder = tmp_path / "data"
    folder.mkdir()
    records = [{"text": f"第{i}行\r有回车\u2028与分隔符，\ufeff开头" * 3} for i in range(60)]
    (folder / "a.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    cfg = tiny_cfg(f"--data_path={folder}", f"--cache_dir={tmp_path / 'cache'}", "--block_size=8")
    data = prepare_data(cfg)
    text = "\n".join(r["text"] + "\n" for r in records)
    ids = np.concatenate([np.asarray(data.train), np.asarray(data.val)])
    assert ids.tolist() == CharTokenizer.train(text).encode(text)
