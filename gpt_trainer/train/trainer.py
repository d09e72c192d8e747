"""The training loop: sample a batch, accumulate gradients over micro-batches, clip, step at the plan's learning
rate; evaluate, save and report at intervals (decided in one place: should_log / should_eval / should_save). Nothing in
the per-step path waits for the device: a bad step is skipped on the device (train/health.py), the next batch is on its
way while a step runs (data/batches.TrainBatches), and the host reads the device only at steps that log, evaluate or
save, where several processes also agree on a stop request. A run that cannot go on raises a `TrainingFailure`
holding the facts; the command words them for the user."""

from __future__ import annotations

import math
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from ..data.batches import TrainBatches, to_device, validation_windows
from ..data.tokens import TokenData
from ..errors import Diverged, OutOfMemory, WeightsNotFinite, is_out_of_memory
from ..model.gpt import empty_model, generate_text
from ..model.hf import folder_state
from ..plan.run_plan import RunPlan
from ..system import distributed
from ..system.distributed import all_reduce
from ..system.hardware import allow_tf32, empty_cache, gpu_memory_metrics, memory_in_use, peak_tflops
from ..tracking import Tracker
from .checkpoint import Checkpointer
from .health import StepHealth, step_unless
from .parallelize import parallelize
from .metrics import ThroughputWindow
from .optimizers import apply_flags, build_optimizer, set_learning_rates


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))  # capped: an early, diverging loss must not overflow to inf


@dataclass
class TrainResult:
    steps: int
    best_val_loss: float
    history: list[dict] = field(default_factory=list)  # one entry per report: step, loss, lr, ...
    evals: list[tuple[int, float]] = field(default_factory=list)  # (step, validation loss) of every evaluation
    interrupted_by: int | None = None  # signal number when a signal stopped the run
    best_step: int | None = None  # the step of best_val_loss: 0 when --init_from's weights were never beaten
    seconds: float = 0.0  # wall time of the loop (evaluations and saving included)


class Trainer:
    def __init__(self, plan: RunPlan, data: TokenData, tracker: Tracker | None = None,
                 start_weights: dict[str, torch.Tensor] | None = None):
        """`start_weights`: a run from --init_from, the folder's weights as hf.init_weights read and checked them
        (else they are read here)."""
        cfg, device, world = plan.cfg, plan.device, plan.world
        self.plan, self.cfg, self.data = plan, cfg, data
        self.device, self.precision, self.world = device, plan.precision, world
        self.tracker = tracker or Tracker()
        torch.manual_seed(cfg.seed)
        allow_tf32(device)
        # Built on the meta device; compiled, and wrapped or sharded for several processes, and given its initial
        # weights there (under FSDP each process only its slices): the loop talks to it, never to the mode
        self.model = empty_model(cfg.to_dict(), data.tokenizer.vocab_size)
        self.parallel = parallelize(self.model, plan)
        # --init_from: a fresh run starts from the folder's weights; a resumed one from its checkpoint's (restore)
        if cfg.init_from and plan.resume_from is None:
            start = start_weights if start_weights is not None else folder_state(Path(cfg.init_from), self.model.cfg)
            self.model.load_whole(start)
        if world.rank:  # every process starts from the same weights (seeded above) but draws its own dropout masks
            torch.manual_seed(cfg.seed + world.rank)
        self.optimizer = build_optimizer(self.model, cfg)  # after sharding, which replaces the parameters
        set_learning_rates(self.optimizer, cfg, plan.lr_scale(0))
        self.batches = TrainBatches(data.train, cfg.block_size, cfg.seed, plan.global_batch, world.rank, world.size,
                                    device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=plan.precision == "fp16")
        val_windows = validation_windows(data.val, cfg.block_size, cfg.eval_steps * plan.micro_batch)
        self.val_batches = to_device(val_windows, device)
        self.step = 0
        self.best_val_loss = math.inf
        self.best_step: int | None = None  # the step of best_val_loss (0: --init_from's weights, never beaten)
        self.last_val_loss: float | None = None
        self.stop_signal: int | None = None  # set from a signal handler; checked once per optimizer step
        self.stop_agreed: int | None = None  # several processes: the stop they agreed on at the same log step
        self.health = StepHealth(device)  # non-finite steps: skipped and counted, on the device
        self.updating = False  # True while the optimizer changes the weights
        self.peak, self.peak_source = peak_tflops(device, plan.precision, cfg.peak_tflops)
        # for epoch/train_loss: the sum of the epoch's counted losses and their number, on the device
        self.epoch_loss, self.epoch_steps = torch.zeros((), device=device), torch.zeros((), device=device)
        model_view, optimizer_view = self.parallel.checkpoint_views(self.optimizer)
        about = {"config": plan.describe(), "vocab_size": plan.vocab_size, "tokenizer": data.tokenizer.to_dict(),
                 "corpus": plan.corpus, "world_size": world.size}
        self.checkpointer = Checkpointer(
            plan.folder, {"model": model_view, "optimizer": optimizer_view, "scaler": self.scaler,
                          "sampler": self.batches, "trainer": self, "tracker": self.tracker},
            about, world, sharded=self.parallel.sharded)

    @property
    def forward(self) -> torch.nn.Module:
        return self.parallel.forward

    @property
    def compile_seconds(self) -> float | None:
        return self.parallel.compile_seconds

    # ---- one optimizer step ------------------------------------------------------------------------------------------
    def train_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step; returns (mean micro-batch loss, gradient norm) as device tensors. A step whose loss or
        gradient norm is not finite is skipped, never applied, and counted (fp16 gradient overflow is the scaler's
        to skip: it lowers its scale and that is no bad step). Nothing here waits for the device: the skip is decided
        there, and the next step's batch is started once this one's work is enqueued."""
        set_learning_rates(self.optimizer, self.cfg, self.plan.lr_scale(self.step))
        loss = self.accumulate_gradients()
        self.scaler.unscale_(self.optimizer)  # (fp16: its found_inf, read on the device by update below)
        grad_norm = self.parallel.clip_gradients(self.cfg.grad_clip or math.inf)
        # applying a non-finite step ruins the weights. With several processes the flags are agreed (on NCCL
        # asynchronously), so every one skips the same steps; nobody reads them here.
        finite = all_reduce(torch.stack([loss.isfinite(), grad_norm.isfinite()]).float(), self.world,
                            dist.ReduceOp.MIN).bool()
        applied = finite.all()  # fp16: a non-finite gradient norm is the scaler's overflow, skipped the same way
        self.updating = True  # from here until the step ends, the weights may be half updated
        step_unless(self.optimizer, (~applied).float())
        self.health.record(finite[0] if self.precision == "fp16" else applied, loss)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.updating = False
        if self.step < self.plan.total_steps:
            self.batches.prefetch()
        return loss, grad_norm

    def accumulate_gradients(self) -> torch.Tensor:
        """Forward and backward over the step's micro-batches; returns their mean loss."""
        plan, block_size = self.plan, self.cfg.block_size
        accum = plan.accumulation
        batch = self.batches.next()
        loss_sum = torch.zeros((), device=self.device)
        for i, micro in enumerate(batch.view(accum, plan.micro_batch, block_size + 1)):
            with self.parallel.gradient_sync(last=i == accum - 1):
                with self.parallel.autocast():
                    _, loss = self.forward(micro[:, :-1], micro[:, 1:])
                loss_sum += loss.detach()
                # the optimizer must see the mean gradient over micro-batches, not their sum
                self.scaler.scale(loss / accum).backward()
        return loss_sum / accum

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """The mean validation loss; None when a stop request came during it (one process: it stops at once, so a
        container stops within Docker's grace; several processes finish it together and stop at the next log step)."""
        self.model.eval()
        total = torch.zeros((), device=self.device)
        chunks = self.val_batches.split(self.plan.micro_batch)
        for chunk in chunks:
            if self.stop_signal is not None and not self.world.active:
                self.model.train()
                return None
            with self.parallel.autocast():
                _, loss = self.forward(chunk[:, :-1], chunk[:, 1:])
            total += loss
        self.parallel.after_forward_only()
        self.model.train()
        return (total / len(chunks)).item()

    # ---- the loop ----------------------------------------------------------------------------------------------------
    def train(self) -> TrainResult:
        result = TrainResult(self.step, self.best_val_loss)
        self.model.train()
        bar = tqdm(total=self.plan.total_steps, initial=self.step, unit="step", dynamic_ncols=True,
                   disable=not (sys.stderr.isatty() and self.world.is_main), file=sys.stderr)
        window, started = self.throughput_window(), time.perf_counter()
        if self.step == 0 and self.cfg.init_from:
            self.evaluate_start(result)
        while self.step < self.plan.total_steps and self.stop_requested() is None:
            epoch, batches_state = self.batches.epoch, self.batches.state_dict()
            distributed.report(self.world, f"step {self.step + 1}")  # a process that waits for it can name it
            try:
                loss, grad_norm = self.train_step()
            except (torch.OutOfMemoryError, RuntimeError, MemoryError) as e:
                if not is_out_of_memory(e):
                    raise
                loss = None  # handled below, once the error and the tensors its frames hold are gone
            if loss is None:
                raise OutOfMemory(self.step + 1, self.save_after_out_of_memory(batches_state),
                                  memory_in_use(self.device))
            if self.step == self.plan.start_step + 1:  # start-up is over: a wait from now on is a stall
                distributed.settle_timeout(self.world, self.cfg.dist_timeout)
            counts = self.health.last_ok  # a skipped step's loss counts nowhere (decided on the device)
            window.add(loss, counts)
            self.epoch_loss += torch.where(counts, loss, 0)
            self.epoch_steps += counts
            bar.update(1)
            epoch_done = self.batches.epoch > epoch
            if epoch_done or self.should_log() or self.should_eval() or self.should_save():
                self.check_health()  # where the loop waits for the device anyway
            improved = False
            with window.paused():  # tokens/s and MFU measure training, not evaluation or saving
                val_loss = self.evaluate() if epoch_done or self.should_eval() else None  # one, even when both are due
                if val_loss is not None:  # None: a stop request interrupted it
                    result.evals.append((self.step, val_loss))
                    improved = self.record_eval(val_loss, epoch_done)
            if self.should_log():  # after the evaluation, so the line shows this step's
                report = self.report(window, grad_norm)
                result.history.append(report)
                bar.set_postfix(loss=f"{report['train/loss']:.4f}", lr=f"{report['train/learning_rate']:.1e}",
                                tok_s=f"{report['train/tokens_per_sec']:,.0f}")
                if self.world.is_main:
                    tqdm.write(self.progress_line(report, time.perf_counter() - started))
                self.agree_on_stop()
            with window.paused():  # saved after the step's rows are logged: a resume never misses one
                if self.should_eval() or self.should_save():
                    self.save(self.plan.folder.latest)
                if improved:
                    self.save(self.plan.folder.best)
        bar.close()
        if self.stop_requested() is not None and self.checkpointer.saved_at != self.step:  # a stop always saves
            self.save(self.plan.folder.latest)
        result.interrupted_by = self.stop_requested()
        result.steps, result.best_val_loss, result.best_step = self.step, self.best_val_loss, self.best_step
        result.seconds = time.perf_counter() - started
        return result

    def evaluate_start(self, result: TrainResult) -> None:
        """A run from --init_from is evaluated before its first step: the folder's model on this text, the number the
        training is to improve on. It is the best so far (logged at step 0), so best.pt is only written for a trained
        model that beats it, and never holds one worse than the start."""
        val_loss = self.evaluate()
        if val_loss is None:  # a stop request came during it
            return
        result.evals.append((0, val_loss))
        logged = {"eval/loss": val_loss, "eval/perplexity": perplexity(val_loss)}
        if math.isfinite(val_loss):  # (a NaN from an fp16 overflow is no best)
            self.best_val_loss, self.best_step = val_loss, 0
            logged["eval/best_perplexity"] = perplexity(val_loss)
        self.tracker.log(logged, 0)
        if self.world.is_main:
            tqdm.write(f"step 0 (the weights of {self.cfg.init_from}) | val {val_loss:.4f} | perplexity "
                       f"{perplexity(val_loss):,.1f}")

    # when to report, evaluate and save: the last step always reports and evaluates (a stop saves after the loop)
    def should_log(self) -> bool:
        return self.step % self.cfg.log_interval == 0 or self.step == self.plan.total_steps

    def should_eval(self) -> bool:
        return self.step % self.cfg.eval_interval == 0 or self.step == self.plan.total_steps

    def should_save(self) -> bool:
        return self.step % self.cfg.save_interval == 0

    def stop_requested(self) -> int | None:
        """One process: the signal as soon as it came, so it stops after the current step (a container within Docker's
        grace). Several: the one agreed at the last log step, so that all of them stop after the same step (a signal
        can reach them at different moments); a stop takes at most --log_interval steps."""
        return self.stop_agreed if self.world.active else self.stop_signal

    def agree_on_stop(self) -> None:
        """Several processes, at a log step (which waits for the device anyway): whether any of them was asked to stop.
        Each keeps its own signal; one that got none takes the others' (the highest number)."""
        if not self.world.active:
            return
        asked = torch.full((), float(self.stop_signal or 0), device=self.device)
        seen = int(all_reduce(asked, self.world, dist.ReduceOp.MAX).item())
        if seen:
            self.stop_agreed = self.stop_signal or seen

    def check_health(self) -> None:
        """Stop a run whose last --max_bad_steps steps (or more) were all skipped. The counts are read only here, at
        steps that wait for the device anyway (log, evaluation, save), so the limit is checked there."""
        if self.health.read().bad_in_a_row >= self.cfg.max_bad_steps:
            raise self.diverged()

    def throughput_window(self) -> ThroughputWindow:
        # the whole job's tokens against the sum of every process's peak
        return ThroughputWindow(self.device, self.plan.tokens_per_step, self.model.flops_per_token(),
                                self.peak * self.world.size, self.world)

    def end_epoch(self, val_loss: float) -> None:
        epoch_loss, epoch_steps = torch.stack([self.epoch_loss, self.epoch_steps]).tolist()
        self.tracker.log({"epoch/train_loss": epoch_loss / max(1, epoch_steps),
                          "epoch/val_loss": val_loss, "epoch/val_perplexity": perplexity(val_loss)}, self.step)
        self.epoch_loss.zero_()
        self.epoch_steps.zero_()

    def muon_learning_rate(self) -> dict:
        """Under --optimizer muon, Muon's learning rate at the next step (train/learning_rate is AdamW's groups')."""
        if self.cfg.optimizer != "muon":
            return {}
        return {"train/muon_learning_rate": self.cfg.muon_learning_rate * self.plan.lr_scale(self.step)}

    def report(self, window: ThroughputWindow, grad_norm: torch.Tensor) -> dict:
        """Log the window's numbers (this waits for the device) and return them with the step."""
        numbers = window.read_and_reset()
        metrics = {
            "train/loss": numbers["loss"],
            "train/perplexity": perplexity(numbers["loss"]),
            "train/learning_rate": self.plan.lr_at(self.step),  # the next step's, as torch's schedulers report it
            **self.muon_learning_rate(),
            "train/grad_norm": grad_norm.item(),
            "train/tokens_per_sec": numbers["tokens_per_sec"],
            "train/mfu": numbers["mfu"],
            "train/epoch": self.batches.epochs_done,
            "train/tokens_seen": self.step * self.plan.tokens_per_step,
            "train/skipped_steps": self.health.read().bad_steps,
            "system/step_time_ms": numbers["step_time_ms"],
            **gpu_memory_metrics(self.device),
        }
        self.tracker.log(metrics, self.step)
        return {"step": self.step, **metrics}

    def progress_line(self, report: dict, elapsed: float) -> str:
        epochs_total = math.ceil(self.plan.total_steps * self.plan.global_batch / self.batches.windows_per_epoch)
        val = f"{self.last_val_loss:.4f}" if self.last_val_loss is not None else "-"
        minutes, seconds = divmod(elapsed, 60)
        return (f"step {self.step} | epoch {self.batches.epoch + 1}/{epochs_total} | loss {report['train/loss']:.4f} | "
                f"val {val} | lr {report['train/learning_rate']:.1e} | {report['train/tokens_per_sec']:,.0f} tok/s | "
                f"{int(minutes)}m {seconds:.1f}s")

    def save_after_out_of_memory(self, batches_state: dict) -> Path | None:
        """After a training step ran out of memory: free what it held and save the state it started from when that
        is intact (the error came before the weights changed); returns where it was saved."""
        self.optimizer.zero_grad(set_to_none=True)
        empty_cache(self.device)
        # sharded: every process writes its slices, and the others may not be here
        if self.updating or self.step == 0 or not self.world.is_main or self.parallel.sharded:
            return None
        self.batches.load_state_dict(batches_state)  # the failed step's windows are drawn again after a resume
        self.save(self.plan.folder.latest)
        return self.plan.folder.latest

    def diverged(self) -> Diverged:
        health = self.health.read()
        return Diverged(self.step, health.bad_in_a_row, health.last_good, self.plan.lr_at(self.step))

    def check_weights_finite(self) -> None:
        """Never sample from, or save over a good checkpoint, a model whose weights are not finite. Sharded, each
        process checks its slices and they agree (a collective)."""
        if not self.parallel.weights_finite():
            raise WeightsNotFinite(self.step)

    def record_eval(self, val_loss: float, epoch_done: bool) -> bool:
        """Every evaluation, at --eval_interval or at an epoch's end, is one kind: it sets `val` and `best` (and so
        best.pt); interval evaluations also sample, epoch ends also log the epoch's numbers. Returns whether the
        loss is the best so far."""
        self.check_weights_finite()
        if not math.isfinite(val_loss):  # the skipped steps left finite weights that no longer predict anything
            raise self.diverged()
        self.last_val_loss = val_loss
        improved = val_loss < self.best_val_loss
        if improved:
            self.best_val_loss, self.best_step = val_loss, self.step
        self.tracker.log({"eval/loss": val_loss, "eval/perplexity": perplexity(val_loss),
                          "eval/best_perplexity": perplexity(self.best_val_loss)}, self.step)
        if epoch_done:
            self.end_epoch(val_loss)
        if self.should_eval() and self.plan.sample_prompts and self.parallel.samples_here:
            samples = dict(self.samples())
            if self.world.is_main and samples:
                self.tracker.log_samples(samples, self.step)
        return improved

    # ---- checkpoints -------------------------------------------------------------------------------------------------
    def save(self, path: Path) -> None:
        """Never save over a good checkpoint a model whose weights are not finite, nor the state of a run that has
        diverged (it would resume into the same steps)."""
        self.check_health()
        self.check_weights_finite()
        self.checkpointer.save(path, self.step)

    def restore(self, state: dict) -> None:
        """Continue from a loaded checkpoint: every part loads what it saved. This start's flags rule what comes
        next: the learning rates are the plan's at each step, and the weight decay and momentum are set again here
        because the restored optimizer carries the saved ones."""
        self.checkpointer.restore(state)
        if self.world.rank:  # the saved RNG states are the main process's: the others draw their own masks again
            torch.manual_seed(self.cfg.seed + self.world.rank + self.step * self.world.size)
        apply_flags(self.optimizer, self.cfg)

    def state_dict(self) -> dict:  # the loop's own counters; the other parts save their own state
        epoch_loss, epoch_steps = torch.stack([self.epoch_loss, self.epoch_steps]).tolist()
        return {"step": self.step, "best_val_loss": self.best_val_loss, "best_step": self.best_step,
                "last_val_loss": self.last_val_loss,
                "epoch_loss": (epoch_loss, int(epoch_steps)), "skipped_steps": self.health.read().bad_steps}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.best_val_loss = state["step"], state["best_val_loss"]
        self.best_step = state.get("best_step")  # checkpoints written before it was recorded: not known
        self.last_val_loss = state["last_val_loss"]
        self.epoch_loss.fill_(state["epoch_loss"][0])
        self.epoch_steps.fill_(state["epoch_loss"][1])
        self.health.start_at(self.step, state.get("skipped_steps", 0))  # format 2: written before it was counted

    # ---- sampling ----------------------------------------------------------------------------------------------------
    def samples(self):
        """(prompt, text) for each sample prompt, on a process that samples (Parallel.samples_here: the main one, or
        under FSDP every one, in lockstep); a stop request ends them before the next prompt."""
        for prompt in self.plan.sample_prompts:
            if self.parallel.any_stop(self.stop_signal is not None):
                return
            yield prompt, self.sample(prompt)

    def sample(self, prompt: str) -> str:
        """Text from the current model. Its own seeded generator leaves the training RNG (and so resume) untouched,
        and gives every process the same draws; each prompt gets its own stream, so a weak model does not continue
        every prompt with the same draws."""
        cfg = self.cfg
        seed = (cfg.seed * 1_000_003 + self.step) ^ zlib.crc32(prompt.encode("utf-8"))
        generator = torch.Generator(self.device).manual_seed(seed)
        with self.parallel.sampling() as model:
            return generate_text(model, self.data.tokenizer, prompt, self.precision, cfg.sample_tokens,
                                 cfg.temperature, cfg.top_k, cfg.top_p, generator)
