"""--optimizer: which parameters Muon and AdamW get, our Muon step against torch.optim.Muon's, a bad step skipped on
the device without a wait, exact resume, and the flags that are refused."""

import json
import math

import pytest
import torch

from gpt_trainer.config import parse_args, given_flags
from gpt_trainer.errors import UsageError
from gpt_trainer.plan.resolve import resolve
from gpt_trainer.system.distributed import World
from gpt_trainer.commands import benchmark
from gpt_trainer.commands.train import main
from gpt_trainer.plan import autobatch
from gpt_trainer.train import optimizers
from gpt_trainer.train import trainer as trainer_module
from gpt_trainer.train.optimizers import MuonAdamW
from tests.conftest import make_trainer
from tests.test_cli import snapshot
from tests.test_distributed import ROOT, TORCHRUN, launch
from tests.test_trainer import QUIET, optimizer_state, stopped_and_restored, waits_in_quiet_steps

TRIAL_OPTIMIZERS = autobatch.trial_optimizers  # the real one, which a test spies on


@pytest.fixture
def run_cfg(tiny_argv):
    """A resolved configuration, as the training command resolves it (the optimizer's defaults included)."""
    def make(*extra: str, recorded: dict | None = None):
        argv = tiny_argv(*extra)
        return resolve(parse_args(argv), given_flags(argv), World(), recorded).cfg
    return make


def test_muon_takes_the_block_matrices_and_adamw_every_other_parameter_once(run_cfg):
    trainer = make_trainer(run_cfg("--optimizer=muon", "--arch=gpt2"))  # gpt2: biases too
    groups = trainer.optimizer.param_groups
    grouped = [id(p) for group in groups for p in group["params"]]
    assert sorted(grouped) == sorted(id(p) for p in trainer.model.parameters())  # each exactly once
    muon = [p for group in groups if group["role"] == "muon" for p in group["params"]]
    names = {id(p): name for name, p in trainer.model.named_parameters()}
    assert muon and all(p.dim() == 2 and names[id(p)].startswith("blocks.") for p in muon)
    assert {id(p) for p in muon} == {id(p) for name, p in trainer.model.named_parameters()
                                     if name.startswith("blocks.") and p.dim() == 2}
    adamw = [names[id(p)] for group in groups if group["role"] != "muon" for p in group["params"]]
    assert "wte.weight" in adamw and any(name.endswith(".bias") for name in adamw)
    assert all(group["params"] for group in groups)  # no empty group (torch's sharded state would misplace it)
    rates = {group["role"]: group["lr"] for group in groups}
    assert rates["muon"] != rates["rest"] and rates["muon"] == pytest.approx(0.02 / 3e-3 * rates["rest"])


def test_muon_on_the_llama_arch_has_a_decayed_adamw_group_for_its_own_output_layer_and_trains(run_cfg):
    """llama's untied output layer is a matrix outside the blocks: AdamW's decayed group, beside Muon's and the
    undecayed rest, each group with its own learning rate (gpt2 has no such group: its output layer is the
    embedding)."""
    trainer = make_trainer(run_cfg("--optimizer=muon", "--arch=llama", "--weight_decay=0.05", "--max_steps=2"))
    names = {id(p): name for name, p in trainer.model.named_parameters()}
    groups = {group["role"]: [names[id(p)] for p in group["params"]] for group in trainer.optimizer.param_groups}
    assert sorted(groups) == ["decay", "muon", "rest"] and groups["decay"] == ["lm_head.weight"]
    assert [g["weight_decay"] for g in trainer.optimizer.param_groups if g["role"] == "decay"] == [0.05]
    history = trainer.train().history
    assert history and all(math.isfinite(row["train/loss"]) for row in history)


def test_the_muon_defaults_are_resolved_and_recorded_and_adamw_is_unchanged(run_cfg):
    muon = run_cfg()  # the default optimizer
    assert muon.optimizer == "muon"
    assert (muon.learning_rate, muon.weight_decay, muon.muon_learning_rate, muon.muon_momentum,
            muon.muon_weight_decay) == (3e-3, 0.0, 0.02, 0.95, 0.0)
    given = run_cfg("--optimizer=muon", "--learning_rate=1e-3", "--muon_momentum=0.9")
    assert (given.learning_rate, given.muon_momentum, given.muon_learning_rate) == (1e-3, 0.9, 0.02)
    adamw = run_cfg("--optimizer=adamw")
    assert (adamw.optimizer, adamw.learning_rate, adamw.weight_decay, adamw.muon_learning_rate) == (
        "adamw", 3e-4, 0.1, None)
    assert type(make_trainer(adamw).optimizer) is torch.optim.AdamW


def test_one_muon_step_is_torch_s_muon_step_and_the_rest_torch_s_fused_adamw(run_cfg):
    cfg = run_cfg("--optimizer=muon", "--muon_weight_decay=0.1", "--weight_decay=0.05")
    trainer = make_trainer(cfg)
    model, ours = trainer.model, trainer.optimizer
    matrices = {id(p) for p in model.block_matrices()}
    copies = {id(p): p.detach().clone().requires_grad_() for p in model.parameters()}
    muon_params = [copies[id(p)] for p in model.parameters() if id(p) in matrices]
    torch_muon = torch.optim.Muon(muon_params, lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.1)
    torch_adamw = torch.optim.AdamW(
        [{"params": [copies[id(p)] for p in group["params"]], "weight_decay": group["weight_decay"]}
         for group in ours.param_groups if group["role"] != "muon"], lr=3e-3, betas=(0.9, 0.95), fused=True)
    for group in ours.param_groups:
        group["lr"] = 0.02 if group["role"] == "muon" else 3e-3
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):  # the momentum carries over
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=generator)
            copies[id(p)].grad = p.grad.clone()
        ours.step()
        torch_muon.step()
        torch_adamw.step()
    assert all(torch.equal(p, copies[id(p)]) for p in model.parameters())  # bit for bit
    assert all(torch.equal(ours.state[p]["momentum_buffer"], torch_muon.state[copies[id(p)]]["momentum_buffer"])
               for p in model.parameters() if id(p) in matrices)


def test_a_bad_muon_step_changes_no_weight_momentum_or_step_count(run_cfg):
    trainer = make_trainer(run_cfg("--optimizer=muon", "--max_steps=10"))
    assert isinstance(trainer.optimizer, MuonAdamW)
    trainer.train_step()
    weights, state = [p.detach().clone() for p in trainer.model.parameters()], optimizer_state(trainer)
    forward = trainer.forward  # below: a poisoned batch
    trainer.parallel.forward = lambda x, y: (lambda out: (out[0], out[1] * float("nan")))(forward(x, y))
    loss, _ = trainer.train_step()
    assert loss.isnan() and trainer.health.read().bad_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(weights, trainer.model.parameters()))
    assert len(state) == len(optimizer_state(trainer))
    assert all(torch.equal(a, b) for a, b in zip(state, optimizer_state(trainer)))  # momentum, moments, step counts
    trainer.parallel.forward = forward
    trainer.train_step()
    assert not all(torch.equal(a, b) for a, b in zip(state, optimizer_state(trainer)))


def test_muon_steps_that_neither_log_evaluate_nor_save_never_wait_for_the_device(run_cfg, monkeypatch):
    trainer = make_trainer(run_cfg("--optimizer=muon", *QUIET, "--gradient_accumulation_steps=2"))
    forward = trainer.forward
    trainer.parallel.forward = lambda x, y: (lambda out: (out[0], out[1] * (math.nan if trainer.step == 2 else 1)))(
        forward(x, y))
    assert waits_in_quiet_steps(trainer, monkeypatch) == []
    assert trainer.health.read().bad_steps == 1 and trainer.step == 6


def test_a_muon_run_resumes_exactly(run_cfg, tmp_path):
    flags = ("--optimizer=muon", "--max_steps=8", "--log_interval=1", "--eval_interval=4", "--save_interval=100")
    straight = make_trainer(run_cfg(*flags, f"--output_dir={tmp_path / 'a'}")).train()
    part_one, second = stopped_and_restored(run_cfg(*flags, f"--output_dir={tmp_path / 'b'}"), 5)
    assert part_one.steps == 5
    assert any("momentum_buffer" in s for s in second.optimizer.state.values())
    part_two = second.train()
    resumed = [r["train/loss"] for r in part_one.history + part_two.history]
    assert resumed == [r["train/loss"] for r in straight.history]  # bit for bit


def test_muon_flags_without_muon_are_refused(tiny_argv):
    with pytest.raises(UsageError, match="--muon_learning_rate set Muon, but --optimizer adamw"):
        parse_args(tiny_argv("--optimizer=adamw", "--muon_learning_rate=0.01"))
    with pytest.raises(UsageError, match="--muon_momentum must be in"):
        parse_args(tiny_argv("--optimizer=muon", "--muon_momentum=1"))


def test_a_resume_with_another_optimizer_is_refused_and_old_runs_are_adamw(run_cfg):
    recorded = {"optimizer": "muon", "learning_rate": 3e-3, "muon_learning_rate": 0.05}
    with pytest.raises(UsageError, match="trained with --optimizer muon"):
        run_cfg("--resume", "--optimizer=adamw", recorded=recorded)
    kept = run_cfg("--resume", recorded=recorded)
    assert (kept.optimizer, kept.learning_rate, kept.muon_learning_rate) == ("muon", 3e-3, 0.05)
    with pytest.raises(UsageError, match="trained with --optimizer adamw"):
        run_cfg("--resume", "--optimizer=muon", recorded={"learning_rate": 1e-3})  # written before --optimizer
    assert run_cfg("--resume", recorded={"learning_rate": 1e-3}).optimizer == "adamw"


def test_the_benchmark_times_muon_with_the_defaults_a_run_resolves(monkeypatch):
    built = []

    def spy(model, cfg):
        built.append(optimizers.build_optimizer(model, cfg))
        return built[-1]
    monkeypatch.setattr(trainer_module, "build_optimizer", spy)
    row = benchmark.benchmark(["--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=8", "--batch_size=2",
                               "--steps=1", "--warmup=0", "--device=cpu", "--optimizer=muon"])
    assert row["timed_steps"] == 1 and len(built) == 1 and isinstance(built[0], MuonAdamW)
    assert built[0].param_groups[0]["lr"] == pytest.approx(0.02 * built[0].param_groups[1]["lr"] / 3e-3)


def test_the_batch_search_s_trial_step_keeps_the_state_of_the_run_s_optimizer(run_cfg, monkeypatch):
    """--batch_size auto measures a real step on the GPU (faked here: the CPU has no allocator statistics)."""
    for name in ("empty_cache", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda *args: None)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda *args: 0)
    made = []

    def spy(model, cfg):
        made.append((model, TRIAL_OPTIMIZERS(model, cfg)))
        return made[-1][1]
    monkeypatch.setattr(autobatch, "trial_optimizers", spy)
    for optimizer, kinds in (("adamw", [torch.optim.AdamW]), ("muon", [torch.optim.Muon, torch.optim.AdamW])):
        measure, _ = autobatch.step_peak_bytes(run_cfg(f"--optimizer={optimizer}"), 50, torch.device("cpu"), "fp32")
        measure(2)
        model, trial = made[-1]
        assert [type(o) for o in trial] == kinds
        held = {id(p): set(o.state[p]) for o in trial for p in o.state}
        assert len(held) == len(list(model.parameters()))  # every parameter stepped, by one optimizer
        matrices = {id(p) for p in model.block_matrices()}
        assert all(held[key] == ({"momentum_buffer"} if optimizer == "muon" and key in matrices
                                 else {"step", "exp_avg", "exp_avg_sq"}) for key in held)


def test_refused_optimizer_flags_end_in_a_sentence_with_nothing_written(tiny_argv, tmp_path, capsys):
    out = tmp_path / "run"
    argv = tiny_argv(f"--output_dir={out}", "--max_steps=2", "--log_interval=1", "--eval_interval=2")
    assert main([*argv, "--optimizer=adamw", "--muon_momentum=0.9"]) == 2
    assert not out.exists() and "--optimizer muon" in capsys.readouterr().err
    assert main(argv) == 0  # muon, the default
    recorded = json.loads((out / "config.json").read_text())
    assert (recorded["optimizer"], recorded["muon_learning_rate"], recorded["learning_rate"]) == ("muon", 0.02, 3e-3)
    before = snapshot(out)
    capsys.readouterr()
    assert main([*argv, "--resume", "--optimizer=adamw", "--max_steps=4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --resume: the run trained with --optimizer muon") and err.count("\n") == 1
    assert snapshot(out) == before


# ---- under FSDP, each process orthogonalises a share of each batch ------------------------------------------------
SHARED_WORK_SCRIPT = """
import json, sys
sys.path.insert(0, sys.argv[1])
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor
from gpt_trainer.system import distributed
from gpt_trainer.train import optimizers

world = distributed.launched_world()
distributed.start(world, torch.device("cpu"), 60.0)
mesh = init_device_mesh("cpu", (world.size,))
newton_schulz, given = optimizers.newton_schulz, []
def counted(matrices):
    given.append(len(matrices))
    return newton_schulz(matrices)
optimizers.newton_schulz = counted  # a spy on the real iteration: how many matrices this process orthogonalises
torch.manual_seed(0)  # the same matrices on both processes; rows that do not split evenly, batches of 3, 2 and 1
batches = [[torch.randn(7, 5) for _ in range(3)], [torch.randn(4, 9) for _ in range(2)], [torch.randn(3, 6)]]
differing = []
for wholes in batches:
    results = optimizers.orthogonalised([distribute_tensor(w, mesh, [Shard(0)]) for w in wholes])
    expected = newton_schulz(torch.stack(wholes))  # one process's result for the whole batch
    differing += [i for i, (r, e) in enumerate(zip(results, expected))
                  if r.placements != (Shard(0),) or not torch.equal(r.full_tensor(), e)]
with open(f"{sys.argv[2]}-{world.rank}.json", "w") as f:
    json.dump({"differing": differing, "orthogonalised": sum(given)}, f)
distributed.stop(world, True)
"""


@pytest.mark.slow
def test_under_fsdp_each_process_orthogonalises_a_share_of_the_matrices_and_gets_its_rows_of_all(tmp_path):
    """Two gloo processes: every result is, bit for bit, what one process orthogonalising the whole batch gets, sharded
    by rows as the weights are, and the two processes together orthogonalised each matrix once (6), not each of them
    every matrix (12)."""
    script = tmp_path / "shared.py"
    script.write_text(SHARED_WORK_SCRIPT)
    done = launch([*TORCHRUN, str(script), str(ROOT), str(tmp_path / "report")])
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    reports = [json.loads((tmp_path / f"report-{rank}.json").read_text()) for rank in (0, 1)]
    assert [report["differing"] for report in reports] == [[], []]
    assert sum(report["orthogonalised"] for report in reports) == 6
    assert all(report["orthogonalised"] > 0 for report in reports)
