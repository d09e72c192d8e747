"""The training loop: accumulation, the schedule, exact resume, skipped non-finite steps (on the device), stops, no
wait for the device between log steps, out-of-memory stops."""

import json
import math
import re
import traceback
from pathlib import Path

import pytest
import torch

from gpt_trainer.system import hardware
from gpt_trainer.system.rundir import RunFolder
from gpt_trainer.tracking import Tracker
from gpt_trainer.train import checkpoint, metrics
from gpt_trainer.train.optimizers import MuonAdamW
from gpt_trainer.train.trainer import Diverged
from tests.conftest import make_trainer


def test_accumulation_gives_the_gradients_and_loss_of_the_large_batch(tiny_cfg):
    accumulated = make_trainer(tiny_cfg("--batch_size=2", "--gradient_accumulation_steps=4"))
    large = make_trainer(tiny_cfg("--batch_size=8", "--gradient_accumulation_steps=1"))
    loss_a, loss_b = accumulated.accumulate_gradients(), large.accumulate_gradients()
    assert loss_a.item() == pytest.approx(loss_b.item(), abs=1e-5)
    for (name, pa), pb in zip(accumulated.model.named_parameters(), large.model.parameters()):
        assert torch.allclose(pa.grad, pb.grad, atol=1e-5, rtol=0), name


def test_reported_loss_is_the_mean_over_micro_batches_not_the_last(tiny_cfg):
    trainer = make_trainer(tiny_cfg("--batch_size=2", "--gradient_accumulation_steps=4"))
    batch_losses = []
    original = trainer.forward

    def spy(x, y):
        logits, loss = original(x, y)
        batch_losses.append(loss.item())
        return logits, loss
    trainer.parallel.forward = spy
    assert trainer.accumulate_gradients().item() == pytest.approx(sum(batch_losses) / 4, abs=1e-6)


def test_loss_falls_on_a_small_corpus(tiny_cfg, tmp_path):
    corpus = tmp_path / "poems.txt"  # a few poems, repeated: a model that learns anything memorises them
    corpus.write_text("静夜思\n床前明月光，疑是地上霜。举头望明月，低头思故乡。\n\n"
                      "春晓\n春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。\n\n" * 40, encoding="utf-8")
    trainer = make_trainer(tiny_cfg(f"--data_path={corpus}", "--max_steps=100", "--learning_rate=3e-3",
                                    "--warmup_steps=10", "--log_interval=20", "--eval_interval=100"))
    result = trainer.train()
    losses = [r["train/loss"] for r in result.history]
    assert losses[0] > 3.0  # near log(vocab): guessing
    assert losses[-1] < losses[0] - 1.5
    assert result.best_val_loss < losses[0] - 1.5


def stopped_and_restored(cfg, step: int):
    """Train `cfg` until a stop at `step` (what the SIGTERM handler does, at a known step), then restore a new trainer
    from the run's latest checkpoint: (the first segment's result, the restored trainer, not yet trained)."""
    first = make_trainer(cfg)

    class StopAtStep(Tracker):
        def log(self, metrics, logged_step):
            if logged_step == step:
                first.stop_signal = 15
    first.tracker = StopAtStep()
    part_one = first.train()
    second = make_trainer(cfg)
    second.restore(checkpoint.load(RunFolder(Path(cfg.output_dir)).latest))
    return part_one, second


def test_resume_continues_exactly(tiny_cfg, tmp_path):
    flags = ("--max_steps=12", "--log_interval=1", "--eval_interval=4", "--save_interval=100", "--dropout=0.1",
             "--gradient_accumulation_steps=2")
    straight = make_trainer(tiny_cfg(*flags, f"--output_dir={tmp_path / 'a'}")).train()

    cfg = tiny_cfg(*flags, f"--output_dir={tmp_path / 'b'}")
    part_one, second = stopped_and_restored(cfg, 7)
    assert part_one.interrupted_by == 15 and part_one.steps == 7
    part_two = second.train()
    resumed = [r["train/loss"] for r in part_one.history + part_two.history]
    assert resumed == [r["train/loss"] for r in straight.history]  # bit for bit
    assert second.step == 12 and second.best_val_loss == straight.best_val_loss


def optimizer_state(trainer) -> list[torch.Tensor]:
    return [t.detach().clone() for state in trainer.optimizer.state.values() for t in state.values()]


def test_a_non_finite_step_is_skipped_on_the_device_counted_and_training_goes_on(tiny_cfg):
    trainer = make_trainer(tiny_cfg("--max_steps=10"))
    first_loss, _ = trainer.train_step()
    weights, moments = [p.detach().clone() for p in trainer.model.parameters()], optimizer_state(trainer)
    forward = trainer.forward  # below: a poisoned batch
    trainer.parallel.forward = lambda x, y: (lambda out: (out[0], out[1] * float("nan")))(forward(x, y))
    loss, _ = trainer.train_step()
    health = trainer.health.read()
    assert loss.isnan() and not trainer.health.last_ok and health.bad_steps == 1 and health.bad_in_a_row == 1
    assert health.last_good == (1, first_loss.item())
    assert all(torch.equal(a, b) for a, b in zip(weights, trainer.model.parameters()))  # nothing was applied
    assert all(torch.equal(a, b) for a, b in zip(moments, optimizer_state(trainer)))  # nor counted (AdamW's step)
    trainer.parallel.forward = forward
    loss, _ = trainer.train_step()
    health = trainer.health.read()
    assert trainer.health.last_ok and health.bad_in_a_row == 0 and health.bad_steps == 1 and trainer.step == 3
    assert health.last_good == (3, loss.item())
    assert not all(torch.equal(a, b) for a, b in zip(weights, trainer.model.parameters()))


def test_an_fp16_overflow_is_the_scaler_s_skip_not_a_bad_step(tiny_cfg):
    """fp16 needs a GPU; here a CPU GradScaler whose scale overflows the fp32 gradients stands in for an fp16 overflow
    (the loss stays finite): the step is skipped on the device, the scale lowered, and no bad step counted."""
    trainer = make_trainer(tiny_cfg("--max_steps=10", "--grad_clip=0"))
    trainer.train_step()
    trainer.precision, trainer.scaler = "fp16", torch.amp.GradScaler("cpu", init_scale=2.0**126)
    weights, moments = [p.detach().clone() for p in trainer.model.parameters()], optimizer_state(trainer)
    loss, grad_norm = trainer.train_step()
    assert loss.isfinite() and not grad_norm.isfinite() and trainer.scaler.get_scale() == 2.0**125
    assert all(torch.equal(a, b) for a, b in zip(weights, trainer.model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(moments, optimizer_state(trainer)))
    assert trainer.health.last_ok and trainer.health.read().bad_steps == 0


def stop_after_step(trainer, step: int, signum: int = 15) -> None:
    """Do what the SIGTERM handler does, during training step `step`."""
    original = trainer.train_step

    def train_step():
        if trainer.step + 1 == step:
            trainer.stop_signal = signum
        return original()
    trainer.train_step = train_step


def test_one_process_stops_after_the_current_step_between_log_steps(tiny_cfg):
    trainer = make_trainer(tiny_cfg("--max_steps=20", "--log_interval=10", "--eval_interval=10"))
    stop_after_step(trainer, 3)
    result = trainer.train()
    assert result.interrupted_by == 15 and result.steps == 3 and trainer.checkpointer.saved_at == 3


@pytest.mark.parametrize("save_interval, stopped_at", [(100, 4), (3, 3)])
def test_max_bad_steps_is_checked_where_the_counts_are_read_and_no_diverged_state_is_saved(tiny_cfg, save_interval,
                                                                                         stopped_at):
    """The counts stay on the device between log steps: --max_bad_steps 2 is seen at the log step (4) after the second
    bad step in a row (3), or at a save before it, which never writes the diverged state."""
    trainer = make_trainer(tiny_cfg("--max_steps=20", "--log_interval=4", "--eval_interval=100",
                                    f"--save_interval={save_interval}", "--max_bad_steps=2"))
    forward = trainer.forward
    trainer.parallel.forward = lambda x, y: (lambda out: (out[0], out[1] * (float("nan") if trainer.step else 1)))(
        forward(x, y))  # every step after the first is bad
    with pytest.raises(Diverged) as failure:
        trainer.train()
    assert (failure.value.step, failure.value.bad_in_a_row) == (stopped_at, stopped_at - 1)
    assert failure.value.last_good[0] == 1
    assert not RunFolder(Path(trainer.cfg.output_dir)).latest.exists()


def test_a_stop_between_log_steps_after_the_limit_was_reached_saves_nothing_and_ends_as_diverged(tiny_cfg):
    """The save a stop makes reads the counts first: the run ends as diverged, as it would have at the next log step."""
    trainer = make_trainer(tiny_cfg("--max_steps=20", "--log_interval=10", "--eval_interval=100", "--max_bad_steps=2"))
    forward = trainer.forward
    trainer.parallel.forward = lambda x, y: (lambda out: (out[0], out[1] * (float("nan") if trainer.step else 1)))(
        forward(x, y))
    stop_after_step(trainer, 3)
    with pytest.raises(Diverged) as failure:
        trainer.train()
    assert (failure.value.step, failure.value.bad_in_a_row) == (3, 2)
    assert not RunFolder(Path(trainer.cfg.output_dir)).latest.exists()


# ---- no step waits for the device unless it logs, evaluates or saves -----------------------------------------------
# What can make the host wait for a GPU: reading a tensor's value into Python, copying it to the host, and waiting
# outright. On a GPU `torch.cuda.set_sync_debug_mode("error")` catches each of them (tests/test_gpu.py); here every
# tensor is on the CPU, where nothing waits, so the calls themselves are counted instead.
WAITING_CALLS = [(torch.Tensor, name) for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__",
                                                  "cpu", "numpy", "nonzero")] + [
    (torch.cuda, "synchronize"), (hardware, "synchronize"), (metrics, "synchronize")]


def train_watching_quiet_steps(trainer, watch, from_step: int = 1) -> None:
    """Train to --max_steps, with watch(True) from the start of each step that neither logs, evaluates nor saves (from
    step `from_step` on) until the start of the next step, and watch(False) around the others. Give the run
    --log_interval, --eval_interval and --save_interval equal to --max_steps, and no epoch end: then only the last
    step reads the device."""
    original = trainer.train_step

    def train_step():
        watch(from_step <= trainer.step + 1 < trainer.plan.total_steps)
        return original()
    trainer.train_step = train_step
    try:
        trainer.train()
    finally:
        watch(False)
    assert trainer.batches.epoch == 0  # an epoch's end would evaluate


def waits_in_quiet_steps(trainer, monkeypatch) -> list[str]:
    """The waiting calls made in quiet steps, each as the call and where it was made. A counting stand-in for CUDA's
    sync debug mode (no GPU here): every call in WAITING_CALLS is counted while `watch` is on."""
    watching, calls = [False], []

    def counted(name, original):
        def call(*args, **kwargs):
            if watching[0]:
                caller = traceback.extract_stack(limit=2)[0]
                calls.append(f"{name} at {Path(caller.filename).name}:{caller.lineno}")
            return original(*args, **kwargs)
        return call
    for owner, name in WAITING_CALLS:
        monkeypatch.setattr(owner, name, counted(name, getattr(owner, name)))
    train_watching_quiet_steps(trainer, lambda on: watching.__setitem__(0, on))
    monkeypatch.undo()
    return calls


QUIET = ("--max_steps=6", "--log_interval=6", "--eval_interval=6", "--save_interval=6")


def test_steps_that_neither_log_evaluate_nor_save_never_wait_for_the_device(tiny_cfg, monkeypatch):
    """Gradient accumulation, dropout, clipping, and a bad step among them (skipped on the device): no value is read
    into Python, nothing is copied back, nothing waits (the last step logs, evaluates and saves: it may)."""
    trainer = make_trainer(tiny_cfg(*QUIET, "--gradient_accumulation_steps=2", "--dropout=0.1", "--grad_clip=1.0"))
    forward = trainer.forward
    trainer.parallel.forward = lambda x, y: (lambda out: (out[0], out[1] * (math.nan if trainer.step == 2 else 1)))(
        forward(x, y))
    assert waits_in_quiet_steps(trainer, monkeypatch) == []
    assert trainer.health.read().bad_steps == 1 and trainer.step == 6


def test_the_counting_stand_in_finds_a_planted_item(tiny_cfg, monkeypatch):
    """The positive control of the test above: one `.item()` planted in the step is found, with where it was made."""
    trainer = make_trainer(tiny_cfg(*QUIET))
    accumulate = trainer.accumulate_gradients

    def planted():
        loss = accumulate()
        loss.item()  # planted
        return loss
    trainer.accumulate_gradients = planted
    calls = waits_in_quiet_steps(trainer, monkeypatch)
    assert len(calls) == 5 and all(re.fullmatch(r"item at test_trainer\.py:\d+", call) for call in calls), calls


# ---- out of memory: PyTorch's own OutOfMemoryError, raised where a GPU would raise it (no GPU runs here) ------------
def run_out_of_memory_at(monkeypatch, target, name: str, call: int) -> None:
    """Make target.name raise torch.OutOfMemoryError on its `call`-th call in training (not evaluation)."""
    original, calls = getattr(target, name), []

    def failing(self, *args, **kwargs):
        if getattr(self, "training", True):
            calls.append(1)
            if len(calls) == call:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return original(self, *args, **kwargs)
    monkeypatch.setattr(target, name, failing)


def losses_by_step(out) -> dict:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def test_out_of_memory_saves_the_last_good_state_and_says_what_to_change(tiny_argv, tmp_path, monkeypatch, capsys):
    from gpt_trainer.commands.train import main
    from gpt_trainer.model.gpt import GPT

    argv = tiny_argv("--max_steps=6", "--log_interval=1", "--eval_interval=100", "--save_interval=100")
    reference = tiny_argv("--max_steps=6", "--log_interval=1", "--eval_interval=100", "--save_interval=100",
                          f"--output_dir={tmp_path / 'reference'}")
    assert main(reference) == 0
    with monkeypatch.context() as patch:
        run_out_of_memory_at(patch, GPT, "forward", 4)
        assert main(argv) == 1
    err = capsys.readouterr().err
    assert "out of memory in training step 4: model tiny with overrides (2 layers x 32 wide, 2 heads)" in err
    assert "micro-batch 4 x block 16 tokens" in err
    for fix in ("--batch_size auto", "--batch_size 2 --gradient_accumulation_steps 2", "--block_size",
                "--model_size", "--resume"):
        assert fix in err
    assert "Traceback" not in err
    out = tmp_path / "out"
    saved = checkpoint.load(RunFolder(out).latest)
    assert saved["trainer"]["step"] == 3 and saved["sampler"]["position"] == 3 * 4  # the failed step's windows unused
    assert main([*argv, "--resume"]) == 0
    assert losses_by_step(out) == pytest.approx(losses_by_step(tmp_path / "reference"), abs=1e-6)


def test_out_of_memory_while_the_weights_change_saves_nothing(tiny_argv, tmp_path, monkeypatch, capsys):
    from gpt_trainer.commands.train import main

    run_out_of_memory_at(monkeypatch, MuonAdamW, "step", 2)
    assert main(tiny_argv("--max_steps=6", "--save_interval=100", "--eval_interval=100")) == 1
    err = capsys.readouterr().err
    assert "out of memory in training step 2" in err and "Nothing was saved" in err
    assert not RunFolder(tmp_path / "out").latest.exists()


def test_each_prompt_samples_from_its_own_seeded_stream(tiny_cfg):
    trainer = make_trainer(tiny_cfg("--sample_tokens=12"))
    with torch.no_grad():  # the weakest model: the same uniform distribution after any context
        for p in trainer.model.parameters():
            p.zero_()
    rng_before = torch.get_rng_state()
    first, second = trainer.sample("春江"), trainer.sample("往事")
    assert first[2:] != second[2:]  # a weak model once continued every prompt with the same draws
    assert trainer.sample("春江") == first  # still seeded: the same prompt at the same step gives the same text
    assert torch.equal(torch.get_rng_state(), rng_before)  # and the training random stream is untouched


def test_a_warmup_as_long_as_the_run_is_shortened_to_a_tenth_with_a_note(tiny_argv, tmp_path, capsys):
    from gpt_trainer.commands.train import main

    assert main(tiny_argv("--max_steps=40", "--warmup_steps=100", "--log_interval=1")) == 0
    err = capsys.readouterr().err
    assert "--warmup_steps 100 is not shorter than the run (40 steps)" in err and "over 4 steps" in err
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["warmup_steps"] == 4
    rows = [json.loads(row) for row in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    for name, peak in (("train/learning_rate", 3e-3), ("train/muon_learning_rate", 0.02)):  # AdamW's groups, Muon's
        assert max(row[name] for row in rows if name in row) == pytest.approx(peak, rel=1e-3)  # the peak is reached


def test_every_evaluation_sets_val_best_and_best_pt_and_the_line_shows_it(tiny_argv, tmp_path, capsys):
    from gpt_trainer.commands.train import main

    # --eval_interval beyond the run: only epoch ends evaluate, and they alone must drive val, best and best.pt
    assert main(tiny_argv("--epochs=3", "--eval_interval=100000", "--log_interval=1", "--learning_rate=3e-3")) == 0
    out = capsys.readouterr().out
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r["eval/loss"] for r in rows if "eval/loss" in r}
    assert len(evals) >= 3 and set(evals) >= {r["step"] for r in rows if "epoch/val_loss" in r}
    for step, loss in evals.items():  # the progress line of an evaluation step shows that evaluation
        assert re.search(rf"^step {step} \| .* \| val {loss:.4f} \|", out, re.M), step
    best = min(evals.values())
    assert f"best val loss {best:.4f}" in out
    saved = checkpoint.load(RunFolder(tmp_path / "out").best)
    assert saved["trainer"]["best_val_loss"] == pytest.approx(best) and evals[saved["trainer"]["step"]] == best
