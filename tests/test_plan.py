"""The run plan: every derived value resolved once, recorded the same way everywhere, and the learning rate as a
function of the plan and the step."""

import json
import re

import pytest
import torch

from gpt_trainer.commands.train import main
from gpt_trainer.config import given_flags, parse_args
from gpt_trainer.errors import UsageError
from gpt_trainer.plan import resolve
from gpt_trainer.plan.resolve import keep_run_values
from gpt_trainer.plan.run_plan import fit_warmup, lr_multiplier
from gpt_trainer.system.distributed import World
from tests.conftest import CLASSIC_POEMS, plan_for


def test_learning_rate_warms_up_then_decays_to_the_minimum():
    assert lr_multiplier(0, warmup=10, total=100, min_ratio=0.1) == pytest.approx(0.1)
    assert lr_multiplier(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert lr_multiplier(55, 10, 100, 0.1) == pytest.approx(0.55)  # half-way through the decay
    assert lr_multiplier(100, 10, 100, 0.1) == pytest.approx(0.1)



@pytest.mark.parametrize("total, fitted, words", [
    (5, 0, "(5 steps), so the peak learning rate would never be reached; a tenth of the run is under one step, so it "
           "starts at the peak learning rate, with no warm-up."),
    (12, 1, "(12 steps), so the peak learning rate would never be reached; warming up over 1 step (a tenth of"),
    (1, 0, "not shorter than the run (1 step), so"),
    (20_000, 2_000, "warming up over 2,000 steps (a tenth of the run) instead."),
])
def test_a_warmup_as_long_as_the_run_is_shortened_and_said_right_for_0_1_and_n_steps(total, fitted, words):
    warmup, note = fit_warmup(total + 10, total)
    assert warmup == fitted and words in note
    assert not re.search(r"\b1 steps|over 0 steps", note)

def test_the_plan_resolves_what_the_flags_leave_open_and_the_configuration_keeps_what_was_asked(tiny_cfg):
    cfg = tiny_cfg("--batch_size=auto", "--global_batch_size=64", "--max_steps=30", "--warmup_steps=50")
    plan = plan_for(cfg)
    assert (plan.micro_batch, plan.accumulation, plan.global_batch) == (16, 4, 64)  # the CPU's auto micro-batch
    assert plan.tokens_per_step == 64 * 16 and plan.total_steps == 30
    assert plan.warmup_steps == 3 and "over 3 steps" in plan.warmup_note  # a tenth of the run, with the note
    assert (cfg.batch_size, cfg.gradient_accumulation_steps, cfg.warmup_steps) == (None, 1, 50)
    assert plan.flags()["batch_size"] == 16 and plan.flags()["warmup_steps"] == 3


def test_epochs_set_the_step_budget_from_the_windows_of_one_pass(tiny_cfg):
    one, two = plan_for(tiny_cfg("--epochs=1")), plan_for(tiny_cfg("--epochs=2", "--gradient_accumulation_steps=2"))
    windows = (one.train_tokens - 1) // 16  # block 16: non-overlapping windows in the training tokens
    assert one.total_steps == -(-windows // 4)  # micro-batch 4, rounded up
    assert two.total_steps == -(-2 * windows // 8)


def test_config_json_the_checkpoint_and_the_dry_run_describe_the_run_alike(tiny_argv, tmp_path, capsys):
    flags = ("--max_steps=3", "--eval_interval=3", "--batch_size=auto", "--wandb_run_name=same")
    assert main(tiny_argv(*flags, "--dry_run", f"--output_dir={tmp_path / 'dry'}")) == 0
    dry = json.loads(capsys.readouterr().out)
    assert main(tiny_argv(*flags)) == 0
    recorded = json.loads((tmp_path / "out" / "config.json").read_text())
    segments = recorded.pop("segments")
    assert [s["from_step"] for s in segments] == [0]
    saved = torch.load(tmp_path / "out" / "checkpoints" / "latest.pt", weights_only=True)
    assert saved["config"] == recorded
    assert {**dry, "output_dir": recorded["output_dir"], "dry_run": False} == recorded
    assert recorded["batch_size"] == 16 and recorded["global_batch_size"] == 16 and recorded["run_name"] == "same"


def test_a_resumed_run_follows_the_schedule_of_its_new_flags(tiny_argv, tmp_path):
    """The learning rate after a resume with a new peak is the new plan's at each step, as in a run that had those
    flags from the start (no scheduler state is carried over)."""
    def rates(out):
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["train/learning_rate"] for r in rows if "train/learning_rate" in r}

    common = ("--log_interval=1", "--eval_interval=100", "--warmup_steps=2")
    assert main(tiny_argv(*common, "--max_steps=4", "--learning_rate=1e-3")) == 0
    assert main(tiny_argv(*common, "--max_steps=8", "--learning_rate=2e-3", "--resume")) == 0
    assert main(tiny_argv(*common, "--max_steps=8", "--learning_rate=2e-3", f"--output_dir={tmp_path / 'ref'}")) == 0
    resumed, reference = rates(tmp_path / "out"), rates(tmp_path / "ref")
    assert {s: resumed[s] for s in range(5, 9)} == {s: reference[s] for s in range(5, 9)}
    assert resumed[4] != reference[4]  # the first segment ran on its own schedule


def test_a_run_announces_its_memory_plan_in_two_lines(tiny_argv, capsys):
    assert main(tiny_argv("--max_steps=1", "--eval_interval=1")) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("memory")]
    assert len(lines) == 2 and lines[0].startswith("memory per GPU (estimated: fp32, micro-batch")
    assert lines[1].endswith("on the CPU: not checked")


def test_on_resume_the_flags_not_given_keep_the_run_s_text_tokenizer_and_shape(tiny_cfg):
    """What a bare --resume keeps, from a real run's description (the one its checkpoint and config.json hold)."""
    recorded = plan_for(tiny_cfg("--tokenizer=sentencepiece", "--vocab_size=2000", "--n_layer=3",
                                 "--learning_rate=1e-3")).describe()

    def resumed(*argv: str):
        cfg, kept = keep_run_values(parse_args(["--resume", *argv]), recorded, given_flags(["--resume", *argv]))
        return cfg, kept

    bare, kept = resumed()
    assert (bare.data_path, bare.corpus, bare.tokenizer, bare.vocab_size) == (str(CLASSIC_POEMS), None,
                                                                              "sentencepiece", 2000)
    assert (bare.n_layer, bare.n_head, bare.n_embd, bare.block_size, bare.learning_rate) == (3, 2, 32, 16, 1e-3)
    assert {"data_path", "tokenizer", "n_layer", "block_size", "cache_dir", "seed"} <= kept
    # a flag of a group given replaces the group: other text (the run's --data_path is not mixed in) ...
    assert resumed("--corpus=tang")[0].data_path is None
    # ... another tokenizer, another preset (its layers, heads and width; the run's block_size stays)
    assert resumed("--tokenizer=char")[0].tokenizer == "char"
    small = resumed("--model_size=small")[0]
    assert (small.n_layer, small.n_head, small.n_embd, small.block_size) == (12, 12, 768, 16)
    assert resumed("--n_layer=4")[0].n_layer == 4 and resumed("--n_layer=4")[0].n_embd == 32  # one flag: itself


def test_what_a_description_resolved_is_kept_as_the_flag_that_gives_it(tiny_cfg):
    """The description records the corpus's name and the vocabulary's size: a named corpus is kept as its --corpus
    (no download attempt: song_ci from the cache, or the embedded poems the run fell back to), a char vocabulary's
    size is no --vocab_size; with --init_from, the folder sets layers, heads and width."""
    recorded = {**plan_for(tiny_cfg()).describe(), "data_path": None, "corpus": "builtin"}
    cfg, kept = keep_run_values(parse_args(["--resume"]), recorded, frozenset({"resume"}))
    assert cfg.corpus == "builtin" and cfg.vocab_size == 4000 and "vocab_size" not in kept
    with_folder = {**recorded, "init_from": "/models/gpt2", "tokenizer": "hf"}
    cfg, kept = keep_run_values(parse_args(["--resume"]), with_folder, frozenset({"resume"}))
    assert (cfg.init_from, cfg.tokenizer, cfg.block_size) == ("/models/gpt2", "hf", 16)
    assert not kept & {"model_size", "n_layer", "n_head", "n_embd"}


def test_a_recorded_value_no_flag_takes_is_refused_by_name(tiny_cfg):
    recorded = {**plan_for(tiny_cfg()).describe(), "n_layer": "2", "tokenizer": "bpe"}
    with pytest.raises(UsageError, match=r"the run records (n_layer '2', tokenizer 'bpe'|tokenizer 'bpe', n_layer "
                                         r"'2'), which no flag of that name takes"):
        keep_run_values(parse_args(["--resume"]), recorded, frozenset({"resume"}))


# ---- the resolve step: every conflict between flags is refused before the processes meet or any text is read -------
# Each case runs the training command on a corpus that does not exist (reading it would stop the run with "does not
# exist"), and with WORLD_SIZE=2 where the number of processes matters, MASTER_ADDR unset (joining the others would
# stop the run with "MASTER_ADDR is not set"): the refusal the user reads is the flags' only if it came first.
REFUSED_BEFORE_READING = {
    "--global_batch_size with --gradient_accumulation_steps": (
        1, ["--global_batch_size=8", "--gradient_accumulation_steps=2"],
        "--global_batch_size sets --gradient_accumulation_steps: give one of them, not both."),
    "the same with --dry_run": (
        1, ["--global_batch_size=8", "--gradient_accumulation_steps=2", "--dry_run"],
        "--global_batch_size sets --gradient_accumulation_steps: give one of them, not both."),
    "--global_batch_size not a multiple of --batch_size": (
        1, ["--global_batch_size=10", "--batch_size=4"],
        "--global_batch_size 10 is not a multiple of --batch_size 4 x 1 process(es): use a multiple of 4, or "
        "--batch_size auto to pick a micro-batch that divides it."),
    "--global_batch_size that 2 processes cannot share": (
        2, ["--global_batch_size=9", "--batch_size=auto"],
        "--global_batch_size 9 does not divide among 2 processes: use a multiple of 2."),
    "--global_batch_size not a multiple of --batch_size x 2 processes": (
        2, ["--global_batch_size=12", "--batch_size=4"],
        "--global_batch_size 12 is not a multiple of --batch_size 4 x 2 process(es): use a multiple of 8, or "
        "--batch_size auto to pick a micro-batch that divides it."),
}


def processes(monkeypatch, count: int) -> None:
    """This process as rank 0 of `count` started without a launcher's rendezvous (MASTER_ADDR, MASTER_PORT unset)."""
    monkeypatch.setenv("WORLD_SIZE", str(count))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("case", REFUSED_BEFORE_READING)
def test_a_conflict_between_flags_is_refused_before_any_text_is_read_or_the_processes_meet(case, tiny_argv, tmp_path,
                                                                                          monkeypatch, capsys):
    count, flags, message = REFUSED_BEFORE_READING[case]
    processes(monkeypatch, count)
    assert main(tiny_argv(f"--data_path={tmp_path / 'not-written-yet.txt'}", *flags)) == 2
    assert capsys.readouterr().err == f"error: {message}\n"
    assert not (tmp_path / "out").exists()


def test_fsdp_with_fp16_is_refused_before_any_text_is_read_or_the_processes_meet(tiny_argv, tmp_path, monkeypatch,
                                                                                capsys):
    """fp16 exists only on GPUs: a device whose precision resolves to fp16 is stood in for (no GPU here)."""
    processes(monkeypatch, 2)
    monkeypatch.setattr(resolve, "resolve_precision", lambda cfg, device: "fp16")
    assert main(tiny_argv(f"--data_path={tmp_path / 'not-written-yet.txt'}", "--parallel=fsdp")) == 2
    assert "--parallel fsdp trains in bf16 or fp32" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_resolve_step_keeps_the_run_s_values_takes_the_launcher_s_processes_and_checks_them_together(tiny_cfg):
    """On --resume the flags not given keep the recorded values, and the batch flags are checked against the number
    of processes with them: a micro-batch of 4 fits a global batch of 16 on two processes, not one of 12."""
    recorded = plan_for(tiny_cfg("--learning_rate=1e-3")).describe()
    two = World(0, 0, 2)

    def resolved(global_batch: int) -> resolve.Resolved:
        argv = ["--resume", "--batch_size=4", f"--global_batch_size={global_batch}"]
        return resolve.resolve(parse_args(argv), given_flags(argv), two, recorded)

    run = resolved(16)
    assert (run.cfg.learning_rate, run.cfg.data_path, run.cfg.n_layer) == (1e-3, str(CLASSIC_POEMS), 2)
    assert {"learning_rate", "data_path"} <= run.kept and "gradient_accumulation_steps" not in run.kept
    assert (run.world, run.device.type, run.precision) == (two, "cpu", "fp32")
    with pytest.raises(UsageError, match=r"--global_batch_size 12 is not a multiple of --batch_size 4 x 2 process"):
        resolved(12)
