import numpy as np
import pytest

from gpt_trainer import data as data_module
from gpt_trainer.errors import UsageError
from gpt_trainer.corpora import Corpus
from gpt_trainer.data import EpochSampler, prepare_data, validation_windows


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
    assert "trained a 2000-token sentencepiece model on 4,919 characters" in capsys.readouterr().err  # the control


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


def damage_pickle(folder):
    path = folder / "tokenizer.pkl"
    path.write_bytes(b"\0" * path.stat().st_size)


def damage_meta(folder):
    (folder / "meta.json").unlink()


@pytest.mark.parametrize("damage", [damage_truncate, damage_scramble, damage_pickle, damage_meta])
def test_a_damaged_token_cache_is_rebuilt_with_a_notice_never_trained_on(tiny_cfg, tmp_path, monkeypatch, capsys,
                                                                         damage):
    cfg = tiny_cfg(f"--cache_dir={tmp_path / 'cache'}")
    good = prepare_data(cfg)
    expected = (np.array(good.train), np.array(good.val))
    [folder] = (tmp_path / "cache" / "tokens").iterdir()
    damage(folder)
    monkeypatch.setattr(data_module, "_verified", set())  # a new process: digests are checked at the first load
    again = prepare_data(cfg)
    assert "is damaged" in capsys.readouterr().err
    assert np.array_equal(again.train, expected[0]) and np.array_equal(again.val, expected[1])
    assert data_module.cache_damage(folder) is None
