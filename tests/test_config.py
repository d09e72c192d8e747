import re

import pytest

from gpt_trainer.config import MODEL_PRESETS, parse_args
from gpt_trainer.errors import UsageError


@pytest.mark.parametrize("argv, expected", [
    (["--bf16"], True), (["--bf16=True"], True), (["--bf16=true"], True), (["--bf16=1"], True),
    (["--bf16=false"], False), (["--bf16=False"], False), (["--bf16=0"], False), (["--bf16", "no"], False), ([], False),
])
def test_boolean_flags_accept_what_a_sweep_agent_sends(argv, expected):
    assert parse_args(argv).bf16 is expected


def test_flags_accept_equals_form_and_exponent_floats():
    cfg = parse_args(["--batch_size=32", "--learning_rate=1e-05", "--model_size=small", "--resume=somewhere"])
    assert (cfg.batch_size, cfg.learning_rate, cfg.model_size, cfg.resume) == (32, 1e-5, "small", "somewhere")


def test_bare_resume_means_latest():
    assert parse_args(["--resume"]).resume == "latest"
    assert parse_args([]).resume is None


@pytest.mark.parametrize("size", list(MODEL_PRESETS))
def test_presets_fill_the_shape_and_overrides_win(size):
    cfg = parse_args([f"--model_size={size}"])
    preset = MODEL_PRESETS[size]
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd) == (preset.n_layer, preset.n_head, preset.n_embd)
    assert parse_args([f"--model_size={size}", "--n_layer=3"]).n_layer == 3


@pytest.mark.parametrize("argv, message", [
    (["--model_size=huge"], "invalid choice: 'huge'"),
    (["--bf16", "--fp16"], "--bf16 and --fp16 contradict"),
    (["--n_embd=100", "--n_head=6"], "n_embd=100 is not divisible by n_head=6"),
    (["--batch_size=0"], "--batch_size must be at least 1"),
    (["--gradient_accumulation_steps=0"], "--gradient_accumulation_steps must be at least 1"),
    (["--bf16=maybe"], "expected a boolean"),
    (["--train_split=1.5"], "--train_split must be in (0, 1)"),
])
def test_bad_flags_raise_a_usage_error_naming_the_problem(argv, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        parse_args(argv)


def test_use_chinese_picks_chinese_poetry_and_refuses_other_text():
    assert parse_args(["--use_chinese", "--corpus=song_ci"]).corpus == "song_ci"
    for other in (["--corpus=shakespeare"], ["--data_path=mine.txt"]):
        named = other[0].replace("=", " ")
        with pytest.raises(UsageError, match=f"--use_chinese asks for the Chinese poetry corpus, but {named}"):
            parse_args(["--use_chinese", *other])


def test_the_model_label_says_when_the_preset_shape_was_changed():
    assert parse_args(["--model_size=small"]).model_label() == "small (12 layers x 768 wide, 12 heads)"
    assert parse_args(["--n_layer=4", "--n_head=4", "--n_embd=128"]).model_label() == \
        "tiny with overrides (4 layers x 128 wide, 4 heads)"


def test_init_from_takes_the_folders_tokenizer_and_an_explicit_other_one_is_refused():
    assert parse_args(["--init_from", "some/folder"]).tokenizer == "hf"
    assert parse_args([]).tokenizer == "char"
    for other in ("char", "sentencepiece"):
        with pytest.raises(UsageError, match=f"--tokenizer {other} asks for another: drop --tokenizer"):
            parse_args(["--init_from", "some/folder", "--tokenizer", other])


def test_the_training_help_names_every_other_command():
    from gpt_trainer.__main__ import COMMANDS
    from gpt_trainer.config import OTHER_COMMANDS, build_parser

    assert build_parser().epilog == OTHER_COMMANDS
    assert set(re.findall(r"(?:: |; )([a-z]+)", OTHER_COMMANDS)) == set(COMMANDS)


# ---- --arch ---------------------------------------------------------------------------------------------------------
def test_every_architecture_the_flag_offers_is_a_model_and_llama_with_muon_is_the_default():
    from gpt_trainer.config import ARCHITECTURES
    from gpt_trainer.model.gpt import ARCHS

    assert list(ARCHITECTURES) == list(ARCHS)
    assert (parse_args([]).arch, parse_args([]).optimizer) == ("llama", "muon")
    assert parse_args(["--arch=gpt2"]).arch == "gpt2"
    assert parse_args(["--arch=gpt2", "--model_size=small"]).model_label() == \
        "small gpt2 (12 layers x 768 wide, 12 heads)"
    assert parse_args(["--model_size=small"]).model_label() == "small (12 layers x 768 wide, 12 heads)"


@pytest.mark.parametrize("argv, message", [
    (["--arch=gpt3"], "argument --arch: invalid choice: 'gpt3' (choose from 'gpt2', 'llama')"),
    (["--arch=llama", "--n_head=4", "--n_embd=36"], "gives heads of 9, an odd number"),
])
def test_a_bad_arch_exits_2_with_a_sentence_and_writes_nothing(tiny_argv, tmp_path, capsys, argv, message):
    from gpt_trainer.commands.train import main

    assert main(tiny_argv(*argv)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    assert main(tiny_argv("--arch=gpt2", "--n_head=4", "--n_embd=36", "--dry_run")) == 0  # odd heads: llama's alone


def files_of(folder) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_resumed_run_keeps_its_arch_and_another_given_is_refused_before_anything_changes(tiny_argv, tmp_path,
                                                                                          capsys):
    import json

    from gpt_trainer.commands.train import main
    from gpt_trainer.train import checkpoint

    out = tmp_path / "out"
    assert main(tiny_argv("--arch=llama", "--max_steps=2", "--eval_interval=2")) == 0
    assert main(tiny_argv("--resume", "--max_steps=3", "--eval_interval=3")) == 0  # a bare --resume
    saved = checkpoint.load(out / "checkpoints" / "latest.pt")
    assert saved["config"]["arch"] == "llama" and saved["trainer"]["step"] == 3
    assert "blocks.0.mlp.gate.weight" in saved["model"]
    assert json.loads((out / "config.json").read_text())["arch"] == "llama"
    before = files_of(out)
    capsys.readouterr()
    assert main(tiny_argv("--resume", "--arch=gpt2", "--max_steps=4")) == 2
    err = capsys.readouterr().err
    assert "the model shape differs (arch: checkpoint 'llama', now 'gpt2')" in err and "--arch" in err
    assert files_of(out) == before


def test_a_run_recorded_before_arch_existed_is_a_gpt2_whatever_the_default():
    from gpt_trainer.model.gpt import GPTConfig
    from gpt_trainer.plan.resolve import recorded_flags

    old = {"block_size": 16, "n_layer": 2, "n_head": 2, "n_embd": 32}  # a checkpoint's config from before --arch
    assert recorded_flags(old)["arch"] == "gpt2" and GPTConfig.from_flags(old, 50).arch == "gpt2"
    assert recorded_flags({**old, "arch": "llama"})["arch"] == "llama"
