import re

import pytest

from gpt_trainer.data.tokenizer import CharTokenizer, SentencePieceTokenizer, tokenizer_from_dict
from gpt_trainer.errors import UsageError
from tests.conftest import CLASSIC_POEMS, POEMS

RARE = "𠀀𪚥"  # outside the Basic Multilingual Plane: two UTF-16 units, one Python character each
TEXT = "春江潮水连海平，海上明月共潮生。\n往事知多少？" + RARE + "\nHello,  world!\r\n\n"


def test_char_tokenizer_round_trips_chinese_with_rare_characters():
    tok = CharTokenizer.train(TEXT)
    ids = tok.encode(TEXT)
    assert len(ids) == len(TEXT)
    assert tok.decode(ids) == TEXT
    assert tokenizer_from_dict(tok.to_dict()).encode(TEXT) == ids


def test_char_tokenizer_drops_unknown_prompt_characters():
    tok = CharTokenizer.train("春江花月夜")
    ids, dropped = tok.encode_known("春X江")
    assert tok.decode(ids) == "春江" and dropped == "X"


def test_sentencepiece_round_trips_and_is_rebuilt_from_its_dict():
    corpus = CLASSIC_POEMS.read_text(encoding="utf-8")
    tok = SentencePieceTokenizer.train(corpus, vocab_size=2000)
    assert tok.vocab_size == 2000
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT  # byte fallback covers 𠀀 and characters absent from training
    assert len(tok.encode(corpus)) < len(corpus)  # merges shorten the text
    assert tokenizer_from_dict(tok.to_dict()).encode(TEXT) == ids


def test_sentencepiece_vocabulary_sizes_that_cannot_work_name_the_ones_that_do():
    text = POEMS * 3
    with pytest.raises(UsageError) as too_small:
        SentencePieceTokenizer.train(text, vocab_size=30)
    smallest = int(re.search(r"need at least (\d+)", str(too_small.value)).group(1))
    with pytest.raises(UsageError) as too_large:
        SentencePieceTokenizer.train(text, vocab_size=5000)
    largest = int(re.search(r"vocabulary it supports is (\d+)", str(too_large.value)).group(1))
    for message in (str(too_small.value), str(too_large.value)):
        assert "--tokenizer char" in message and "character_coverage" not in message  # not a flag of ours
    assert SentencePieceTokenizer.train(text, vocab_size=largest).vocab_size == largest  # the sizes named work
    assert SentencePieceTokenizer.train(text, vocab_size=smallest).vocab_size == smallest


def test_sentencepiece_samples_never_show_replacement_characters():
    tok = SentencePieceTokenizer.train(TEXT * 50, vocab_size=300)
    ids = tok.encode("𠀀春")  # a character only byte pieces can spell
    assert tok.decode(ids) == "𠀀春"
    assert tok.decode(ids[1:]) == "春"  # its first byte cut off: the rest of it is left out, not shown as U+FFFD


def test_sentencepiece_trains_on_a_corpus_with_no_line_breaks_and_round_trips_it():
    text = CLASSIC_POEMS.read_text(encoding="utf-8").replace("\n", "")
    assert "\n" not in text and len(text.encode()) > 4192  # one line, longer than sentencepiece keeps as a sentence
    tok = SentencePieceTokenizer.train(text, vocab_size=1500)  # its 1,079 characters, 256 bytes and some merges
    assert tok.vocab_size == 1500
    ids = tok.encode(text)
    assert len(ids) < len(text) and tok.decode(ids) == text


def hf_tokenizer(folder):
    """A Hugging Face tokenizer as an --init_from folder holds one: a BERT WordPiece vocabulary of the text's
    characters."""
    from tokenizers import BertWordPieceTokenizer

    from gpt_trainer.data.tokenizer import HFTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(set(TEXT) - set(" \n\r\t"))]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    return HFTokenizer(BertWordPieceTokenizer(str(folder / "vocab.txt")).to_str(), vocab_size=len(vocab) + 3)


@pytest.mark.parametrize("kind", ["char", "sentencepiece", "hf"])
def test_every_tokenizer_kind_round_trips_through_json_data(tmp_path, kind):
    import json

    from gpt_trainer.data.tokenizer import tokenizer_from_json, tokenizer_to_json

    tok = {"char": lambda: CharTokenizer.train(TEXT),
           "sentencepiece": lambda: SentencePieceTokenizer.train(CLASSIC_POEMS.read_text(encoding="utf-8"), 2000),
           "hf": lambda: hf_tokenizer(tmp_path)}[kind]()
    text = tokenizer_to_json(tok)
    assert json.loads(text)["kind"] == kind  # plain JSON: reading it back runs no code
    again = tokenizer_from_json(text)
    assert again.to_dict() == tok.to_dict() and again.vocab_size == tok.vocab_size
    assert again.encode(TEXT) == tok.encode(TEXT) and again.decode(tok.encode(TEXT)) == tok.decode(tok.encode(TEXT))
    assert tokenizer_to_json(again) == text
