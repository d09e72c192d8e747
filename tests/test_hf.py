"""--init_from: a transformers GPT-2 folder (made here with transformers, a BERT-style Chinese vocabulary like
uer/gpt2-chinese-cluecorpussmall's, no hub) as the start of a run: its weights, shape and tokenizer."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gpt_trainer.commands.prepare import main as prepare_main
from gpt_trainer.commands.sample import main as sample_main
from gpt_trainer.commands.train import main
from gpt_trainer.config import parse_args
from gpt_trainer.data.batches import validation_windows
from gpt_trainer.data.tokenizer import encode_piece, start_worker, tokenizer_from_dict
from gpt_trainer.data.tokens import prepare_data
from gpt_trainer.model import hf
from gpt_trainer.model.gpt import GPT
from tests.conftest import CLASSIC_POEMS, POEMS, TINY_SHAPE

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# every character of the fixture corpus, and a Latin letter for lower-casing
VOCAB = [*SPECIAL, *sorted(set(CLASSIC_POEMS.read_text(encoding="utf-8")) - set(" \n\t")), "a"]
RUN = ["--batch_size=4", "--dropout=0.0", "--eval_steps=2", "--fp32", "--device=cpu", "--sample_tokens=4",
       "--report_to=none"]


def make_folder(path: Path, vocab: list[str] = VOCAB, vocab_size: int | None = None, tokenizer_json: bool = True,
                safetensors: bool = True, seed: int = 0):
    """A GPT-2 folder as `save_pretrained` writes it, with a BERT WordPiece tokenizer (tokenizer.json and vocab.txt,
    or vocab.txt alone); its embedding drawn wider than GPT-2's initialisation, so its loss is its own. Returns the
    transformers model (in eval mode)."""
    from tokenizers import BertWordPieceTokenizer
    from transformers import GPT2Config, GPT2LMHeadModel

    path.mkdir(parents=True)
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    if tokenizer_json:
        BertWordPieceTokenizer(str(path / "vocab.txt")).save(str(path / "tokenizer.json"))
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab_size or len(vocab), n_positions=32, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=2, eos_token_id=3)
    model = GPT2LMHeadModel(config)
    with torch.no_grad():
        model.transformer.wte.weight.normal_(0.0, 0.5)
    model.save_pretrained(path, safe_serialization=safetensors)
    return model.eval()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "gpt2-poems"
    return path, make_folder(path)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def hf_loss(model, windows: torch.Tensor, chunk: int) -> float:
    """transformers' mean next-token loss over the windows, in chunks as our evaluation takes them."""
    with torch.no_grad():
        losses = [F.cross_entropy(model(w[:, :-1]).logits.flatten(0, 1), w[:, 1:].flatten())
                  for w in windows.split(chunk)]
    return torch.stack(losses).mean().item()


@pytest.mark.parametrize("safetensors", [True, False], ids=["model.safetensors", "pytorch_model.bin"])
def test_our_model_from_the_folder_computes_what_transformers_computes(tmp_path, safetensors):
    theirs = make_folder(tmp_path / "gpt2", safetensors=safetensors)
    ids = torch.randint(0, len(VOCAB), (2, 32), generator=torch.Generator().manual_seed(0))
    expected = theirs(ids).logits
    for block_size in (32, 16):  # fewer positions: the first ones compute the same
        cfg, state, tokenizer = hf.load_gpt2_folder(tmp_path / "gpt2", block_size)
        ours = GPT(cfg).eval()
        ours.load_state_dict(state, strict=True)
        with torch.no_grad():
            logits, _ = ours(ids[:, :block_size], ids[:, :block_size])
        torch.testing.assert_close(logits, expected[:, :block_size], atol=1e-4, rtol=1e-4)
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.vocab_size) == (2, 2, 32, len(VOCAB))
    assert tokenizer.kind == "hf" and tokenizer.vocab_size == len(VOCAB)


def test_the_folder_tokenizer_encodes_without_special_tokens_and_travels_in_a_dict(folder, tmp_path):
    tokenizer = hf.folder_tokenizer(folder[0])
    ids = tokenizer.encode("床前明月光，\n疑是地上霜。")
    assert ids == [VOCAB.index(c) for c in "床前明月光，疑是地上霜。"]  # no [CLS]/[SEP]; BERT drops the line break
    restored = tokenizer_from_dict(tokenizer.to_dict())
    assert restored.encode("春江花月夜") == tokenizer.encode("春江花月夜") and restored.vocab_size == len(VOCAB)
    assert tokenizer.encode_known("春Ω江") == ([VOCAB.index("春"), VOCAB.index("江")], "Ω")  # [UNK] left out
    assert tokenizer.decode(ids[:3]) == "床 前 明"  # WordPiece puts a space between tokens
    assert tokenizer.encode("A") == [VOCAB.index("a")]  # BertTokenizer's default: lower-cased
    worker = {}
    start_worker(worker, tokenizer.to_dict(), "uint16")  # the preparation workers encode with the same tokenizer
    assert np.frombuffer(encode_piece(worker, "春江花月夜"), dtype=np.uint16).tolist() == tokenizer.encode("春江花月夜")
    # a model vocabulary padded past the tokenizer's: its extra ids decode to nothing
    padded = hf.folder_tokenizer(folder[0], len(VOCAB) + 11)
    assert padded.vocab_size == len(VOCAB) + 11 and padded.decode([VOCAB.index("春"), len(VOCAB) + 3]) == "春"
    # vocab.txt alone: the same tokenizer, built from it; tokenizer_config.json's do_lower_case is followed
    only_vocab = tmp_path / "only-vocab"
    only_vocab.mkdir()
    for name in ("config.json", "vocab.txt"):
        shutil.copy(folder[0] / name, only_vocab)
    assert hf.folder_tokenizer(only_vocab).to_dict() == tokenizer.to_dict()
    (only_vocab / "tokenizer_config.json").write_text('{"do_lower_case": false}')
    assert hf.folder_tokenizer(only_vocab).encode("A") == [VOCAB.index("[UNK]")]


def test_a_run_from_a_gpt2_folder_starts_from_its_weights_and_learns(folder, tmp_path, cache_dir, capsys,
                                                                     monkeypatch):
    path, theirs = folder
    out = tmp_path / "out"
    reads = []  # a spy: the real reader runs, and says each time whether it loaded the weights or only their shapes
    real_read = hf.read_weights
    monkeypatch.setattr(hf, "read_weights", lambda where, meta=False: reads.append(meta) or real_read(where, meta))
    # the shape flags of TINY_SHAPE agree with the folder's, and its --block_size 16 is below n_positions 32
    argv = [f"--init_from={path}", f"--data_path={CLASSIC_POEMS}", f"--cache_dir={cache_dir}", f"--output_dir={out}",
            *TINY_SHAPE, "--max_steps=30", "--eval_interval=10", "--log_interval=10", "--learning_rate=3e-3",
            "--warmup_steps=0"]
    assert main(argv) == 0
    assert reads == [False]  # checked and trained from one read of the folder's weights
    assert f"step 0 (the weights of {path}) | val" in capsys.readouterr().out
    rows = metrics(out)
    evals = [(r["step"], r["eval/loss"]) for r in rows if "eval/loss" in r]
    assert [step for step, _ in evals] == [0, 10, 20, 30]
    # the evaluation before the first step is transformers' own loss on the same validation windows
    cfg = parse_args(argv)
    data = prepare_data(cfg, tokenizer=hf.init_tokenizer(cfg))
    assert not data.built  # the same tokenizer finds the cache the run made
    windows = validation_windows(data.val, 16, 2 * 4)
    assert evals[0][1] == pytest.approx(hf_loss(theirs, windows, 4), abs=1e-4)
    train = [r["train/loss"] for r in rows if "train/loss" in r]
    assert evals[-1][1] < evals[0][1] - 0.2 and train[-1] < train[0]
    config = json.loads((out / "config.json").read_text())
    assert (config["init_from"], config["tokenizer"], config["n_layer"], config["n_embd"], config["block_size"],
            config["vocab_size"]) == (str(path), "hf", 2, 32, 16, len(VOCAB))
    saved = torch.load(out / "checkpoints" / "latest.pt", weights_only=True)
    assert saved["tokenizer"]["kind"] == "hf" and saved["config"]["init_from"] == str(path)
    # the trained model beat the start: best.pt holds the best of the trained steps
    best_step, best = min(evals[1:], key=lambda e: e[1])
    assert torch.load(out / "checkpoints" / "best.pt", weights_only=True)["trainer"]["step"] == best_step
    assert saved["trainer"]["best_val_loss"] == pytest.approx(best) and saved["trainer"]["best_step"] == best_step


def test_a_start_training_never_beats_writes_no_best_pt_and_the_end_says_so(folder, tmp_path, cache_dir, capsys):
    """A learning rate far too high makes every evaluation worse than the folder's weights, which stay the best: the
    closing line's best val loss is theirs, and best.pt (never worse than the start) is not written."""
    path, out = folder[0], tmp_path / "out"
    assert main([f"--init_from={path}", f"--data_path={CLASSIC_POEMS}", f"--cache_dir={cache_dir}",
                 f"--output_dir={out}", *TINY_SHAPE, "--max_steps=4", "--eval_interval=2", "--learning_rate=3",
                 "--min_lr=3", "--warmup_steps=0"]) == 0
    printed = capsys.readouterr().out
    rows = metrics(out)
    evals = [(r["step"], r["eval/loss"]) for r in rows if "eval/loss" in r]
    (_, start), trained = evals[0], [loss for _, loss in evals[1:]]
    assert [step for step, _ in evals] == [0, 2, 4] and min(trained) > start
    assert not (out / "checkpoints" / "best.pt").exists()
    assert f"best val loss {start:.4f}" in printed
    assert f"no step beat the starting weights of {path} (step 0), so no best.pt was written" in printed
    assert "training made the model worse" in printed and "memorising" not in printed
    assert rows[-1]["final/best_perplexity"] == pytest.approx(math.exp(start))
    saved = torch.load(out / "checkpoints" / "latest.pt", weights_only=True)["trainer"]
    assert saved["best_val_loss"] == pytest.approx(start) and saved["best_step"] == 0


def test_a_folder_with_only_a_bert_vocab_txt_trains_with_its_full_context(tmp_path, cache_dir):
    path = tmp_path / "gpt2"
    make_folder(path, tokenizer_json=False)
    out = tmp_path / "out"
    assert main([f"--init_from={path}", f"--data_path={CLASSIC_POEMS}", f"--cache_dir={cache_dir}",
                 f"--output_dir={out}", *RUN, "--max_steps=3", "--eval_interval=3"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["tokenizer"], config["n_layer"], config["block_size"]) == ("hf", 2, 32)  # block_size: n_positions
    assert [r["step"] for r in metrics(out) if "eval/loss" in r] == [0, 3]


def broken(path: Path, file: str, **changes) -> None:
    """Change keys of a JSON file of the folder."""
    data = json.loads((path / file).read_text())
    (path / file).write_text(json.dumps({**data, **changes}))


def edit_weights(path: Path, edit) -> None:
    """Change the folder's weights in place: edit(state) on the tensors of model.safetensors or pytorch_model.bin."""
    from safetensors.torch import load_file, save_file

    if (path / "model.safetensors").exists():
        state = load_file(path / "model.safetensors")
        edit(state)
        save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    else:
        state = torch.load(path / "pytorch_model.bin", weights_only=True)
        edit(state)
        torch.save(state, path / "pytorch_model.bin")


def without_key(path: Path, key: str) -> None:
    edit_weights(path, lambda state: state.pop(key))


def with_values(key: str, *values: float):
    """A change to the folder: the first values of tensor `key` replaced by `values` (NaN, inf)."""
    def change(path: Path) -> None:
        def edit(state):
            state[key] = state[key].clone()
            state[key].view(-1)[: len(values)] = torch.tensor(values)
        edit_weights(path, edit)
    return change


def as_dtype(key: str, dtype: torch.dtype):
    """A change to the folder: tensor `key` stored as `dtype` (int8, as a quantized model holds its matrices)."""
    return lambda path: edit_weights(path, lambda state: state.update({key: state[key].to(dtype)}))


def config_text(text: bytes):
    """A change to the folder: config.json replaced by these bytes."""
    return lambda path: (path / "config.json").write_bytes(text)


def cut_short(path: Path) -> None:
    config = (path / "config.json").read_bytes()
    (path / "config.json").write_bytes(config[: len(config) // 2])


BAD = {  # name: (change to the folder, extra flags, what the message must say)
    "no config.json": (lambda p: (p / "config.json").unlink(), [], "has no config.json"),
    "llama": (lambda p: broken(p, "config.json", model_type="llama", architectures=["LlamaForCausalLM"]), [],
              "holds a llama model (LlamaForCausalLM)"),
    "exact gelu": (lambda p: broken(p, "config.json", activation_function="gelu"), [],
                   'activation_function is "gelu", not "gelu_new"'),
    "no weights": (lambda p: (p / "model.safetensors").unlink(), [], "has no weights"),
    "a weight missing": (lambda p: without_key(p, "transformer.h.1.mlp.c_proj.bias"), [],
                         "missing h.1.mlp.c_proj.bias"),
    "weights of another shape": (lambda p: broken(p, "config.json", n_positions=64), [],
                                 "wpe.weight is (32, 32), not (64, 32)"),
    "no tokenizer": (lambda p: [(p / name).unlink() for name in ("tokenizer.json", "vocab.txt")], [],
                     "has no tokenizer: neither tokenizer.json nor a BERT vocab.txt"),
    "tokenizer ids past the vocabulary": (lambda p: broken(p, "config.json", vocab_size=len(VOCAB) - 5), [],
                                          f"has ids up to {len(VOCAB) - 1}, but the model's vocabulary "
                                          f"(config.json's vocab_size) has only {len(VOCAB) - 5} rows"),
    "not a folder": (lambda p: shutil.rmtree(p), [], "no such folder"),
    "a conflicting --n_layer": (None, ["--n_layer=3"], "--n_layer 3 (the folder's: 2)"),
    "a conflicting --model_size": (None, ["--model_size=small"], "--model_size small (12 layers x 768 wide, 12 "
                                                                 "heads; the folder's: 2 layers x 32 wide, 2 heads)"),
    # the flag's value and the folder's: not the default preset's n_head (6) or n_embd (384), which the folder replaces
    "a conflicting --n_embd alone": (None, ["--n_embd=33"], "--n_embd 33 (the folder's: 32)"),
    "a conflicting --n_head alone": (None, ["--n_head=5"], "--n_head 5 (the folder's: 2)"),
    "a longer --block_size": (None, ["--block_size=64"], "--block_size 64 (the folder's model has 32 positions"),
    "another tokenizer": (None, ["--tokenizer=sentencepiece"], "--tokenizer sentencepiece asks for another"),
    # weights no run can start from: refused by name before anything is written, not trained into NaN or cast
    "NaN and inf weights": (with_values("transformer.h.1.mlp.c_fc.weight", math.nan, math.nan, math.inf), [],
                            "are not all finite numbers: h.1.mlp.c_fc.weight (2 NaN, 1 infinite of 4,096 values)"),
    "int8 weights": (as_dtype("transformer.h.0.attn.c_attn.weight", torch.int8), [],
                     "are not all floating point: h.0.attn.c_attn.weight (int8)"),
    "bool weights": (as_dtype("transformer.ln_f.bias", torch.bool), [],
                     "are not all floating point: ln_f.bias (bool)"),
    # a config.json that is not one: a sentence each, never a traceback
    "config.json an array": (config_text(b"[1, 2]"), [], "config.json holds a JSON array, not an object of settings"),
    "config.json not UTF-8": (config_text(b'\xff\xfe{"model_type": "gpt2"}'), [],
                              "config.json is not UTF-8 text (byte offset 0)"),
    "config.json cut short": (cut_short, [], "config.json is not valid JSON ("),
    "a size as text": (lambda p: broken(p, "config.json", n_layer="2"), [],
                       'gives sizes that are not whole numbers of at least 1 (n_layer is "2")'),
    "sizes null": (lambda p: broken(p, "config.json", n_embd=None, vocab_size=None), [],
                   "(vocab_size is null; n_embd is null)"),
    "a negative size": (lambda p: broken(p, "config.json", n_layer=-1), [], "(n_layer is -1)"),
    "a zero size": (lambda p: broken(p, "config.json", n_head=0), [], "(n_head is 0)"),
    "a width the heads do not divide": (lambda p: broken(p, "config.json", n_head=3), [],
                                        "gives n_embd 32, which does not divide by n_head 3"),
    "a billion layers": (lambda p: broken(p, "config.json", n_layer=10**9), [],
                         "it says 1000000000 layers, the weights hold 2"),
    "layer_norm_epsilon as text": (lambda p: broken(p, "config.json", layer_norm_epsilon="1e-5"), [],
                                   'layer_norm_epsilon is "1e-5", not 1e-05'),
    "layer_norm_epsilon NaN": (lambda p: broken(p, "config.json", layer_norm_epsilon=math.nan), [],
                               "layer_norm_epsilon is NaN, not 1e-05"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_folder_or_a_conflicting_flag_exits_2_naming_it_and_writes_nothing(case, folder, tmp_path, capsys):
    change, flags, message = BAD[case]
    path = tmp_path / "gpt2"
    shutil.copytree(folder[0], path)
    if change:
        change(path)
    out, cache = tmp_path / "out", tmp_path / "cache"
    assert main([f"--init_from={path}", f"--data_path={CLASSIC_POEMS}", f"--cache_dir={cache}", f"--output_dir={out}",
                 *RUN, "--max_steps=2", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists() and not cache.exists()


def test_nan_weights_in_pytorch_model_bin_are_refused_too(tmp_path, capsys):
    path = tmp_path / "gpt2"
    make_folder(path, safetensors=False)
    with_values("transformer.wte.weight", math.inf)(path)
    out = tmp_path / "out"
    assert main([f"--init_from={path}", f"--data_path={CLASSIC_POEMS}", f"--cache_dir={tmp_path / 'cache'}",
                 f"--output_dir={out}", *RUN, "--max_steps=2"]) == 2
    assert "wte.weight (1 infinite of 34,688 values)" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_weights_of_every_floating_width_are_accepted_and_read_once(folder, tmp_path, dtype):
    path = tmp_path / "gpt2"
    shutil.copytree(folder[0], path)
    edit_weights(path, lambda state: state.update({key: value.to(dtype) for key, value in state.items()}))
    cfg = parse_args([f"--init_from={path}", f"--data_path={CLASSIC_POEMS}", *RUN])
    settled = hf.settle_init_from(cfg)
    weights = hf.init_weights(settled)
    model = GPT(hf.read_gpt2_config(path))
    model.load_state_dict(weights, strict=True)  # as the trainer takes them: no second read of the folder
    expected = folder[1].transformer.h[1].mlp.c_fc.weight.t().to(dtype).float()
    assert torch.equal(model.blocks[1].mlp.fc.weight.detach(), expected)
    assert hf.init_weights(settled, load=False) is None  # a resumed run: names and shapes checked, nothing loaded


def test_a_model_size_with_the_folder_s_shape_given_beside_it_agrees(folder):
    argv = [f"--init_from={folder[0]}", f"--data_path={CLASSIC_POEMS}", *RUN]
    settled = hf.settle_init_from(parse_args([*argv, "--model_size=small", "--n_layer=2", "--n_head=2",
                                              "--n_embd=32"]),
                                  frozenset({"model_size", "n_layer", "n_head", "n_embd"}))
    assert (settled.n_layer, settled.n_head, settled.n_embd) == (2, 2, 32)
    # the width alone, the folder's: the default preset's 6 heads do not make it indivisible
    settled = hf.settle_init_from(parse_args([*argv, "--n_embd=32"]), frozenset({"n_embd"}))
    assert (settled.n_head, settled.n_embd) == (2, 32)


@pytest.mark.parametrize("value", ["", "   "], ids=["empty", "blank"])
def test_an_init_from_that_names_no_folder_is_refused(value, tmp_path, capsys):
    out = tmp_path / "out"
    assert main([f"--init_from={value}", f"--data_path={CLASSIC_POEMS}", f"--cache_dir={tmp_path / 'cache'}",
                 f"--output_dir={out}", *RUN, "--max_steps=2"]) == 2
    assert f"--init_from {value!r} names no folder" in capsys.readouterr().err and not out.exists()


def char_folder(path: Path, chars: list[str]) -> None:
    """A folder whose tokenizer is a char vocabulary without an unknown token (as python -m gpt_trainer.export writes
    one): a character outside it cannot be encoded."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tokenizer.decoder = decoders.Fuse()
    path.mkdir()
    tokenizer.save(str(path / "tokenizer.json"))
    GPT2LMHeadModel(GPT2Config(vocab_size=len(chars), n_positions=32, n_embd=32, n_layer=2, n_head=2,
                               bos_token_id=None, eos_token_id=None)).save_pretrained(path)


@pytest.mark.parametrize("workers", [1, 2])
def test_text_a_tokenizer_without_an_unknown_token_cannot_encode_exits_2_naming_characters(tmp_path, capsys, workers):
    path = tmp_path / "char-model"
    char_folder(path, sorted(set(POEMS)))  # two poems' characters; the classic poems have many more
    tokenizer = hf.folder_tokenizer(path)
    assert tokenizer.decode(tokenizer.encode("床前明月光\n")) == "床前明月光\n"
    assert tokenizer.encode_known("床前Ω月") == (tokenizer.encode("床前月"), "Ω")  # a prompt: left out, said
    out, cache = tmp_path / "out", tmp_path / "cache"
    assert main([f"--init_from={path}", f"--data_path={CLASSIC_POEMS}", f"--cache_dir={cache}", f"--output_dir={out}",
                 *RUN, "--max_steps=2", f"--prepare_workers={workers}"]) == 2
    err = capsys.readouterr().err
    assert "the --init_from tokenizer cannot encode this text (characters it lacks include '" in err
    assert "Traceback" not in err and not out.exists()
    assert [p.name for p in (cache / "tokens").iterdir() if not p.name.startswith(".")] == []  # no cache left


def test_tokenizer_hf_needs_an_init_from_folder(tmp_path, capsys):
    assert main([f"--data_path={CLASSIC_POEMS}", f"--output_dir={tmp_path / 'out'}", "--tokenizer=hf", *RUN]) == 2
    assert "--tokenizer hf is the tokenizer of a transformers model folder: give --init_from DIR" in \
        capsys.readouterr().err


def test_the_token_cache_is_keyed_on_the_tokenizer(folder, tmp_path, capsys):
    other = tmp_path / "other"
    make_folder(other, vocab=[*VOCAB, "b"])  # one token more: other ids for nothing in the text, another tokenizer
    cache = tmp_path / "cache"

    def cfg(path: Path, *extra: str):
        return parse_args([f"--init_from={path}", f"--data_path={CLASSIC_POEMS}", f"--cache_dir={cache}", *extra])

    # prepared ahead (as on a login node): the run's preparation finds it complete
    assert prepare_main([f"--init_from={folder[0]}", f"--data_path={CLASSIC_POEMS}", f"--cache_dir={cache}",
                         "--prepare_workers=2"]) == 0
    assert "(hf), prepared in" in capsys.readouterr().out
    first = prepare_data(cfg(folder[0]), tokenizer=hf.folder_tokenizer(folder[0]))
    assert not first.built and first.tokenizer.to_dict() == hf.folder_tokenizer(folder[0]).to_dict()
    second = prepare_data(cfg(other), tokenizer=hf.folder_tokenizer(other))
    assert second.built and second.folder != first.folder and second.tokenizer.vocab_size == len(VOCAB) + 1
    # two workers encoded what one tokenizer call on the whole text gives (the fixture is a single piece)
    ids = hf.folder_tokenizer(folder[0]).encode(CLASSIC_POEMS.read_text(encoding="utf-8"))
    assert np.concatenate([first.train, first.val]).tolist() == ids


def test_a_run_from_a_folder_resumes_from_its_checkpoint_and_samples(folder, tmp_path, cache_dir, capsys):
    path = folder[0]
    # a constant learning rate, so that a run of 6 steps and one of 4 resumed to 6 follow the same schedule
    base = [f"--init_from={path}", f"--data_path={CLASSIC_POEMS}", f"--cache_dir={cache_dir}", *RUN,
            "--learning_rate=1e-3", "--min_lr=1e-3", "--warmup_steps=0", "--eval_interval=3", "--log_interval=1"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main([*base, f"--output_dir={straight}", "--max_steps=6"]) == 0
    assert main([*base, f"--output_dir={resumed}", "--max_steps=4"]) == 0
    capsys.readouterr()
    assert main([*base, f"--output_dir={resumed}", "--max_steps=6", "--resume"]) == 0
    assert f"resumed from {resumed / 'checkpoints' / 'latest.pt'} at step 4" in capsys.readouterr().out

    def losses(out: Path) -> dict:
        return {r["step"]: r["train/loss"] for r in metrics(out) if "train/loss" in r}

    # the resumed steps continue the checkpoint's weights (the folder's would give other losses) exactly
    assert [losses(resumed)[s] for s in (5, 6)] == pytest.approx([losses(straight)[s] for s in (5, 6)], abs=1e-6)
    assert [r["step"] for r in metrics(resumed) if "eval/loss" in r] == [0, 3, 4, 6]  # no second step-0 evaluation
    latest = resumed / "checkpoints" / "latest.pt"
    saved = torch.load(latest, weights_only=True)
    assert saved["trainer"]["step"] == 6 and saved["tokenizer"]["kind"] == "hf"
    # sampling needs the checkpoint alone
    assert sample_main([str(latest), "--prompts=春江", "--tokens=4", "--device=cpu", "--seed=1"]) == 0
    assert capsys.readouterr().out.startswith("--- '春江' ---\n春 江")
    # a resume without --init_from keeps the run's (its tokenizer); one with another tokenizer names the folder
    assert main([f"--data_path={CLASSIC_POEMS}", f"--cache_dir={cache_dir}", f"--output_dir={resumed}", *RUN,
                 "--max_steps=8", "--resume"]) == 0
    assert f"resumed from {latest} at step 6" in capsys.readouterr().out
    assert main([f"--data_path={CLASSIC_POEMS}", f"--cache_dir={cache_dir}", f"--output_dir={resumed}", *RUN,
                 "--max_steps=10", "--resume", "--tokenizer=char"]) == 2
    assert f"it started from --init_from {path}" in capsys.readouterr().err
