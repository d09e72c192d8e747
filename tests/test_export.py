"""python -m gpt_trainer.export: the folder it writes is loaded by transformers itself (no custom code, no hub) and
computes what our model computes, with our token ids; bad input is refused before anything is written."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from gpt_trainer.commands import export
from gpt_trainer.commands.sample import model_from_checkpoint
from gpt_trainer.config import CHINESE_PROMPTS, parse_args
from gpt_trainer.data.tokenizer import CharTokenizer, HFTokenizer, SentencePieceTokenizer, tokenizer_from_dict
from gpt_trainer.errors import UsageError
from gpt_trainer.model import hf
from gpt_trainer.model.gpt import generate_text
from gpt_trainer.system.rundir import RunFolder
from gpt_trainer.train import checkpoint
from tests.conftest import CLASSIC_POEMS, GPT2_ADAMW, TINY_SHAPE, files_containing, make_trainer

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT_V1, CHECKPOINT_V2 = (ROOT / "tests" / "fixtures" / f"checkpoint_v{n}.pt" for n in (1, 2))
CORPUS = CLASSIC_POEMS.read_text(encoding="utf-8")
SP_VOCAB = 1400  # the fixture corpus needs at least 1,336 (its characters, 256 bytes and 3 control pieces)
KINDS = {"char": [], "sentencepiece": ["--tokenizer=sentencepiece", f"--vocab_size={SP_VOCAB}"]}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache_dir):
    """kind -> the best.pt of a tiny run on the classic poems, trained once per module (2 steps: the weights are still
    nearly random, so greedy decoding is not only the commonest punctuation mark repeated, as after some more)."""
    made = {}

    def make(kind: str) -> Path:
        if kind not in made:
            out = tmp_path_factory.mktemp(f"run-{kind}")
            cfg = parse_args([f"--data_path={CLASSIC_POEMS}", f"--cache_dir={cache_dir}", f"--output_dir={out}",
                              *TINY_SHAPE, *GPT2_ADAMW, "--max_steps=2", "--eval_interval=2", *KINDS[kind]])
            make_trainer(cfg).train()
            made[kind] = RunFolder(out).best
        return made[kind]
    return make


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    """kind -> (checkpoint, the folder `python -m gpt_trainer.export` wrote for it)."""
    made = {}

    def make(kind: str) -> tuple[Path, Path]:
        if kind not in made:
            out = tmp_path_factory.mktemp(f"export-{kind}") / "model"
            assert export.main([str(trained(kind)), str(out)]) == 0
            made[kind] = trained(kind), out
        return made[kind]
    return make


def ours(path: Path):
    state = checkpoint.load(path)
    model = model_from_checkpoint(state, torch.device("cpu"), path).eval()
    return state, model, tokenizer_from_dict(state["tokenizer"])


def listing(folder: Path) -> dict[str, str]:
    """Every file under `folder` with a digest of its bytes (folders as such), to see that nothing changed."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder"
            for p in sorted(folder.rglob("*"))}


# ---- transformers loads it and computes what we compute -------------------------------------------------------------
def loaded_without_warnings(out: Path, capfd):
    """The export in `out` loaded by AutoModelForCausalLM, having found every weight it expects and no other, and
    having said nothing about missing, new or unused weights (in warnings or on stderr)."""
    from transformers import AutoModelForCausalLM

    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert {key: list(value) for key, value in info.items()} == {"missing_keys": [], "unexpected_keys": [],
                                                                 "mismatched_keys": [], "error_msgs": []}
    said = capfd.readouterr().err.lower() + " ".join(str(w.message).lower() for w in caught)
    for symptom in ("missing", "newly initialized", "not initialized", "unexpected", "not used", "mismatch"):
        assert symptom not in said, said
    return model


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_transformers_loads_every_weight_with_no_warning(exported, kind, capfd):
    from transformers import GPT2LMHeadModel

    _, out = exported(kind)
    model = loaded_without_warnings(out, capfd)
    assert isinstance(model, GPT2LMHeadModel)
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()  # tied, stored once


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_ours(exported, kind):
    from transformers import AutoModelForCausalLM

    path, out = exported(kind)
    state, model, tokenizer = ours(path)
    block = state["config"]["block_size"]
    ids = torch.tensor(tokenizer.encode(CORPUS)[: 4 * block]).view(4, block)  # four full windows of real text
    with torch.no_grad():
        mine, _ = model(ids, targets=ids)  # with targets, every position's logits (fp32: trained with --fp32)
        theirs = AutoModelForCausalLM.from_pretrained(out).eval()(ids).logits
    assert (mine - theirs).abs().max().item() <= 1e-4


@pytest.mark.slow
def test_a_forgotten_conv1d_transpose_loads_silently_but_breaks_the_logits(trained, tmp_path, monkeypatch):
    """The control of the logits test: the square attention output matrix loads without a shape error untransposed."""
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(hf, "CONV1D", hf.CONV1D - {"attn.proj"})
    assert export.main([str(trained("char")), str(tmp_path / "broken")]) == 0
    state, model, tokenizer = ours(trained("char"))
    ids = torch.tensor([tokenizer.encode(CORPUS)[: state["config"]["block_size"]]])
    broken, info = AutoModelForCausalLM.from_pretrained(tmp_path / "broken", output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    with torch.no_grad():
        assert (model(ids, targets=ids)[0] - broken.eval()(ids).logits).abs().max().item() > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_greedy_generation_continues_the_demo_prompts_as_ours_does(exported, kind):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, out = exported(kind)
    state, model, tokenizer = ours(path)
    theirs, their_tokenizer = AutoModelForCausalLM.from_pretrained(out).eval(), AutoTokenizer.from_pretrained(out)
    for prompt in CHINESE_PROMPTS.split(","):  # the demo's prompts (it trains on Chinese poetry)
        ids = tokenizer.encode(prompt)
        new = state["config"]["block_size"] - len(ids)  # as far as transformers' GPT-2 can go: the whole context
        mine = model.generate(torch.tensor([ids]), new, temperature=0)[0].tolist()  # temperature 0: the argmax
        generated = theirs.generate(**their_tokenizer(prompt, return_tensors="pt"), do_sample=False,
                                    max_new_tokens=new)[0].tolist()
        assert generated == mine
        # the text as `python -m gpt_trainer.sample` prints it, which leaves out a stray byte's U+FFFD
        text = generate_text(model, tokenizer, prompt, "fp32", new, 0.0, 0, 1.0)
        assert their_tokenizer.decode(generated).replace("\ufffd", "") == text


# ---- the tokenizer gives our ids -------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_the_tokenizer_gives_our_ids_on_the_whole_corpus_and_decodes_it_back(exported, kind):
    from transformers import AutoTokenizer

    path, out = exported(kind)
    _, _, tokenizer = ours(path)
    their_tokenizer = AutoTokenizer.from_pretrained(out)
    assert "\n" in CORPUS and "，" in CORPUS and "？" in CORPUS  # newlines and full-width punctuation are tested
    ids = their_tokenizer(CORPUS).input_ids  # add_special_tokens (the default) must add nothing
    assert ids == tokenizer.encode(CORPUS)
    assert their_tokenizer.decode(ids) == CORPUS
    assert their_tokenizer.decode(ids, skip_special_tokens=True) == CORPUS  # "\n" is not a special token
    if kind == "sentencepiece":  # control pieces written in a text are text to sentencepiece, and to the export
        text = "<s>春江</s><unk> 2026  𠀀\n"
        assert their_tokenizer(text).input_ids == tokenizer.encode(text)
        assert their_tokenizer.decode(their_tokenizer(text).input_ids) == text
    else:  # a character the corpus never had has no id: an error, never silently another character's id
        with pytest.raises(Exception, match="Missing \\[UNK\\]"):
            their_tokenizer("春x江")


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_token_ids_and_sampling_defaults_are_ours(exported, kind):
    from transformers import AutoConfig, GenerationConfig

    path, out = exported(kind)
    state, _, tokenizer = ours(path)
    config, generation = AutoConfig.from_pretrained(out), GenerationConfig.from_pretrained(out)
    if kind == "char":  # no special tokens in a char vocabulary: "\n" starts, nothing ends, nothing pads
        expected = {"bos": tokenizer.index["\n"], "eos": None, "pad": None}
    else:
        expected = {"bos": tokenizer.sp.bos_id(), "eos": tokenizer.sp.eos_id(), "pad": None}
    for source in (config, generation):
        assert {"bos": source.bos_token_id, "eos": source.eos_token_id, "pad": source.pad_token_id} == expected
    assert config.vocab_size == state["vocab_size"] and config.n_positions == state["config"]["block_size"]
    flags = state["config"]
    assert (generation.do_sample, generation.temperature, generation.top_k, generation.top_p,
            generation.max_new_tokens) == (True, flags["temperature"], flags["top_k"], flags["top_p"],
                                           flags["sample_tokens"])


# ---- the model card --------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_the_model_card_names_the_corpus_steps_tokens_and_best_validation_loss(exported):
    path, out = exported("char")
    state = checkpoint.load(path)
    card = (out / "README.md").read_text(encoding="utf-8")
    front = card.split("---\n")[1]
    assert "library_name: transformers" in front and "license: unknown" in front and "gpt2" in front
    step, best = state["trainer"]["step"], state["trainer"]["best_val_loss"]
    assert "classic_poems.txt" in card and f"{step} steps" in card and f"{best:.4f}" in card
    assert f"= {step * 4 * 16:,} tokens seen" in card  # TINY_SHAPE: 4 sequences x 16 tokens per step
    assert "python train_single_gpu.py" in card and "--max_steps=2" in card and "--cache_dir" not in card
    assert "AutoModelForCausalLM.from_pretrained" in card


def test_a_named_corpus_gives_its_licence_and_an_old_checkpoint_its_batch():
    state = checkpoint.load(ROOT / "tests" / "fixtures" / "checkpoint_v1.pt")  # format 1: no global batch recorded
    ids = export.special_ids(tokenizer_from_dict(state["tokenizer"]))

    def front_matter(corpus: str | None) -> dict:
        named = {**state, "corpus": corpus, "config": {**state["config"], "data_path": None}} if corpus else state
        return yaml.safe_load(export.model_card(named, ids, "poet").split("---\n")[1])
    assert front_matter("builtin")["license"] == front_matter("song_ci")["license"] == "mit"
    assert front_matter("shakespeare")["license"] == "other"  # public-domain text, which the Hub has no id for
    assert front_matter(None)["license"] == "unknown"  # the user's own file
    assert front_matter(None)["library_name"] == "transformers" and "gpt2" in front_matter(None)["tags"]
    assert f"= {3 * 2 * 8:,} tokens seen" in export.model_card(state, ids, "poet")  # 3 steps x 2 sequences x 8


@pytest.mark.slow
def test_tokenizers_of_mixed_text_round_trip_with_our_ids(tmp_path):
    """Spaces (runs of them too), tabs, digits, English and a character outside the BMP, in both kinds."""
    from transformers import AutoTokenizer

    text = CORPUS + (ROOT / "README.md").read_text(encoding="utf-8") + "  two spaces\tand a tab 2026 𠀀\n"
    for tokenizer in (CharTokenizer.train(text), SentencePieceTokenizer.train(text, 4000)):
        folder = tmp_path / tokenizer.kind
        folder.mkdir()
        for name, data in export.tokenizer_files(tokenizer, 16, export.special_ids(tokenizer)).items():
            (folder / name).write_bytes(data)
        theirs = AutoTokenizer.from_pretrained(folder)
        assert theirs(text).input_ids == tokenizer.encode(text), tokenizer.kind
        assert theirs.decode(tokenizer.encode(text)) == tokenizer.decode(tokenizer.encode(text)) == text


def test_a_sentencepiece_model_trained_with_other_settings_is_refused_not_exported_wrong():
    """A dummy prefix (sentencepiece's default, not ours) gives other ids than the fast tokenizer would."""
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS.split("\n")), model_writer=model, vocab_size=SP_VOCAB,
                                   model_type="bpe", byte_fallback=True, add_dummy_prefix=True, minloglevel=2)
    tokenizer = SentencePieceTokenizer(model.getvalue())
    with pytest.raises(UsageError, match="trained with other settings than gpt-trainer's"):
        export.tokenizer_files(tokenizer, 16, export.special_ids(tokenizer))


def test_compile_and_ddp_prefixes_are_stripped_and_the_tied_matrix_is_stored_once(tmp_path):
    from safetensors.torch import load_file

    state = checkpoint.load(ROOT / "tests" / "fixtures" / "checkpoint_v2.pt")
    torch.save({**state, "model": {f"module._orig_mod.{k}": v for k, v in state["model"].items()}}, tmp_path / "c.pt")
    assert export.main([str(ROOT / "tests" / "fixtures" / "checkpoint_v2.pt"), str(tmp_path / "plain")]) == 0
    assert export.main([str(tmp_path / "c.pt"), str(tmp_path / "prefixed")]) == 0
    plain, prefixed = (load_file(tmp_path / name / "model.safetensors") for name in ("plain", "prefixed"))
    assert sorted(plain) == sorted(prefixed) and all(torch.equal(plain[k], prefixed[k]) for k in plain)
    assert all(k.startswith("transformer.") for k in plain)  # no lm_head (tied), no mask buffer
    assert not any(k.endswith((".attn.bias", ".attn.masked_bias")) for k in plain)


# ---- bad input: exit 2, a message, nothing written ---------------------------------------------------------------
def damaged(tmp_path: Path) -> Path:
    raw = bytearray((ROOT / "tests" / "fixtures" / "checkpoint_v2.pt").read_bytes())
    raw[len(raw) // 2: len(raw) // 2 + 64] = bytes(64)  # a block of zeros in the weights
    (tmp_path / "damaged.pt").write_bytes(raw)
    return tmp_path / "damaged.pt"


def foreign(tmp_path: Path) -> Path:
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    return tmp_path / "foreign.pt"


def text_file(tmp_path: Path) -> Path:
    (tmp_path / "notes.pt").write_text("not a checkpoint", encoding="utf-8")
    return tmp_path / "notes.pt"


@pytest.mark.parametrize("make_checkpoint, message", [
    (lambda tmp: tmp / "none.pt", "no such checkpoint"),
    (foreign, "not a checkpoint written by train_single_gpu.py"),
    (text_file, "not a readable checkpoint"),
    (damaged, "is damaged"),
])
def test_a_bad_checkpoint_exits_2_and_writes_nothing(tmp_path, capsys, make_checkpoint, message):
    path = make_checkpoint(tmp_path)
    before = listing(tmp_path)
    assert export.main([str(path), str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert listing(tmp_path) == before


def test_an_out_dir_that_is_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "out").write_text("a file", encoding="utf-8")
    before = listing(tmp_path)
    assert export.main([str(ROOT / "tests" / "fixtures" / "checkpoint_v2.pt"), str(tmp_path / "out")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert listing(tmp_path) == before


def test_an_out_dir_that_is_a_link_leading_nowhere_is_refused_not_replaced(tmp_path, capsys):
    (tmp_path / "out").symlink_to(tmp_path / "missing")
    assert export.main([str(CHECKPOINT_V2), str(tmp_path / "out")]) == 2
    assert "is a symbolic link that leads nowhere" in capsys.readouterr().err
    assert (tmp_path / "out").is_symlink() and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]], ids=["plain", "--overwrite"])
def test_a_folder_without_the_export_marker_is_refused_naming_its_files(tmp_path, capsys, overwrite):
    """A README.md and a config.json of the user's (not an export's: no marker) are never replaced."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("# my project\n", encoding="utf-8")
    (out / "config.json").write_text('{"mine": true}\n', encoding="utf-8")
    before = listing(tmp_path)
    assert export.main([str(CHECKPOINT_V2), str(out), *overwrite]) == 2
    err = capsys.readouterr().err
    assert "holds files no export wrote (README.md, config.json)" in err and ".gpt-trainer-export" in err
    assert listing(tmp_path) == before


def test_a_training_run_folder_is_refused_as_the_export_target(tmp_path, capsys):
    run = RunFolder(tmp_path / "run")
    run.path.mkdir()
    run.mark()
    run.write_config({"run_name": "poems"}, 0, {})
    before = listing(tmp_path)
    assert export.main([str(CHECKPOINT_V2), str(run.path), "--overwrite"]) == 2
    assert "is a training run's folder (it holds .gpt-trainer-run)" in capsys.readouterr().err
    assert listing(tmp_path) == before


def test_an_export_folder_is_marked_with_the_files_it_wrote(tmp_path):
    assert export.main([str(CHECKPOINT_V2), str(tmp_path / "out")]) == 0
    marker = json.loads((tmp_path / "out" / export.EXPORT_MARKER).read_text())
    assert marker["files"] == sorted(p.name for p in (tmp_path / "out").iterdir() if p.name != export.EXPORT_MARKER)


def test_an_earlier_export_is_replaced_only_with_overwrite_and_the_users_files_beside_it_are_kept(tmp_path, capsys):
    out = tmp_path / "out"
    assert export.main([str(CHECKPOINT_V1), str(out)]) == 0
    (out / "mine.txt").write_text("keep me", encoding="utf-8")
    before = listing(tmp_path)
    assert export.main([str(CHECKPOINT_V2), str(out)]) == 2
    assert "exists and is not empty: it holds an earlier export. Pass --overwrite" in capsys.readouterr().err
    assert listing(tmp_path) == before
    assert export.main([str(CHECKPOINT_V2), str(out), "--overwrite"]) == 0
    assert (out / "mine.txt").read_text(encoding="utf-8") == "keep me" and "mine.txt" in capsys.readouterr().err
    assert "--wandb_run_name=fixture-v2" in (out / "README.md").read_text(encoding="utf-8")  # v1's card replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging folder left beside it


@pytest.mark.slow
def test_overwrite_removes_the_files_of_an_earlier_export_this_one_does_not_write(exported, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(exported("sentencepiece")[1], out)
    assert (out / "tokenizer.model").exists()
    assert export.main([str(CHECKPOINT_V2), str(out), "--overwrite"]) == 0  # a char export: no tokenizer.model
    assert not (out / "tokenizer.model").exists()
    assert json.loads((out / export.EXPORT_MARKER).read_text())["files"] == sorted(
        p.name for p in out.iterdir() if p.name != export.EXPORT_MARKER)


def test_a_failure_while_writing_leaves_nothing_half_written(tmp_path, monkeypatch):
    def fail(*args):
        raise RuntimeError("the disk went away")
    monkeypatch.setattr(export, "model_card", fail)  # after the weights and the tokenizer are written
    with pytest.raises(RuntimeError, match="disk went away"):
        export.export(ROOT / "tests" / "fixtures" / "checkpoint_v2.pt", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_the_export_command_of_the_package_works_as_the_export_module(tmp_path):
    fixture = str(ROOT / "tests" / "fixtures" / "checkpoint_v2.pt")

    def python_m(*argv):
        return subprocess.run([sys.executable, "-m", *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)
    a, b = tmp_path / "a" / "model", tmp_path / "b" / "model"  # the same name: the model card's title is the folder's
    module = python_m("gpt_trainer.export", fixture, str(a))
    package = python_m("gpt_trainer", "export", fixture, str(b))
    assert module.returncode == package.returncode == 0, module.stderr + package.stderr
    assert listing(a) == listing(b) and "config.json" in listing(a)  # the same files, byte for byte
    refused = python_m("gpt_trainer", "export", fixture, str(a))
    assert refused.returncode == 2 and "exists and is not empty" in refused.stderr


# ---- the round trip: export, then start a run from the export -------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_a_run_from_the_export_evaluates_as_the_checkpoint_did(exported, kind, tmp_path, cache_dir):
    """export -> --init_from the export -> its step-0 evaluation on the same text and windows: the validation loss the
    checkpoint recorded, to 1e-5 (the exported tokenizer gives our ids, the exported weights our logits)."""
    from gpt_trainer.commands import train as cli

    best, out = exported(kind)
    recorded = checkpoint.load(best)["trainer"]["best_val_loss"]
    run = tmp_path / "from-export"
    shape = [flag for flag in TINY_SHAPE if not flag.startswith(("--n_layer", "--n_head", "--n_embd"))]
    assert cli.main([f"--init_from={out}", f"--data_path={CLASSIC_POEMS}", f"--cache_dir={cache_dir}",
                     f"--output_dir={run}", *shape, "--max_steps=1", "--eval_interval=1"]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    [start] = [row["eval/loss"] for row in rows if row["step"] == 0 and "eval/loss" in row]
    assert abs(start - recorded) < 1e-5, (start, recorded)


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_the_round_trip_export_init_from_train_export_runs_in_transformers_with_our_greedy_text(exported, kind,
                                                                                                tmp_path, cache_dir):
    """export -> --init_from -> train -> export again: the second export (an hf tokenizer) has the first one's
    tokenizer and special ids, names the folder it started from by its name only, and transformers continues the demo
    prompts with our greedy tokens and text."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gpt_trainer.commands import train as cli

    _, first = exported(kind)
    run, second = RunFolder(tmp_path / "from-export"), tmp_path / "second"
    shape = [flag for flag in TINY_SHAPE if not flag.startswith(("--n_layer", "--n_head", "--n_embd"))]
    assert cli.main([f"--init_from={first}", f"--data_path={CLASSIC_POEMS}", f"--cache_dir={cache_dir}",
                     f"--output_dir={run.path}", *shape, "--max_steps=2", "--eval_interval=2"]) == 0
    assert export.main([str(run.best), str(second)]) == 0
    state, model, tokenizer = ours(run.best)
    assert state["tokenizer"]["kind"] == "hf" and state["config"]["init_from"] == str(first)
    assert not files_containing(second, str(first))  # the card names the folder it started from by its name only

    def ids_of(folder: Path) -> dict:
        config, settings = (json.loads((folder / name).read_text())
                            for name in ("config.json", "tokenizer_config.json"))
        return {**{key: config[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id")},
                **{key: settings.get(key) for key in ("bos_token", "eos_token", "pad_token", "unk_token")}}
    assert ids_of(second) == ids_of(first)
    assert json.loads((second / "tokenizer.json").read_text()) == json.loads((first / "tokenizer.json").read_text())
    theirs, their_tokenizer = AutoModelForCausalLM.from_pretrained(second).eval(), AutoTokenizer.from_pretrained(second)
    for prompt in CHINESE_PROMPTS.split(","):
        ids = tokenizer.encode(prompt)
        assert their_tokenizer(prompt).input_ids == ids
        new = state["config"]["block_size"] - len(ids)
        mine = model.generate(torch.tensor([ids]), new, temperature=0)[0].tolist()
        generated = theirs.generate(**their_tokenizer(prompt, return_tensors="pt"), do_sample=False,
                                    max_new_tokens=new)[0].tolist()
        assert generated == mine
        text = generate_text(model, tokenizer, prompt, "fp32", new, 0.0, 0, 1.0)
        assert their_tokenizer.decode(generated, skip_special_tokens=True) == text


def test_an_init_from_bert_tokenizer_exports_with_its_special_ids_and_nothing_added_around_the_text(tmp_path):
    """A BERT WordPiece tokenizer (as --init_from reads a vocab.txt): [CLS] and [SEP] are bos and eos, and
    transformers encodes a text to the ids training used, without its post-processor's [CLS] ... [SEP]."""
    from tokenizers import BertWordPieceTokenizer
    from transformers import AutoTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(set(CORPUS) - set(" \n\t"))]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tokenizer = HFTokenizer(BertWordPieceTokenizer(str(tmp_path / "vocab.txt")).to_str())
    ids = export.special_ids(tokenizer)
    assert ids == {"bos": 2, "eos": 3, "pad": 0, "unk": 1}
    folder = tmp_path / "export"
    folder.mkdir()
    for name, data in export.tokenizer_files(tokenizer, 16, ids).items():
        (folder / name).write_bytes(data)
    theirs = AutoTokenizer.from_pretrained(folder)
    assert (theirs.bos_token, theirs.eos_token, theirs.pad_token, theirs.unk_token) == ("[CLS]", "[SEP]", "[PAD]",
                                                                                        "[UNK]")
    text = CORPUS[:300]
    assert theirs(text).input_ids == tokenizer.encode(text) and tokenizer.encode(text)[0] != ids["bos"]


def test_no_exported_file_holds_an_absolute_local_path(tmp_path, cache_dir):
    """The model card names the text, the run folder and the training command's paths by their last part only: the
    planted folder's path, which the checkpoint holds, appears in no file of the export."""
    planted = tmp_path / "PLANTED-private-folder-5d1c"
    planted.mkdir()
    shutil.copy(CLASSIC_POEMS, planted / "my-poems.txt")
    cfg = parse_args([f"--data_path={planted / 'my-poems.txt'}", f"--cache_dir={cache_dir}",
                      f"--output_dir={planted / 'run'}", *TINY_SHAPE, "--max_steps=1", "--eval_interval=1"])
    make_trainer(cfg).train()
    best = RunFolder(planted / "run").best
    config = checkpoint.load(best)["config"]
    assert str(planted) in config["data_path"] and str(planted) in config["output_dir"]  # the positive control
    assert export.main([str(best), str(tmp_path / "model")]) == 0
    assert not files_containing(tmp_path / "model", planted.name)
    card = (tmp_path / "model" / "README.md").read_text(encoding="utf-8")
    assert "--data_path=my-poems.txt" in card and "--output_dir=run" in card
