import re
import shlex
import sys
from pathlib import Path

import pytest

from gpt_trainer.config import MODEL_PRESETS, parse_args
from gpt_trainer.errors import UsageError

ROOT = Path(__file__).resolve().parents[1]


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


def test_the_readme_flag_tables_are_the_parser_s():
    sys.path.insert(0, str(ROOT / "tools"))
    import readme_flags

    for name in readme_flags.READMES:
        text = (ROOT / name).read_text(encoding="utf-8")
        assert readme_flags.with_current_table(text) == text, f"{name} drifted: run ./dev.sh flags"
        drifted = text.replace("| `--dropout` | `0.1` |", "| `--dropout` | `0.2` |")  # a hand edit: caught
        assert readme_flags.with_current_table(drifted) == text


@pytest.mark.parametrize("report_to, trackers", [
    ("all", ["tensorboard", "wandb"]), ("none", []), ("tensorboard,swanlab", ["tensorboard", "swanlab"]),
    ("TensorBoard, wandb ,swanlab", ["tensorboard", "wandb", "swanlab"]), ("wandb,wandb", ["wandb"]),
])
def test_report_to_is_a_list_of_trackers(report_to, trackers):
    assert parse_args([f"--report_to={report_to}"]).trackers() == trackers


@pytest.mark.parametrize("report_to, named", [("tensorbord", "'tensorbord'"), ("all,swanlab", "'all'"),
                                              ("none,wandb", "'none'"), (",", "")])
def test_report_to_refuses_unknown_names_with_the_known_ones(report_to, named):
    with pytest.raises(UsageError, match=f"is not a list of trackers \\({named}\\). Give a comma-separated list of "
                                         f"tensorboard, wandb, swanlab, or all"):
        parse_args([f"--report_to={report_to}"])


def test_the_model_label_says_when_the_preset_shape_was_changed():
    assert parse_args(["--model_size=small"]).model_label() == "small (12 layers x 768 wide, 12 heads)"
    assert parse_args(["--n_layer=4", "--n_head=4", "--n_embd=128"]).model_label() == \
        "tiny with overrides (4 layers x 128 wide, 4 heads)"


def readme_training_commands(name: str) -> list[list[str]]:
    """The flags of every `train_single_gpu.py` command in a README's code blocks (continuation lines joined)."""
    blocks = re.findall(r"^```bash\n(.*?)^```", (ROOT / name).read_text(encoding="utf-8"), re.S | re.M)
    lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
    commands = [line.split("train_single_gpu.py", 1)[1].split(" #")[0]
                for line in lines if "train_single_gpu.py" in line]
    return [shlex.split(c) for c in commands if "..." not in c and "$" not in c]  # `...` and `$F`: placeholders


def test_every_training_command_in_the_readmes_parses_and_both_languages_show_the_same():
    english, chinese = readme_training_commands("README.md"), readme_training_commands("README.zh-CN.md")
    assert len(english) >= 8 and english == chinese
    for argv in english:
        parse_args(argv)  # a misspelt or removed flag raises a UsageError naming it
    with pytest.raises(UsageError, match="--epoch"):  # the control: a typo of the kind this catches
        parse_args([*english[0], "--epoch=5"])
