import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpt_trainer.commands import sample as sample_module
from gpt_trainer.commands.sample import main
from gpt_trainer.data.tokenizer import CharTokenizer, SentencePieceTokenizer
from gpt_trainer.model.gpt import GPT, GPTConfig, generate_text, stream_text
from gpt_trainer.system.rundir import RunFolder
from tests.conftest import CLASSIC_POEMS, make_trainer

ROOT = Path(__file__).resolve().parents[1]


def test_sampling_needs_nothing_but_the_checkpoint(tiny_cfg, tmp_path, capsys):
    cfg = tiny_cfg("--max_steps=2", "--eval_interval=2")
    make_trainer(cfg).train()
    path = RunFolder(tmp_path / "out").latest
    capsys.readouterr()
    assert main([str(path), "--prompts=春江,往事", "--tokens=5", "--device=cpu", "--seed=1"]) == 0
    out = capsys.readouterr().out
    assert "--- '春江' ---\n春江" in out and "--- '往事' ---\n往事" in out
    assert main([str(path), "--prompts=春江", "--tokens=5", "--device=cpu", "--seed=1"]) == 0
    again = capsys.readouterr().out
    assert again.split("--- '往事'")[0] == out.split("--- '往事'")[0]  # the same seed gives the same text


def test_a_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert main([str(tmp_path / "none.pt"), "--device=cpu"]) == 2
    assert "not a readable checkpoint" in capsys.readouterr().err


def test_a_file_that_is_not_our_checkpoint_is_a_usage_error(tmp_path, capsys):
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    assert main([str(tmp_path / "foreign.pt"), "--device=cpu"]) == 2
    assert "not a checkpoint written by train_single_gpu.py" in capsys.readouterr().err


def test_checkpoints_of_earlier_formats_still_sample(capsys):
    """The format 2 fixture (written by the code of 2026-12-01) gives, for seed 1, the text that code sampled."""
    fixtures = Path(__file__).parent / "fixtures"
    assert main([str(fixtures / "checkpoint_v1.pt"), "--prompts=春", "--tokens=6", "--device=cpu", "--seed=1"]) == 0
    assert capsys.readouterr().out.startswith("--- '春' ---\n春")
    assert main([str(fixtures / "checkpoint_v2.pt"), "--prompts=春,月", "--tokens=12", "--device=cpu", "--seed=1"]) == 0
    assert capsys.readouterr().out == ("--- '春' ---\n春\n晓上是闻闻鸟故思落晓明\n\n"
                                       "--- '月' ---\n月鸟不啼\n雨望明落上头故\n\n\n")


def test_the_sample_command_of_the_package_works_as_the_sample_module(capsys):
    import sys

    root = Path(__file__).resolve().parents[1]
    fixture = str(root / "tests" / "fixtures" / "checkpoint_v2.pt")
    args = [fixture, "--prompts=春,月", "--tokens=8", "--seed", "1", "--device", "cpu"]

    def python_m(*argv):
        return subprocess.run([sys.executable, "-m", *argv], cwd=root, capture_output=True, text=True, timeout=120)
    module, package = python_m("gpt_trainer.sample", *args), python_m("gpt_trainer", "sample", *args)
    assert module.returncode == package.returncode == 0, module.stderr + package.stderr
    assert package.stdout == module.stdout and module.stdout.startswith("--- '春' ---\n春")
    refused = python_m("gpt_trainer.sample", fixture, "--temperature=-1")
    assert refused.returncode == 2 and "--temperature must be" in refused.stderr


def test_a_long_sample_is_printed_as_it_is_drawn(monkeypatch):
    """Each piece reaches stdout, flushed, before the next token is drawn: the order of draws and writes is recorded
    (a wrapper around the model's stream and around stdout, no clock), so a sample printed all at the end fails."""
    events = []
    real_stream = sample_module.stream_text

    def recorded_stream(*args, **kwargs):
        for piece in real_stream(*args, **kwargs):
            events.append("drawn")
            yield piece

    class RecordedStdout:
        def write(self, text):
            if text.strip() and not text.startswith("---"):
                events.append("written")

        def flush(self):
            events.append("flushed")

    monkeypatch.setattr(sample_module, "stream_text", recorded_stream)
    monkeypatch.setattr(sys, "stdout", RecordedStdout())
    fixture = ROOT / "tests" / "fixtures" / "checkpoint_v2.pt"
    assert main([str(fixture), "--prompts=春", "--tokens=30", "--device=cpu", "--seed=1"]) == 0
    drawn = [i for i, e in enumerate(events) if e == "drawn"]
    assert len(drawn) >= 20
    first_written = events.index("written")
    assert first_written < drawn[-1] and events[first_written + 1] == "flushed"  # shown while the rest is drawn


@pytest.mark.parametrize("kind", ["char", "sentencepiece"])
def test_the_pieces_streamed_make_the_same_text_as_one_sample(kind):
    """An untrained model draws any token: for sentencepiece, also the byte pieces of characters split over several
    tokens, which print only once complete."""
    text = CLASSIC_POEMS.read_text(encoding="utf-8")
    tokenizer = CharTokenizer.train(text) if kind == "char" else SentencePieceTokenizer.train(text, 1400)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16))
    draws = dict(prompt="春江", precision="fp32", tokens=300, temperature=1.0, top_k=0, top_p=1.0)
    pieces = list(stream_text(model, tokenizer, **draws, generator=torch.Generator().manual_seed(1)))
    whole = generate_text(model, tokenizer, **draws, generator=torch.Generator().manual_seed(1))
    assert pieces[0] == "春江" and len(pieces) > 30
    assert "".join(pieces) == whole
