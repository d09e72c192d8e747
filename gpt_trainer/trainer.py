"""The training loop: sample a batch, accumulate gradients over micro-batches, clip, step, schedule; evaluate, save
and report at intervals (decided in one place: should_log / should_eval / should_save). Nothing in the per-step path
waits for the GPU except the periodic report."""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from . import checkpoint
from .compiling import compile_or_eager, wants_compile
from .config import TrainConfig
from .data import EpochSampler, TokenData, gather_windows, share_of, steps_for, to_device, validation_windows
from .distributed import World, all_reduce
from .errors import RunStopped
from .hardware import allow_tf32, autocast, empty_cache, gpu_memory_metrics, memory_in_use, peak_tflops
from .metrics import ThroughputWindow
from .model import GPT, GPTConfig
from .sample import generate_text
from .tracking import Tracker


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))  # capped: an early, diverging loss must not overflow to inf


def lr_multiplier(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up to the peak, then cosine decay to min_ratio of it at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def fit_warmup(cfg: TrainConfig, total_steps: int) -> str | None:
    """A warm-up as long as the run never reaches the peak learning rate: shorten it to a tenth of the run (the one
    rule, documented in the README) and return the note saying so."""
    if cfg.warmup_steps < total_steps:
        return None
    asked, cfg.warmup_steps = cfg.warmup_steps, total_steps // 10
    return (f"note: --warmup_steps {asked} is not shorter than the run ({total_steps} steps), so the peak learning "
            f"rate would never be reached; warming up over {cfg.warmup_steps} steps (a tenth of the run) instead.")


@dataclass
class TrainResult:
    steps: int
    best_val_loss: float
    history: list[dict] = field(default_factory=list)  # one entry per report: step, loss, lr, ...
    evals: list[tuple[int, float]] = field(default_factory=list)  # (step, validation loss) of every evaluation
    interrupted_by: int | None = None  # signal number when a signal stopped the run
    seconds: float = 0.0  # wall time of the loop (evaluations and saving included)


class Trainer:
    def __init__(self, cfg: TrainConfig, data: TokenData, device: torch.device, precision: str,
                 tracker: Tracker | None = None, sample_prompts: list[str] = (), world: World = World()):
        self.cfg, self.data, self.device, self.precision, self.world = cfg, data, device, precision, world
        self.tracker = tracker or Tracker()
        self.sample_prompts = list(sample_prompts)  # sampled at every evaluation for the trackers
        torch.manual_seed(cfg.seed)
        self.model = GPT(GPTConfig(data.tokenizer.vocab_size, cfg.block_size, cfg.n_layer, cfg.n_head, cfg.n_embd,
                                   cfg.dropout)).to(device)
        if world.rank:  # every process starts from the same weights (seeded above) but draws its own dropout masks
            torch.manual_seed(cfg.seed + world.rank)
        allow_tf32(device)
        compiled, self.compile_seconds = self.model, None  # seconds compiling took, when it did
        if wants_compile(cfg.compile, device):
            compiled, self.compile_seconds = compile_or_eager(self.model, self.warm_up, device, world.is_main)
        # several processes: DistributedDataParallel averages the gradients (the shape nanoGPT uses: compile, then DDP)
        self.forward = DDP(compiled, device_ids=[device.index] if device.type == "cuda" else None) \
            if world.active else compiled
        self.optimizer = torch.optim.AdamW(
            self.model.optimizer_groups(cfg.weight_decay), lr=cfg.learning_rate, betas=(0.9, 0.95),
            fused=device.type == "cuda",  # one kernel for the whole update instead of several per parameter
        )
        self.sampler = EpochSampler(data.train, cfg.block_size, cfg.seed)
        self.total_steps = steps_for(cfg, self.sampler.windows_per_epoch, world.size)
        min_ratio = cfg.final_lr / cfg.learning_rate
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_multiplier(s, cfg.warmup_steps, self.total_steps, min_ratio)
        )
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        val_windows = validation_windows(data.val, cfg.block_size, cfg.eval_steps * cfg.batch_size)
        self.val_batches = to_device(val_windows, device)
        self.step = 0
        self.best_val_loss = math.inf
        self.last_val_loss: float | None = None
        self.stop_signal: int | None = None  # set from a signal handler; checked once per optimizer step
        self.stop_agreed: int | None = None  # several processes: the stop every one of them saw at the same step
        self.step_ok, self.bad_steps, self.bad_in_a_row = True, 0, 0  # non-finite steps: skipped and counted
        self.updating = False  # True while the optimizer changes the weights
        self.saved_at: int | None = None  # the step latest.pt was last written at
        self.last_good: tuple[int, torch.Tensor] | None = None  # (step, loss) of the last applied step
        self.peak, self.peak_source = peak_tflops(device, precision, cfg.peak_tflops)
        self.tokens_per_step = cfg.tokens_per_step * world.size  # the whole job's
        self.epoch_loss, self.epoch_steps = torch.zeros((), device=device), 0  # for epoch/train_loss

    # ---- one optimizer step ------------------------------------------------------------------------------------------
    def train_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step; returns (mean micro-batch loss, gradient norm) as device tensors. A step whose loss or
        gradient norm is not finite is skipped, never applied, and counted (fp16 gradient overflow is the scaler's
        to skip: it lowers its scale and that is no bad step)."""
        loss = self.accumulate_gradients()
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip or math.inf)
        # one scalar read per step (the fp16 scaler makes the same one): applying a non-finite step ruins the weights.
        # With several processes the same read also makes them agree: every one skips, or stops, at the same step.
        flags = torch.stack([loss.isfinite(), grad_norm.isfinite(),
                             torch.tensor(self.stop_signal is None, device=self.device)]).float()
        finite_loss, finite_norm, go_on = all_reduce(flags, self.world, dist.ReduceOp.MIN).bool().tolist()
        if not go_on:
            self.stop_agreed = self.stop_signal or signal.SIGTERM  # this process or another was asked to stop
        self.step_ok = finite_loss and (finite_norm or self.precision == "fp16")
        if self.step_ok:
            self.updating = True  # from here until the step ends, the weights may be half updated
            self.scaler.step(self.optimizer)
            self.bad_in_a_row, self.last_good = 0, (self.step + 1, loss.detach())
        else:
            self.bad_steps, self.bad_in_a_row = self.bad_steps + 1, self.bad_in_a_row + 1
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        self.updating = False
        return loss, grad_norm

    def accumulate_gradients(self) -> torch.Tensor:
        """Forward and backward over the step's micro-batches; returns their mean loss."""
        cfg = self.cfg
        accum = cfg.gradient_accumulation_steps
        offsets = share_of(self.sampler.next_offsets(cfg.batch_size * accum * self.world.size), self.world.rank,
                           self.world.size)
        batch = to_device(gather_windows(self.data.train, offsets, cfg.block_size), self.device)
        loss_sum = torch.zeros((), device=self.device)
        for i, micro in enumerate(batch.view(accum, cfg.batch_size, cfg.block_size + 1)):
            # processes exchange gradients once per optimizer step, on its last micro-batch
            in_sync = self.forward.no_sync() if self.world.active and i < accum - 1 else contextlib.nullcontext()
            with in_sync:
                with autocast(self.device, self.precision):
                    _, loss = self.forward(micro[:, :-1], micro[:, 1:])
                loss_sum += loss.detach()
                # the optimizer must see the mean gradient over micro-batches, not their sum
                self.scaler.scale(loss / accum).backward()
        return loss_sum / accum

    def warm_up(self, module: torch.nn.Module) -> None:
        """Run `module` as training will: a forward and backward on a micro-batch, and an evaluation forward."""
        batch = torch.zeros((self.cfg.batch_size, self.cfg.block_size + 1), dtype=torch.long, device=self.device)
        with autocast(self.device, self.precision):
            _, loss = module(batch[:, :-1], batch[:, 1:])
        loss.backward()
        self.model.eval()
        with torch.no_grad(), autocast(self.device, self.precision):
            module(batch[:, :-1], batch[:, 1:])
        self.model.train()

    @torch.no_grad()
    def evaluate(self) -> float:
        self.model.eval()
        total = torch.zeros((), device=self.device)
        chunks = self.val_batches.split(self.cfg.batch_size)
        for chunk in chunks:
            with autocast(self.device, self.precision):
                _, loss = self.forward(chunk[:, :-1], chunk[:, 1:])
            total += loss
        self.model.train()
        return (total / len(chunks)).item()

    # ---- the loop ----------------------------------------------------------------------------------------------------
    def train(self) -> TrainResult:
        result = TrainResult(self.step, self.best_val_loss)
        self.model.train()
        bar = tqdm(total=self.total_steps, initial=self.step, unit="step", dynamic_ncols=True,
                   disable=not (sys.stderr.isatty() and self.world.is_main), file=sys.stderr)
        window, started = self.throughput_window(), time.perf_counter()
        while self.step < self.total_steps and self.stop_requested() is None:
            epoch, sampler_state = self.sampler.epoch, self.sampler.state_dict()
            try:
                loss, grad_norm = self.train_step()
            except torch.OutOfMemoryError:
                loss = None  # handled below, once the error and the tensors its frames hold are gone
            if loss is None:
                raise RunStopped(self.out_of_memory(sampler_state))
            if self.step_ok:
                window.add(loss)
                self.epoch_loss += loss
                self.epoch_steps += 1
            elif self.bad_in_a_row >= self.cfg.max_bad_steps:
                raise RunStopped(self.divergence_message())
            bar.update(1)
            improved = False
            with window.paused():  # tokens/s and MFU measure training, not evaluation or saving
                epoch_done = self.sampler.epoch > epoch
                if epoch_done or self.should_eval():  # one evaluation, even when both are due
                    result.evals.append((self.step, self.evaluate()))
                    improved = self.record_eval(result.evals[-1][1], epoch_done)
            if self.should_log():  # after the evaluation, so the line shows this step's
                report = self.report(window, grad_norm)
                result.history.append(report)
                bar.set_postfix(loss=f"{report['train/loss']:.4f}", lr=f"{report['train/learning_rate']:.1e}",
                                tok_s=f"{report['train/tokens_per_sec']:,.0f}")
                if self.world.is_main:
                    tqdm.write(self.progress_line(report, time.perf_counter() - started))
            with window.paused():  # saved after the step's rows are logged: a resume never misses one
                if self.should_eval() or self.should_save():
                    self.save(checkpoint.latest_path(self.cfg.output_dir))
                if improved:
                    self.save(checkpoint.best_path(self.cfg.output_dir))
        bar.close()
        if self.stop_requested() is not None and self.saved_at != self.step:  # a stop request always saves
            self.save(checkpoint.latest_path(self.cfg.output_dir))
        result.interrupted_by = self.stop_requested()
        result.steps, result.best_val_loss = self.step, self.best_val_loss
        result.seconds = time.perf_counter() - started
        return result

    # when to report, evaluate and save: the last step always reports and evaluates (a stop saves after the loop)
    def should_log(self) -> bool:
        return self.step % self.cfg.log_interval == 0 or self.step == self.total_steps

    def should_eval(self) -> bool:
        return self.step % self.cfg.eval_interval == 0 or self.step == self.total_steps

    def should_save(self) -> bool:
        return self.step % self.cfg.save_interval == 0

    def stop_requested(self) -> int | None:
        """One process: the signal as soon as it came. Several: the one agreed at the last step's exchange, so that
        all of them stop after the same step (a signal can reach them at different moments)."""
        return self.stop_agreed if self.world.active else self.stop_signal

    def throughput_window(self) -> ThroughputWindow:
        # the whole job's tokens against the sum of every process's peak
        return ThroughputWindow(self.device, self.tokens_per_step, self.model.flops_per_token(),
                                self.peak * self.world.size, self.world)

    def end_epoch(self, val_loss: float) -> None:
        self.tracker.log({"epoch/train_loss": self.epoch_loss.item() / max(1, self.epoch_steps),
                          "epoch/val_loss": val_loss, "epoch/val_perplexity": perplexity(val_loss)}, self.step)
        self.epoch_loss.zero_()
        self.epoch_steps = 0

    def report(self, window: ThroughputWindow, grad_norm: torch.Tensor) -> dict:
        """Log the window's numbers (this waits for the device) and return them with the step."""
        numbers = window.read_and_reset()
        metrics = {
            "train/loss": numbers["loss"],
            "train/perplexity": perplexity(numbers["loss"]),
            "train/learning_rate": self.scheduler.get_last_lr()[0],
            "train/grad_norm": grad_norm.item(),
            "train/tokens_per_sec": numbers["tokens_per_sec"],
            "train/mfu": numbers["mfu"],
            "train/epoch": self.sampler.epochs_done,
            "train/tokens_seen": self.step * self.tokens_per_step,
            "train/skipped_steps": self.bad_steps,
            "system/step_time_ms": numbers["step_time_ms"],
            **gpu_memory_metrics(self.device),
        }
        self.tracker.log(metrics, self.step)
        return {"step": self.step, **metrics}

    def progress_line(self, report: dict, elapsed: float) -> str:
        epochs_total = math.ceil(self.total_steps * self.tokens_per_step / self.cfg.block_size
                                 / self.sampler.windows_per_epoch)
        val = f"{self.last_val_loss:.4f}" if self.last_val_loss is not None else "-"
        minutes, seconds = divmod(elapsed, 60)
        return (f"step {self.step} | epoch {self.sampler.epoch + 1}/{epochs_total} | loss {report['train/loss']:.4f} | "
                f"val {val} | lr {report['train/learning_rate']:.1e} | {report['train/tokens_per_sec']:,.0f} tok/s | "
                f"{int(minutes)}m {seconds:.1f}s")

    def divergence_message(self) -> str:
        cfg, last = self.cfg, self.last_good
        lr = self.scheduler.get_last_lr()[0]
        where = f"{last[1].item():.4f} at step {last[0]}" if last else "never seen (it was not finite from the start)"
        precision = " or use --bf16 / --fp32 instead of fp16 (its range is small)" if self.precision == "fp16" else ""
        clip = f"tighten --grad_clip (now {cfg.grad_clip:g})" if cfg.grad_clip else "enable --grad_clip (e.g. 1.0)"
        return (f"training diverged: {self.bad_in_a_row} optimizer steps in a row up to step {self.step} had a "
                f"non-finite loss or gradient norm (each was skipped, none applied). The last finite training loss "
                f"was {where}. Try a lower --learning_rate (now {cfg.learning_rate:g}, {lr:.2g} at this step), "
                f"{clip}{precision}. The checkpoints saved so far are untouched: continue from the latest with the "
                f"same command plus --resume and the changed flags.")

    def out_of_memory(self, sampler_state: dict) -> str:
        """After a training step ran out of memory: free what it held, save the state it started from when that is
        intact (the error came before the weights changed), and say what to change."""
        cfg = self.cfg
        self.optimizer.zero_grad(set_to_none=True)
        empty_cache(self.device)
        if self.updating or self.step == 0 or not self.world.is_main:
            kept = f"Nothing was saved; the checkpoints in {checkpoint.checkpoint_dir(cfg.output_dir)} are untouched"
        else:
            self.sampler.load_state_dict(sampler_state)  # the failed step's windows are drawn again after a resume
            self.save(checkpoint.latest_path(cfg.output_dir))
            kept = f"The state after step {self.step} was saved to {checkpoint.latest_path(cfg.output_dir)}"
        return (f"out of memory in training step {self.step + 1}: model {cfg.model_label()}, "
                f"{self.model.num_params() / 1e6:.1f}M parameters in {self.precision}; micro-batch {cfg.batch_size} x "
                f"block {cfg.block_size} tokens, {cfg.gradient_accumulation_steps} accumulation step(s); "
                f"{memory_in_use(self.device)}. Fixes: --batch_size auto (the largest micro-batch that fits), or the "
                f"same batch per step in smaller pieces (--batch_size {max(1, cfg.batch_size // 2)} "
                f"--gradient_accumulation_steps {cfg.gradient_accumulation_steps * 2}), a shorter --block_size, or a "
                f"smaller --model_size. {kept}: continue with the same command plus --resume and the changed flags.")

    def check_weights_finite(self) -> None:
        """Never sample from, or save over a good checkpoint, a model whose weights are not finite."""
        if not torch.stack([p.isfinite().all() for p in self.model.parameters()]).all():
            raise RunStopped(f"the model's weights are no longer finite at step {self.step}, so nothing was saved "
                             f"over the checkpoints in {checkpoint.checkpoint_dir(self.cfg.output_dir)}. Continue from "
                             f"the latest with --resume and a lower --learning_rate or a tighter --grad_clip.")

    def record_eval(self, val_loss: float, epoch_done: bool) -> bool:
        """Every evaluation, at --eval_interval or at an epoch's end, is one kind: it sets `val` and `best` (and so
        best.pt); interval evaluations also sample, epoch ends also log the epoch's numbers. Returns whether the
        loss is the best so far."""
        self.check_weights_finite()
        self.last_val_loss = val_loss
        improved = val_loss < self.best_val_loss
        self.best_val_loss = min(self.best_val_loss, val_loss)
        self.tracker.log({"eval/loss": val_loss, "eval/perplexity": perplexity(val_loss),
                          "eval/best_perplexity": perplexity(self.best_val_loss)}, self.step)
        if epoch_done:
            self.end_epoch(val_loss)
        if self.should_eval() and self.sample_prompts and self.world.is_main:
            self.tracker.log_samples({p: self.sample(p) for p in self.sample_prompts}, self.step)
        return improved

    # ---- checkpoints -------------------------------------------------------------------------------------------------
    def checkpoint_parts(self) -> dict:
        """Every part whose state a checkpoint holds, by the name it is saved under."""
        return {"model": self.model, "optimizer": self.optimizer, "scheduler": self.scheduler, "scaler": self.scaler,
                "sampler": self.sampler, "trainer": self, "tracker": self.tracker}

    def save(self, path: Path) -> None:
        if not self.world.is_main:  # one writer; every process holds the same weights
            return
        self.check_weights_finite()
        about = {"config": self.cfg.to_dict(), "vocab_size": self.data.tokenizer.vocab_size,
                 "tokenizer": self.data.tokenizer.to_dict(), "corpus": self.data.corpus, "world_size": self.world.size}
        checkpoint.save_atomic(checkpoint.assemble(self.checkpoint_parts(), about), path)
        if path == checkpoint.latest_path(self.cfg.output_dir):
            self.saved_at = self.step

    def restore(self, state: dict) -> None:
        """Continue from a loaded checkpoint. The tracker is not restored here: it was started from its saved state,
        because it must reopen the same runs before anything is logged."""
        checkpoint.restore(state, {k: v for k, v in self.checkpoint_parts().items() if k != "tracker"})
        if self.world.rank:  # the saved RNG states are the main process's: the others draw their own masks again
            torch.manual_seed(self.cfg.seed + self.world.rank + self.step * self.world.size)
        self.use_current_flags()

    def state_dict(self) -> dict:  # the loop's own counters; the other parts save their own state
        return {"step": self.step, "best_val_loss": self.best_val_loss, "last_val_loss": self.last_val_loss,
                "epoch_loss": (self.epoch_loss.item(), self.epoch_steps), "skipped_steps": self.bad_steps}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.best_val_loss = state["step"], state["best_val_loss"]
        self.last_val_loss = state["last_val_loss"]
        self.epoch_loss.fill_(state["epoch_loss"][0])
        self.epoch_steps = state["epoch_loss"][1]
        self.bad_steps = state.get("skipped_steps", 0)  # format 2 checkpoints written before it was counted

    def use_current_flags(self) -> None:
        """After a resume, this start's flags rule: the restored optimizer and schedule carry the saved peak learning
        rate and weight decay, so set them (warm-up, decay length and final rate come from the flags already)."""
        self.optimizer.param_groups[0]["weight_decay"] = self.cfg.weight_decay  # group 0 holds the decayed matrices
        lr = self.cfg.learning_rate * lr_multiplier(self.scheduler.last_epoch, self.cfg.warmup_steps, self.total_steps,
                                                    self.cfg.final_lr / self.cfg.learning_rate)
        self.scheduler.base_lrs = [self.cfg.learning_rate] * len(self.optimizer.param_groups)
        for group in self.optimizer.param_groups:
            group["initial_lr"], group["lr"] = self.cfg.learning_rate, lr
        self.scheduler._last_lr = [lr] * len(self.optimizer.param_groups)

    # ---- sampling ----------------------------------------------------------------------------------------------------
    def sample(self, prompt: str) -> str:
        """Text from the current model. Its own seeded generator leaves the training RNG (and so resume) untouched;
        each prompt gets its own stream, so a weak model does not continue every prompt with the same draws."""
        cfg = self.cfg
        seed = (cfg.seed * 1_000_003 + self.step) ^ zlib.crc32(prompt.encode("utf-8"))
        generator = torch.Generator(self.device).manual_seed(seed)
        return generate_text(self.model, self.data.tokenizer, prompt, self.device, self.precision, cfg.sample_tokens,
                             cfg.temperature, cfg.top_k, cfg.top_p, generator)
