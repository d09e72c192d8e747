"""Every failure a user can cause ends in a sentence or two on stderr (`error: ...`) with exit code 2 (bad input) or 1
(the machine or the run), never a traceback, and changes nothing of the user's: `run_cli` and its table of failures in
gpt_trainer/errors.py, walked here with real conditions (a real full disk on a small tmpfs, a real unreadable file, a
real allocation the machine refuses, real signals)."""

import hashlib
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

from gpt_trainer.commands import export, sample, sweep
from gpt_trainer.commands import train as cli
from gpt_trainer.commands.failures import run_cli, run_stopped
from gpt_trainer.config import parse_args
from gpt_trainer.errors import CheckpointNotWritten, RunStopped, UsageError, is_out_of_memory
from gpt_trainer.system.rundir import RunFolder
from gpt_trainer.train import checkpoint
from tests.conftest import CLASSIC_POEMS, GPT2_ADAMW, TINY_SHAPE, script_env
from tests.test_checkpoint import nanogpt_checkpoint, other_program_checkpoint, plant_code, rewrite, sharded_run
from tests.test_distributed import free_port
from tests.test_hf import as_dtype, broken, config_text, cut_short, make_folder, with_values

ROOT = Path(__file__).resolve().parents[1]


def test_run_cli_turns_bad_input_into_one_line_and_exit_code_2(capsys):
    def command(argv):
        raise UsageError(f"--batch_size must be at least 1 (got {argv[0]}).")
    assert run_cli(command, ["0"]) == 2
    captured = capsys.readouterr()
    assert captured.err == "error: --batch_size must be at least 1 (got 0).\n" and captured.out == ""


def test_run_cli_turns_a_stopped_run_into_its_message_and_exit_code_1(capsys):
    def command(argv):
        print("step 40 | loss 2.1")
        raise RunStopped("the loss diverged at step 41; the last checkpoint (step 40) is kept.")
    assert run_cli(command, []) == 1
    captured = capsys.readouterr()  # what the run printed before it stopped stays; the reason goes to stderr only
    assert captured.out == "step 40 | loss 2.1\n"
    assert captured.err == "error: the loss diverged at step 41; the last checkpoint (step 40) is kept.\n"


def test_run_cli_lets_a_bug_raise_with_its_traceback(capsys):
    def command(argv):
        return {}["missing"]  # a bug, not bad input nor a stopped run: hiding it behind an exit code would lose it
    with pytest.raises(KeyError, match="missing"):
        run_cli(command, [])
    assert capsys.readouterr().err == ""


def test_run_cli_passes_the_command_s_own_exit_code_and_output_through(capsys):
    def command(argv):
        print(f"checked {len(argv)} files, 1 problem")
        return 3
    assert run_cli(command, ["a", "b"]) == 3
    assert capsys.readouterr() == ("checked 2 files, 1 problem\n", "")


@pytest.mark.parametrize("error, out_of_memory", [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
    (torch.OutOfMemoryError("HIP out of memory. Tried to allocate 2.00 GiB"), True),
    (RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"), True),
    (RuntimeError("HIPBLAS_STATUS_ALLOC_FAILED when calling `hipblasLtMatmul( handle, ...)`"), True),
    (RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"), True),
    (RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR_DEVICE_ALLOCATION_FAILED"), True),
    (RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR_HOST_ALLOCATION_FAILED"), True),
    (RuntimeError("miopenStatusAllocFailed"), True),
    (RuntimeError("CUDA error: out of memory"), True),
    (RuntimeError("HIP error: out of memory\nCompile with `TORCH_USE_HIP_DSA` to enable device-side assertions."),
     True),
    (RuntimeError("hipErrorOutOfMemory"), True),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:117] err == 0. DefaultCPUAllocator: can't allocate memory"), True),
    (MemoryError(), True),
    (RuntimeError("CUDA error: CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasGemmEx(...)`"), False),
    (RuntimeError("cuDNN error: CUDNN_STATUS_BAD_PARAM"), False),
    (RuntimeError("CUDA error: an illegal memory access was encountered"), False),
    (ValueError("CUBLAS_STATUS_ALLOC_FAILED"), False),  # a RuntimeError only: the libraries raise nothing else
])
def test_out_of_memory_is_told_from_other_errors(error, out_of_memory):
    """Errors constructed here with the texts PyTorch raises for them (stand-ins: no GPU runs here): a GPU library
    that cannot get memory (cuBLAS, hipBLAS, cuDNN 8 and 9, MIOpen, the runtimes) is out of memory like PyTorch's
    own allocator; other library failures are not."""
    assert is_out_of_memory(error) is out_of_memory


# ---- the table: every failure a user can cause, each with its sentence ----------------------------------------------
@dataclass
class Case:
    """What a row's setup made: the command and its argv; the user's own files and folders, which must be
    byte-identical afterwards with nothing added; glob patterns under tmp_path that must match nothing afterwards (what
    must not be created); and a check of its own."""
    command: Callable[[list[str]], int]
    argv: list[str]
    protect: tuple[Path, ...] = ()
    absent: tuple[str, ...] = ()
    after: Callable[[], None] | None = None


@dataclass
class Where:
    """What a setup builds with: the test's folder, the tiny run's argv, and a real tmpfs."""
    tmp: Path
    argv: Callable[..., list[str]]
    tmpfs: Callable[[Path, str], Path]


def contents(path: Path) -> dict:
    """Every entry at and under `path`, links not followed: a file's SHA-256, a link's target, or "folder"."""
    def entry(p: Path) -> str:
        if p.is_symlink():
            return f"link -> {os.readlink(p)}"
        return "folder" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    if not (path.exists() or path.is_symlink()):
        return {}
    found = {".": entry(path)}
    if found["."] == "folder":
        for parent, folders, files in os.walk(path):
            found.update({str(Path(parent, name).relative_to(path)): entry(Path(parent, name))
                          for name in folders + files})
    return found


@pytest.fixture
def tmpfs():
    """mount(folder, options): a real tmpfs mounted there (root only; elsewhere the row is skipped), unmounted after
    the test."""
    mounted = []

    def mount(folder: Path, options: str) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True,
                              text=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode}); it needs root")
        mounted.append(folder)
        return folder
    yield mount
    for folder in reversed(mounted):
        if subprocess.run(["umount", str(folder)], capture_output=True).returncode:
            subprocess.run(["umount", "--lazy", str(folder)], check=True)  # a file still open in a leftover thread


def trained(w: Where, *extra: str) -> Path:
    """A finished tiny run in tmp/out."""
    assert cli.main(w.argv(*extra)) == 0
    return w.tmp / "out"


def zero_a_block(path: Path) -> None:
    """What a bad disk block does: 4 KiB of zeros in the middle of the file (inside a stored tensor), same size."""
    data = bytearray(path.read_bytes())
    start = len(data) // 3
    assert any(data[start:start + 4096]), "the block is zeros already: zeroing it would damage nothing"
    data[start:start + 4096] = bytes(4096)
    path.write_bytes(bytes(data))


def maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def run_folder_with_foreign_files(w: Where, *extra: str) -> Case:
    out = w.tmp / "out"
    out.mkdir()
    (out / "config.json").write_text('{"experiment": "my own, by hand"}\n')
    (out / "metrics.jsonl").write_text('{"epoch": 1, "accuracy": 0.93}\n')
    return Case(cli.main, w.argv("--max_steps=2", *extra), protect=(out,))


def project_folder(w: Where) -> Case:
    project = w.tmp / "project"
    (project / "src").mkdir(parents=True)
    (project / "README.md").write_text("# my project\n")
    (project / "src" / "main.py").write_text("print('hello')\n")
    return Case(cli.main, w.argv(f"--output_dir={project}", "--max_steps=2"), protect=(project,))


def damaged_latest_and_no_best(w: Where) -> Case:
    out = trained(w, "--max_steps=4", "--eval_interval=4")
    (out / "checkpoints" / "best.pt").unlink()
    zero_a_block(out / "checkpoints" / "latest.pt")
    return Case(cli.main, w.argv("--max_steps=6", "--eval_interval=4", "--resume"), protect=(out,))


def flags(*extra: str) -> Callable[[Where], Case]:
    """Bad flags for a fresh run: refused before the run folder exists."""
    return lambda w: Case(cli.main, w.argv("--max_steps=2", *extra), absent=("out",))


def other_text_same_characters(w: Where) -> Case:
    """A run trained on poems.txt, resumed on poems_reordered.txt: its lines in reverse order, so the characters (and
    the vocabulary, and the model's shape) are the same and only the text differs."""
    original, reordered = w.tmp / "poems.txt", w.tmp / "poems_reordered.txt"
    shutil.copy(CLASSIC_POEMS, original)
    out = trained(w, f"--data_path={original}", "--max_steps=2")
    lines = original.read_text(encoding="utf-8").splitlines(keepends=True)
    reordered.write_text("".join(reversed(lines)), encoding="utf-8")
    assert set(reordered.read_text(encoding="utf-8")) == set(original.read_text(encoding="utf-8"))
    return Case(cli.main, w.argv(f"--data_path={reordered}", "--max_steps=4", "--resume"),
                protect=(out, original, reordered))


def run_name(name: Callable[[Where], str]) -> Callable[[Where], Case]:
    """The TensorBoard folder is output_dir/logs/<run name>: a name with a path in it would write outside."""
    return lambda w: Case(cli.main, w.argv(f"--wandb_run_name={name(w)}", "--report_to=tensorboard", "--max_steps=2"),
                          absent=("out", "**/escape"))


def diverging(w: Where) -> Case:
    """A learning rate so high that the validation loss is not finite at the first evaluation, long before
    --max_bad_steps skipped steps in a row: no checkpoint of the ruined weights is written."""
    return Case(cli.main, w.argv(*GPT2_ADAMW, "--learning_rate=1e8", "--grad_clip=0", "--max_bad_steps=50",
                                 "--eval_interval=1", "--dropout=0", "--max_steps=60"), absent=("out/checkpoints/*",))


def full_disk(size: str) -> Callable[[Where], Case]:
    """A real disk that fills at the first checkpoints (~760 KiB each): with 300k, config.json, metrics.jsonl and
    TensorBoard's events fit and the first latest.pt does not; with 1m, latest.pt fits and best.pt fills the disk
    part-way through."""
    def setup(w: Where) -> Case:
        disk = w.tmpfs(w.tmp / "disk", f"size={size}")
        return Case(cli.main, w.argv(*GPT2_ADAMW, f"--output_dir={disk / 'out'}", "--report_to=tensorboard",
                                     "--max_steps=4", "--eval_interval=2"), absent=("disk/out/checkpoints/.*",))
    return setup


def disk_full_at_start(size: str) -> Callable[[Where], Case]:
    """A real disk with no room for the run's first files: 4k fills before config.json is written, 12k when
    TensorBoard writes its first event."""
    def setup(w: Where) -> Case:
        disk = w.tmpfs(w.tmp / "disk", f"size={size}")
        return Case(cli.main, w.argv(f"--output_dir={disk / 'out'}", "--report_to=tensorboard", "--max_steps=2"),
                    absent=("disk/out/checkpoints",))
    return setup


def cache_dir(where: Callable[[Where], Path]) -> Callable[[Where], Case]:
    def setup(w: Where) -> Case:
        cache = where(w)
        return Case(cli.main, w.argv(f"--cache_dir={cache}", "--max_steps=2"), protect=(cache,), absent=("out",))
    return setup


def a_file(w: Where) -> Path:
    (w.tmp / "cache.txt").write_text("my notes\n")
    return w.tmp / "cache.txt"


def on_a_read_only_disk(w: Where) -> Path:
    return w.tmpfs(w.tmp / "read-only", "ro,size=64k") / "cache"


def output_dir_link(target: Callable[[Path], Path]) -> Callable[[Where], Case]:
    def setup(w: Where) -> Case:
        link = w.tmp / "link"
        link.symlink_to(target(w.tmp))
        return Case(cli.main, w.argv(f"--output_dir={link}", "--max_steps=2"), protect=(link,), absent=("missing",))
    return setup


def unreadable_file_in_data_folder(w: Where) -> Case:
    """As root every file is readable, so the unreadable one is a real one that fails to read: /proc/self/mem (EIO)."""
    data = w.tmp / "corpus"
    data.mkdir()
    shutil.copy(CLASSIC_POEMS, data / "good.txt")
    (data / "bad.txt").symlink_to("/proc/self/mem")
    return Case(cli.main, w.argv(f"--data_path={data}", "--max_steps=2"), protect=(data,), absent=("out",))


def sweep_file(text: str, encoding: str = "utf-8") -> Callable[[Where], Case]:
    def setup(w: Where) -> Case:
        path = w.tmp / "sweep.yaml"
        path.write_bytes(text.encode(encoding))
        return Case(sweep.main, [str(path), "--check"], protect=(path,))
    return setup


CHECKPOINT_V2 = ROOT / "tests" / "fixtures" / "checkpoint_v2.pt"


def sample_with(flag: str) -> Callable[[Where], Case]:
    return lambda w: Case(sample.main, [str(CHECKPOINT_V2), flag, "--device=cpu"], protect=(CHECKPOINT_V2,))


def model_too_large(w: Where) -> Case:
    """A real allocation the machine refuses: a 2,000,000-wide attention layer wants 48 TB at once. The corpus has 3
    characters, so the embeddings allocated (and filled) before it stay small (a 1,079-character vocabulary would
    fill 8.6 GB first)."""
    if Path("/proc/sys/vm/overcommit_memory").read_text().strip() == "1":
        pytest.skip("vm.overcommit_memory=1: the kernel would grant the 48 TB and kill the process when it fills them")
    corpus = w.tmp / "abc.txt"
    corpus.write_text("ab\n" * 200)
    peak, started = maxrss_bytes(), time.monotonic()

    def fails_fast_without_eating_memory():
        assert time.monotonic() - started < 30
        assert maxrss_bytes() - peak < 2**30

    return Case(cli.main, w.argv(f"--data_path={corpus}", "--n_layer=1", "--n_head=1", "--n_embd=2000000"),
                after=fails_fast_without_eating_memory)


# ---- setups of round three, one section per area ----
# ---- setups: checkpoints and loading files ----
def planted(tmp: Path) -> Path:
    """A copy of the format 2 fixture with a payload that creates tmp/marker when unpickled (plant_code shows that it
    does, loaded the unsafe way)."""
    path = tmp / "planted.pt"
    shutil.copy(CHECKPOINT_V2, path)
    plant_code(path, tmp / "marker")
    return path


def resume_a_planted_latest(w: Where) -> Case:
    """A real run whose latest.pt carries the payload; its intact best.pt is not fallen back to."""
    out = trained(w, "--max_steps=4", "--eval_interval=4")
    plant_code(out / "checkpoints" / "latest.pt", w.tmp / "marker")
    return Case(cli.main, w.argv("--max_steps=6", "--eval_interval=4", "--resume"), protect=(out,), absent=("marker",))


def reading(command: str, make: Callable[[Path], Path]) -> Callable[[Where], Case]:
    """sample, export or --resume FILE (into a fresh folder) given the file `make` writes in tmp."""
    def setup(w: Where) -> Case:
        path = make(w.tmp)
        cases = {"sample": Case(sample.main, [str(path), "--device=cpu"]),
                 "export": Case(export.main, [str(path), str(w.tmp / "exported")], absent=("exported",)),
                 "resume": Case(cli.main, w.argv(f"--resume={path}", "--max_steps=2"), absent=("out",))}
        case = cases[command]
        return Case(case.command, case.argv, protect=(path,), absent=(*case.absent, "marker"))
    return setup


def wrong_weights(tmp: Path) -> Path:
    """The format 2 fixture with a configuration that no longer fits its weights (as a hand edit would leave it)."""
    state = checkpoint.load(CHECKPOINT_V2)
    state["config"]["n_embd"] *= 2
    path = tmp / "edited.pt"
    torch.save(state, path)
    return path


def latest_cut_short(size: Callable[[int], int], best: Callable[[Path], None]) -> Callable[[Where], Case]:
    """A real run whose latest.pt was cut to `size(its size)` bytes, and `best` done to its best.pt."""
    def setup(w: Where) -> Case:
        out = trained(w, "--max_steps=4", "--eval_interval=4")
        latest = out / "checkpoints" / "latest.pt"
        latest.write_bytes(latest.read_bytes()[:size(latest.stat().st_size)])
        best(out / "checkpoints" / "best.pt")
        return Case(cli.main, w.argv("--max_steps=6", "--eval_interval=4", "--resume"), protect=(out,))
    return setup


# ---- setups: token cache, corpora and prepare ----
def prepare_on(data: Callable[[Where], Path], cache: Callable[[Where], Path] = lambda w: w.tmp / "cache",
               protect: bool = True, absent: tuple[str, ...] = ("cache/tokens/*", "disk/cache/tokens/*")
               ) -> Callable[[Where], Case]:
    """`python -m gpt_trainer.prepare` on the --data_path and --cache_dir a setup makes: the data is kept as it was
    (`protect`; a named pipe cannot be read to compare it) and no token cache is published (`absent`; "cache": a
    --data_path refused before the cache folder is made)."""
    def setup(w: Where) -> Case:
        from gpt_trainer.commands import prepare

        path, cache_path = data(w), cache(w)
        return Case(prepare.main, [f"--data_path={path}", f"--cache_dir={cache_path}"],
                    protect=(path,) if protect else (), absent=absent)
    return setup


def named_pipe(w: Where) -> Path:
    os.mkfifo(w.tmp / "pipe.txt")  # nothing writes to it: reading it would wait for ever
    return w.tmp / "pipe.txt"


def dangling_link(w: Where) -> Path:
    (w.tmp / "corpus.txt").symlink_to(w.tmp / "moved-away.txt")
    return w.tmp / "corpus.txt"


def records_without_the_text_field(w: Where) -> Path:
    (w.tmp / "records.jsonl").write_text("".join(json.dumps({"content": f"第{i}首"}, ensure_ascii=False) + "\n"
                                                 for i in range(3)), encoding="utf-8")
    return w.tmp / "records.jsonl"


def folder_with_a_cut_gzip(w: Where) -> Path:
    import gzip

    data = w.tmp / "corpus"
    data.mkdir()
    shutil.copy(CLASSIC_POEMS, data / "a.txt")
    whole = gzip.compress(CLASSIC_POEMS.read_bytes())
    (data / "b.txt.gz").write_bytes(whole[: len(whole) // 2])  # a download cut short
    return data


def classic_poems_copy(w: Where) -> Path:
    shutil.copy(CLASSIC_POEMS, w.tmp / "poems.txt")
    return w.tmp / "poems.txt"


APPENDER = ("import sys, time\n"
            "while True:\n"
            "    with open(sys.argv[1], 'a', encoding='utf-8') as f:\n"
            "        f.write('新添一行\\n')\n"
            "    time.sleep(0.001)\n")


def corpus_written_while_prepared(w: Where) -> Case:
    """Another process appends to the corpus all along, as to a log being written (a real writer, really running)."""
    case = prepare_on(classic_poems_copy, protect=False)(w)
    corpus = Path(case.argv[0].split("=", 1)[1])

    def prepare_while_it_grows(argv: list[str]) -> int:
        writer = subprocess.Popen([sys.executable, "-c", APPENDER, str(corpus)])
        try:
            size, deadline = corpus.stat().st_size, time.monotonic() + 30
            while corpus.stat().st_size == size and time.monotonic() < deadline:  # it has started writing
                time.sleep(0.01)
            return case.command(argv)
        finally:
            writer.kill()
            writer.wait()
    return Case(prepare_while_it_grows, case.argv, absent=case.absent)


def train_on(data: Callable[[Where], Path]) -> Callable[[Where], Case]:
    """A tiny training run on the --data_path a setup makes: refused before the run folder exists."""
    def setup(w: Where) -> Case:
        path = data(w)
        return Case(cli.main, w.argv(f"--data_path={path}", "--max_steps=2"), protect=(path,), absent=("out",))
    return setup
# ---- setups: run folders and export ----
def export_into(folder: Callable[[Where], Path], *extra: str) -> Callable[[Where], Case]:
    """python -m gpt_trainer.export of the format 2 fixture into the folder the setup makes; the folder it is in stays
    as it was (the target unchanged, no staging folder left beside it)."""
    def setup(w: Where) -> Case:
        out = folder(w)
        return Case(export.main, [str(CHECKPOINT_V2), str(out), *extra], protect=(out.parent,))
    return setup


def a_training_run(w: Where) -> Path:
    return trained(w, "--max_steps=2", "--eval_interval=2")


def a_folder_with_a_readme_and_config_json(w: Where) -> Path:
    (w.tmp / "project").mkdir()
    (w.tmp / "project" / "README.md").write_text("# my project\n")
    (w.tmp / "project" / "config.json").write_text('{"mine": true}\n')
    return w.tmp / "project"


def on_a_full_disk(w: Where) -> Path:
    """A new folder on a real disk (tmpfs) of one 4 KiB page: the weights (17 KiB) do not fit."""
    return w.tmpfs(w.tmp / "disk", "size=4k") / "model"


def an_earlier_export_on_a_full_disk(w: Where) -> Path:
    """An earlier export on a real disk (tmpfs), then a file of the user's that leaves one 4 KiB page: the new weights
    do not fit beside the old ones."""
    disk = w.tmpfs(w.tmp / "disk", "size=64k")
    assert export.main([str(CHECKPOINT_V2), str(disk / "model")]) == 0
    (disk / "filler.bin").write_bytes(bytes(shutil.disk_usage(disk).free - 4096))
    return disk / "model"


# ---- setups: --init_from and resume ----
def init_from(change: Callable[[Path], None], *extra: str) -> Callable[[Where], Case]:
    """A transformers GPT-2 folder of TINY_SHAPE's shape (tests/test_hf.py's), changed by `change`: refused before
    anything is written, the folder untouched."""
    def setup(w: Where) -> Case:
        path = w.tmp / "gpt2"
        make_folder(path)
        change(path)
        return Case(cli.main, w.argv(f"--init_from={path}", "--max_steps=2", *extra), protect=(path,),
                    absent=("out",))
    return setup


def bare_resume_of_an_edited_config_json(w: Where) -> Case:
    """A run stopped before its first checkpoint: its config.json says what the run is, and a bare --resume takes
    the text, tokenizer and shape from it; this one was edited to hold a value no flag takes."""
    out = w.tmp / "out"
    out.mkdir()
    RunFolder(out).mark()
    (out / "config.json").write_text(json.dumps({"n_layer": "2", "segments": []}))
    return Case(cli.main, [f"--output_dir={out}", f"--cache_dir={w.tmp / 'cache'}", "--resume", "--report_to=none"],
                protect=(out,), absent=("cache",))


# ---- setups: sweeps ----
def a_sweep(w: Where) -> Path:
    """A valid two-point grid of the real training program (the refused runs never start it)."""
    config = {"program": str(ROOT / "train_single_gpu.py"), "method": "grid",
              "parameters": {"learning_rate": {"values": [1.0e-3, 2.0e-3]}}}
    path = w.tmp / "sweep.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def sweep_into(where: Callable[[Where], Path]) -> Callable[[Where], Case]:
    """The sweep run into --output_dir `where` (a file, or a folder of the user's), which must stay as it is."""
    def setup(w: Where) -> Case:
        out, sweep_file = where(w), a_sweep(w)
        return Case(sweep.main, [str(sweep_file), f"--output_dir={out}", "--report_to=none"],
                    protect=(out, sweep_file), absent=("**/trial-*",))
    return setup


def a_folder_of_mine(w: Where) -> Path:
    (w.tmp / "mine" / "data").mkdir(parents=True)
    (w.tmp / "mine" / "notes.txt").write_text("my notes\n")
    return w.tmp / "mine"


def damaged_sweep_state(damage: Callable[[dict], bytes]) -> Callable[[Where], Case]:
    """A sweep's folder whose first trial finished, as the runner records it, its state file then damaged."""
    def setup(w: Where) -> Case:
        sweep_file, out = a_sweep(w), w.tmp / "sweep"
        (out / "trial-001").mkdir(parents=True)
        (out / "trial-001" / "metrics.jsonl").write_text('{"step": 1, "eval/loss": 2.5}\n')
        state = {"fingerprint": sweep.fingerprint(sweep.load_sweep(str(sweep_file))),
                 "trials": [{"name": "trial-001", "status": "finished", "metric": 2.5,
                             "params": {"learning_rate": 1e-3}, "owner": {"host": "node-ü", "pid": 4242}}]}
        (out / "sweep_state.json").write_bytes(damage(state))
        return Case(sweep.main, [str(sweep_file), f"--output_dir={out}", "--report_to=none"],
                    protect=(out / "sweep_state.json", out / "trial-001"), absent=("sweep/trial-002",))
    return setup


def first_trial(change: Callable[[dict], None]) -> Callable[[dict], bytes]:
    def damage(state: dict) -> bytes:
        change(state["trials"][0])
        return json.dumps(state).encode()
    return damage


# ---- setups: processes, rendezvous and sampling ----
def by_hand(rank: int, **variables: str | None) -> Callable[[Where], Case]:
    """The training command as rank `rank` of two processes started without a launcher (as srun or a pod's command
    starts them): the variables torchrun would set, given by hand (None: not set; the port: a free one, so closed),
    and a 2 s --dist_timeout. The sockets are real; each case must end within seconds of the time-out."""
    def setup(w: Where) -> Case:
        given = {"RANK": str(rank), "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": str(free_port()),
                 **variables}
        return Case(with_environment(given, cli.main), w.argv("--max_steps=2", "--dist_timeout=2"), absent=("out",),
                    after=within_seconds(20))
    return setup


def port_in_use(w: Where) -> Case:
    """Rank 0 opens the rendezvous on a port another program listens on."""
    taken = socket.create_server(("", 0))
    case = by_hand(0, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(taken.getsockname()[1]))(w)
    case.after = lambda: taken.close()
    return case


def with_environment(variables: dict[str, str | None], command: Callable[[list[str]], int]) -> Callable:
    """`command` run with these environment variables (None: removed), the environment restored after it."""
    def run(argv: list[str]) -> int:
        before = {name: os.environ.get(name) for name in variables}
        try:
            set_environment(variables)
            return command(argv)
        finally:
            set_environment(before)
    return run


def set_environment(variables: dict[str, str | None]) -> None:
    for name, value in variables.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def within_seconds(limit: float) -> Callable[[], None]:
    started = time.monotonic()
    return lambda: None if time.monotonic() - started < limit else pytest.fail(f"took more than {limit} s")


def sharded(w: Where) -> Path:
    """A tiny run whose checkpoints are sharded (test_checkpoint.sharded_run: an FSDP run's files, from one process)."""
    return sharded_run(parse_args(w.argv("--max_steps=2", "--eval_interval=2"))).path


def resume_a_damaged_shard_without_best(w: Where) -> Case:
    out = sharded(w)
    shutil.rmtree(out / "checkpoints" / "best")
    zero_a_block(next((out / "checkpoints" / "latest").glob("shard-*.safetensors")))
    return Case(cli.main, w.argv("--max_steps=4", "--resume"), protect=(out,))


def sample_a_foreign_state_json(w: Where) -> Case:
    latest = sharded(w) / "checkpoints" / "latest"
    rewrite(latest, "state.json", b'{"format_version": 3, "config": ')
    return Case(sample.main, [str(latest), "--device=cpu"], protect=(latest,))


def flags_on_processes(count: int, *extra: str) -> Callable[[Where], Case]:
    """Bad flags for rank 0 of `count` processes started without a rendezvous (MASTER_ADDR, MASTER_PORT unset): the
    resolve step refuses them before the processes meet (joining would stop the run with another sentence)."""
    given = {"WORLD_SIZE": str(count), "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": None, "MASTER_PORT": None}
    return lambda w: Case(with_environment(given, cli.main), w.argv("--max_steps=2", *extra), absent=("out",))


def row(name: str, setup: Callable[[Where], Case], exit_code: int, message: str):
    return pytest.param(setup, exit_code, message, id=name)


FAILURES = [
    row("output_dir holds the user's config.json and metrics.jsonl", run_folder_with_foreign_files, 2,
        r"already holds files this program did not write \(config\.json, metrics\.jsonl\)"),
    row("the same with --overwrite", lambda w: run_folder_with_foreign_files(w, "--overwrite"), 2,
        r"already holds files this program did not write \(config\.json, metrics\.jsonl\)"),
    row("output_dir is a project folder", project_folder, 2,
        r"project already holds files this program did not write \(README\.md, src\)"),
    row("latest.pt damaged, no best.pt", damaged_latest_and_no_best, 2,
        r"latest\.pt is damaged \(\S+/data/\d+ does not match the CRC-32 .*There is no intact checkpoint to fall back "
        r"to: start the run again with --overwrite"),
    row("--min_lr above --learning_rate", flags("--min_lr=1e-2", "--learning_rate=1e-3"), 2,
        r"--min_lr 0\.01 is above --learning_rate 0\.001"),
    row("resume on other text with the same characters", other_text_same_characters, 2,
        r"cannot resume from \S+latest\.pt: the training text differs .* pass --allow_new_data"),
    row("--wandb_run_name ../../escape", run_name(lambda w: "../../escape"), 2,
        r"'\.\./\.\./escape' .* must be a plain name"),
    row("--wandb_run_name an absolute path", run_name(lambda w: str(w.tmp / "elsewhere" / "escape")), 2,
        r"must be a plain name"),
    row("diverges at an evaluation before --max_bad_steps", diverging, 1,
        r"^error: training diverged: the validation loss at step \d+ is not finite"),
    row("a real full disk (tmpfs) mid-run", full_disk("300k"), 1,
        r"could not write the checkpoint \S+latest\.pt \(No space left on device\)\. There was no earlier one\."),
    row("a real disk that fills in the middle of a checkpoint", full_disk("1m"), 1,
        r"could not write the checkpoint \S+\.pt \(No space left on device"),
    row("a real disk full at start-up (tmpfs)", disk_full_at_start("4k"), 1, r"^error: the disk is full"),
    row("a real disk full when TensorBoard starts", disk_full_at_start("12k"), 1, r"^error: the disk is full"),
    row("--cache_dir is a file", cache_dir(a_file), 2, r"--cache_dir \S+cache\.txt is a file, not a folder"),
    row("--cache_dir on a read-only disk (tmpfs)", cache_dir(on_a_read_only_disk), 2,
        r"--cache_dir \S+ cannot be written \(\S+: Read-only file system\)"),
    row("--cache_dir in /proc", cache_dir(lambda w: Path("/proc/gpt_trainer_cache")), 2,
        r"--cache_dir /proc/gpt_trainer_cache cannot be written"),
    row("--output_dir a dangling symlink", output_dir_link(lambda tmp: tmp / "missing"), 2,
        r"--output_dir \S+link is a symbolic link that leads nowhere"),
    row("--output_dir a symlink to itself", output_dir_link(lambda tmp: tmp / "link"), 2,
        r"--output_dir \S+link is a symbolic link that leads nowhere"),
    row("an unreadable file in the --data_path folder", unreadable_file_in_data_folder, 2,
        r"bad\.txt cannot be read \(Input/output error\)"),
    row("a GB18030 sweep file", sweep_file("method: grid\n# 学习率\nparameters:\n  seed: {values: [1, 2]}\n",
                                           "gb18030"), 2, r"sweep\.yaml is not UTF-8 text \(byte offset \d+\)"),
    row("a Latin-1 sweep file", sweep_file("method: grid\n# réglages\nparameters:\n  seed: {values: [1, 2]}\n",
                                           "latin-1"), 2, r"sweep\.yaml is not UTF-8 text"),
    row("a sweep whose values are all refused", sweep_file("method: grid\nparameters:\n"
                                                           "  learning_rate: {values: [-1, 0]}\n"), 2,
        r"`learning_rate` has values train_single_gpu\.py would refuse.*: -1: --learning_rate must be .*; 0: "
        r"--learning_rate must be"),
    row("sample --temperature=nan", sample_with("--temperature=nan"), 2, r"--temperature must be .* \(got nan\)"),
    row("sample --temperature=-1", sample_with("--temperature=-1"), 2, r"--temperature must be .* \(got -1\.0\)"),
    row("sample --top_k=-5", sample_with("--top_k=-5"), 2, r"--top_k must be at least 0 \(got -5\)"),
    row("sample --tokens=-3", sample_with("--tokens=-3"), 2, r"--tokens must be in \[0, 10000\] \(got -3\)"),
    row("sample --top_p=2", sample_with("--top_p=2"), 2, r"--top_p must be in \(0, 1\] \(got 2\.0\)"),
    row("a model too large for memory", model_too_large, 1, r"^error: out of memory: "),
    # ---- checkpoints and loading files (round three) ----
    row("--resume from a latest.pt that would run code (best.pt intact)", resume_a_planted_latest, 2,
        r"latest\.pt was refused, and nothing in it was run: loading it would call posix\.system"),
    row("sample a checkpoint that would run code", reading("sample", planted), 2,
        r"planted\.pt was refused, and nothing in it was run: loading it would call posix\.system"),
    row("export a checkpoint that would run code", reading("export", planted), 2,
        r"planted\.pt was refused, and nothing in it was run: loading it would call posix\.system"),
    *(row(f"{command} nanoGPT's ckpt.pt", reading(command, lambda tmp: nanogpt_checkpoint(tmp / "ckpt.pt")), 2,
          r"ckpt\.pt is nanoGPT's checkpoint \(it has model_args and iter_num\), not one written by "
          r"train_single_gpu\.py") for command in ("resume", "sample", "export")),
    *(row(f"{command} another program's file with model and config",
          reading(command, lambda tmp: other_program_checkpoint(tmp / "other.pt")), 2,
          r"other\.pt is not a checkpoint written by train_single_gpu\.py \(its keys: config, epoch, model; a file of "
          r"another program\?\)") for command in ("resume", "sample", "export")),
    *(row(f"{command} a checkpoint whose weights do not fit its configuration", reading(command, wrong_weights), 2,
          r"edited\.pt does not hold the weights its configuration describes \(RuntimeError: .*\)\. Use another "
          r"checkpoint of the run\.$") for command in ("sample", "export")),
    row("latest.pt cut short, no best.pt", latest_cut_short(lambda size: size // 2, Path.unlink), 2,
        r"latest\.pt is not a readable checkpoint \(it is not the zip container torch\.save writes\): it was cut "
        r"short .*There is no intact checkpoint to fall back to"),
    row("latest.pt empty, best.pt damaged", latest_cut_short(lambda size: 0, zero_a_block), 2,
        r"latest\.pt is not a readable checkpoint \(the file is empty\).*There is no intact checkpoint to fall back "
        r"to"),
    # ---- token cache, corpora and prepare (round three) ----
    row("prepare --cache_dir is a file", prepare_on(classic_poems_copy, lambda w: a_file(w)), 2,
        r"^error: --cache_dir \S+cache\.txt is a file, not a folder\. Choose another --cache_dir\.$"),
    row("prepare --data_path a named pipe", prepare_on(named_pipe, protect=False, absent=("cache",)), 2,
        r"pipe\.txt is a named pipe \(FIFO\), not a regular file: preparation reads the text twice"),
    row("prepare --data_path a symlink that leads nowhere", prepare_on(dangling_link, absent=("cache",)), 2,
        r"corpus\.txt is a symbolic link that leads nowhere"),
    row("prepare on .jsonl records none of which has --text_field", prepare_on(records_without_the_text_field), 2,
        r"none of its 3 JSON records has a `paragraphs` list or a `text` string.*--text_field"),
    row("training on a folder holding a .gz cut short", train_on(folder_with_a_cut_gzip), 2,
        r"b\.txt\.gz cannot be decompressed \(.*\): the file is cut short or damaged\. Replace it"),
    row("a corpus written to while prepare reads it", corpus_written_while_prepared, 1,
        r"poems\.txt changed while it was read \(.*no token cache was written\. Run again once the corpus is "
        r"stable\.$"),
    row("prepare on a real full disk (tmpfs)", prepare_on(classic_poems_copy,
                                                          lambda w: w.tmpfs(w.tmp / "disk", "size=16k") / "cache"), 1,
        r"^error: the disk is full \(\S+ could not be written\)\. Free some space, then run the same command "
        r"again\.$"),
    # ---- run folders and export (round three) ----
    row("export into a training run's folder, --overwrite", export_into(a_training_run, "--overwrite"), 2,
        r"out is a training run's folder \(it holds \.gpt-trainer-run\).* refused, --overwrite too"),
    row("export --overwrite into a folder with the user's README.md and config.json",
        export_into(a_folder_with_a_readme_and_config_json, "--overwrite"), 2,
        r"project holds files no export wrote \(README\.md, config\.json\): it has no \.gpt-trainer-export"),
    row("export onto a real full disk (tmpfs)", export_into(on_a_full_disk), 1,
        r"^error: the disk is full \(\S+/disk/model/model\.safetensors could not be written\)\. Free some space, "
        r"then run the same command again\.$"),
    row("export --overwrite of an earlier export on a real full disk (tmpfs)",
        export_into(an_earlier_export_on_a_full_disk, "--overwrite"), 1,
        r"^error: the disk is full \(\S+/disk/model/model\.safetensors could not be written\)\. Free some space, "
        r"then run the same command again\.$"),
    row("--wandb_run_name with a newline", run_name(lambda w: "tiny\nrun"), 2,
        r"'tiny\\nrun' is also the name of the TensorBoard folder .* no line break or other control character"),
    # ---- --init_from and resume (round three) ----
    row("--init_from weights with NaN and inf", init_from(with_values("transformer.h.1.mlp.c_fc.weight", float("nan"),
                                                                      float("inf"))), 2,
        r"are not all finite numbers: h\.1\.mlp\.c_fc\.weight \(1 NaN, 1 infinite of 4,096 values\)"),
    row("--init_from int8 weights", init_from(as_dtype("transformer.h.0.attn.c_attn.weight", torch.int8)), 2,
        r"are not all floating point: h\.0\.attn\.c_attn\.weight \(int8\)\. A run starts from fp16, bf16"),
    row("--init_from config.json an array", init_from(config_text(b"[1, 2]")), 2,
        r"config\.json holds a JSON array, not an object of settings"),
    row("--init_from config.json with n_layer as text", init_from(lambda p: broken(p, "config.json", n_layer="2")), 2,
        r"config\.json gives sizes that are not whole numbers of at least 1 \(n_layer is \"2\"\)"),
    row("--init_from config.json with null sizes", init_from(lambda p: broken(p, "config.json", n_embd=None)), 2,
        r"\(n_embd is null\)"),
    row("--init_from config.json with a negative size", init_from(lambda p: broken(p, "config.json", n_layer=-2)), 2,
        r"\(n_layer is -2\)"),
    row("--init_from config.json with a zero size", init_from(lambda p: broken(p, "config.json", n_positions=0)), 2,
        r"\(n_positions is 0\)"),
    row("--init_from config.json not UTF-8", init_from(config_text(b'{"model_type": "gpt2", "note": "\xe9t\xe9"}')),
        2, r"config\.json is not UTF-8 text \(byte offset 32\)"),
    row("--init_from config.json cut short", init_from(cut_short), 2, r"config\.json is not valid JSON \(.*line \d+"),
    row("--init_from an empty string", flags("--init_from="), 2, r"--init_from '' names no folder"),
    row("--init_from blanks", flags("--init_from=  "), 2, r"--init_from '  ' names no folder"),
    row("--n_embd that differs from the --init_from folder's", init_from(lambda p: None, "--n_embd=33"), 2,
        r"--n_embd 33 \(the folder's: 32\) contradicts"),
    row("a bare --resume of a hand-edited config.json", bare_resume_of_an_edited_config_json, 2,
        r"the run records n_layer '2', which no flag of that name takes .* Give --n_layer on the command line"),
    # ---- sweeps (round three) ----
    row("sweep --output_dir a file", sweep_into(a_file), 2, r"--output_dir \S+cache\.txt is a file, not a folder"),
    row("sweep --output_dir a folder with the user's files", sweep_into(a_folder_of_mine), 2,
        r"--output_dir \S+mine already holds files no sweep wrote \(data, notes\.txt\)"),
    row("sweep_state.json truncated", damaged_sweep_state(lambda state: json.dumps(state, indent=1).encode()[:50]), 2,
        r"sweep_state\.json is damaged: it is not valid JSON \(.*line \d+, column \d+\)\..* move it aside"),
    row("sweep_state.json empty", damaged_sweep_state(lambda state: b""), 2,
        r"sweep_state\.json is damaged: it is empty\..*the trials' folders are kept"),
    row("sweep_state.json holds []", damaged_sweep_state(lambda state: b"[]"), 2,
        r"sweep_state\.json is damaged: it holds \[\], not the mapping of `fingerprint` and `trials`"),
    row("sweep_state.json: a trial without params", damaged_sweep_state(first_trial(lambda t: t.pop("params"))), 2,
        r"sweep_state\.json is damaged: its trial #1 \(trial-001\) has no `params`"),
    row("sweep_state.json: a trial's fields of the wrong types",
        damaged_sweep_state(first_trial(lambda t: t.update(params=["learning_rate"], metric="2.5"))), 2,
        r"sweep_state\.json is damaged: its trial #1 \(trial-001\) has `params` \[\"learning_rate\"\], not a mapping"),
    row("sweep_state.json not UTF-8",
        damaged_sweep_state(lambda state: json.dumps(state, ensure_ascii=False).encode("latin-1")), 2,
        r"sweep_state\.json is damaged: it is not UTF-8 text \(byte offset \d+\)"),
    row("a grid whose --min_lr is above some --learning_rate",
        sweep_file("method: grid\nparameters:\n  learning_rate: {values: [1.0e-3, 2.0e-2]}\n"
                   "  min_lr: {value: 1.0e-2}\n"), 2,
        r"refuses 1 of the 2 trials checked \(every point of the grid\).*`--learning_rate=0\.001`: --min_lr 0\.01 is "
        r"above --learning_rate 0\.001"),
    row("a grid of --data_path values with --use_chinese fixed",
        sweep_file("method: grid\nparameters:\n  use_chinese: {value: true}\n  data_path: {values: [a.txt, b.txt]}\n"),
        2, r"refuses 2 of the 2 trials .*`--data_path=a\.txt`: --use_chinese asks for the Chinese poetry corpus, but "
           r"--data_path a\.txt names other text"),
    row("a random sweep whose ranges of --min_lr and --learning_rate overlap",
        sweep_file("method: random\nparameters:\n  learning_rate: {distribution: log_uniform_values, min: 1.0e-4, "
                   "max: 1.0e-2}\n  min_lr: {distribution: uniform, min: 0.0, max: 1.0e-3}\n"), 2,
        r"refuses 1 of the 4 trials checked \(every combination of .* the ends of its range\).*"
        r"`--learning_rate=0\.0001 --min_lr=0\.001`: --min_lr 0\.001 is above"),
    # ---- processes, rendezvous and sampling (round three) ----
    row("rendezvous: a closed port on 127.0.0.1", by_hand(1, MASTER_ADDR="127.0.0.1"), 1,
        r"^error: rank 1 could not join the rendezvous at 127\.0\.0\.1:\d+ \(MASTER_ADDR:MASTER_PORT\) within 2 s "
        r"\(--dist_timeout\): nothing listens on port \d+ there \(connection refused\)\. Check that MASTER_ADDR is "
        r"rank 0's machine .* no firewall blocks the port; `python -m gpt_trainer\.doctor --distributed`"),
    row("rendezvous: a name that does not resolve", by_hand(1, MASTER_ADDR="no-such-host.invalid"), 1,
        r"rendezvous at no-such-host\.invalid:\d+ .* within 2 s \(--dist_timeout\): the name "
        r"no-such-host\.invalid does not resolve"),
    # what comes back depends on the network between: nothing where it drops the packets, a refusal or an answer
    # from something else where a proxy or firewall takes them (as on the machine these tests were written on)
    row("rendezvous: a non-routable address", by_hand(1, MASTER_ADDR="10.255.255.1", MASTER_PORT="29500"), 1,
        r"rendezvous at 10\.255\.255\.1:29500 .* within 2 s \(--dist_timeout\): (10\.255\.255\.1 does not answer|"
        r"something answers there, but not as the job's rendezvous|nothing listens on port 29500 there|"
        r"10\.255\.255\.1 cannot be reached).*gpt_trainer\.doctor --distributed"),
    row("rendezvous: rank 0 waits alone", by_hand(0, MASTER_ADDR="127.0.0.1"), 1,
        r"rank 0 opened it, but only 1 of the 2 processes arrived\. Check that the other processes run, with "
        r"MASTER_ADDR set to this machine"),
    row("rendezvous: rank 0's port in use", port_in_use, 1,
        r"rank 0 could not join .*: port \d+ is in use on this machine .* choose another MASTER_PORT"),
    row("WORLD_SIZE set by hand, MASTER_ADDR not", by_hand(1, MASTER_ADDR=None), 2,
        r"WORLD_SIZE=2 makes this process rank 1 of several, but MASTER_ADDR is not set"),
    row("MASTER_PORT not a number", by_hand(1, MASTER_ADDR="127.0.0.1", MASTER_PORT="http"), 2,
        r"MASTER_PORT must be a port number from 1 to 65535 \(got 'http'\)"),
    row("sample --tokens above the cap", sample_with("--tokens=10001"), 2,
        r"--tokens 10,001 is more than one sample draws \(10,000 per prompt\).* sampling again with the end of this "
        r"one as --prompts"),
    row("a sharded latest with a damaged shard, no best", resume_a_damaged_shard_without_best, 2,
        r"latest is damaged \(shard-00001-model-00001-of-00001\.safetensors does not match the SHA-256 recorded when "
        r"it was written\): it changed after it was written\. There is no intact checkpoint to fall back to"),
    row("sample a sharded checkpoint whose state.json is not ours", sample_a_foreign_state_json, 2,
        r"latest is not a checkpoint written by train_single_gpu\.py: its state\.json cannot be read as one "
        r"\(JSONDecodeError"),
    row("export a folder that holds no checkpoint", lambda w: Case(
        export.main, [str(w.tmp), str(w.tmp / "exported")], absent=("exported",)), 2,
        r"no such checkpoint \(there is no such file, and it is not a readable checkpoint folder or run folder\)"),
    # ---- the resolve step: conflicts between flags, before the processes meet or any text is read (issue 29) ----
    row("--global_batch_size with --gradient_accumulation_steps",
        flags("--global_batch_size=8", "--gradient_accumulation_steps=2"), 2,
        r"^error: --global_batch_size sets --gradient_accumulation_steps: give one of them, not both\.$"),
    row("--global_batch_size that 2 processes cannot share", flags_on_processes(2, "--global_batch_size=9"), 2,
        r"^error: --global_batch_size 9 does not divide among 2 processes: use a multiple of 2\.$"),
    row("--global_batch_size not a multiple of --batch_size x 2 processes",
        flags_on_processes(2, "--global_batch_size=12", "--batch_size=4"), 2,
        r"^error: --global_batch_size 12 is not a multiple of --batch_size 4 x 2 process\(es\): use a multiple of 8"),
    row("a sweep whose trials give --global_batch_size with --gradient_accumulation_steps",
        sweep_file("method: grid\nparameters:\n  global_batch_size: {value: 32}\n"
                   "  gradient_accumulation_steps: {values: [1, 2]}\n"), 2,
        r"refuses 1 of the 2 trials checked \(every point of the grid\).*--global_batch_size sets "
        r"--gradient_accumulation_steps: give one of them, not both\."),
]


@pytest.mark.parametrize("setup, exit_code, message", FAILURES)
def test_every_failure_a_user_can_cause_ends_in_a_sentence(setup, exit_code, message, tmp_path, tiny_argv, tmpfs,
                                                           capsys, monkeypatch):
    # a thread that dies prints its traceback to stderr, as it does outside pytest (pytest turns it into a warning)
    monkeypatch.setattr(threading, "excepthook", threading.__excepthook__)
    case = setup(Where(tmp_path, tiny_argv, tmpfs))
    before = {path: contents(path) for path in case.protect}
    capsys.readouterr()  # what the setup printed
    threads = set(threading.enumerate())
    code = case.command(case.argv)
    for thread in set(threading.enumerate()) - threads:  # what the command's own threads print comes before the end
        thread.join(timeout=5)
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1] if err.strip() else ""
    assert code == exit_code, err
    assert last.startswith("error: ") and re.search(message, last), err
    assert "Traceback" not in err and "enforce fail" not in err, err
    for path, was in before.items():
        assert contents(path) == was, f"{path} changed"
    for pattern in case.absent:
        assert not list(tmp_path.glob(pattern)), f"{pattern} was created"
    if case.after:
        case.after()


def test_a_real_full_disk_during_a_sharded_save_stops_in_a_sentence_and_keeps_the_checkpoint_before(tiny_argv,
                                                                                                      tmp_path, tmpfs):
    """A sharded checkpoint (an FSDP run's, written by one process: test_checkpoint.sharded_run) on a real 1 MiB tmpfs:
    the first latest/ (~760 KiB) fits, best/ at the same step does not. The save stops the run in words, removes its
    staging folder, and the latest checkpoint is intact."""
    disk = tmpfs(tmp_path / "disk", "size=1m")
    cfg = parse_args(tiny_argv(*GPT2_ADAMW, f"--output_dir={disk / 'out'}", "--max_steps=4", "--eval_interval=2"))
    with pytest.raises(CheckpointNotWritten) as stopped:
        sharded_run(cfg)
    assert re.match(r"could not write the checkpoint \S+/checkpoints/best \(No space left on device.*\)\. There was no "
                    r"earlier one\. Free some space", run_stopped(stopped.value))
    checkpoints = disk / "out" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest"]
    assert checkpoint.load(checkpoints / "latest", lazy=True)["trainer"]["step"] == 2


def test_a_damaged_latest_checkpoint_falls_back_to_an_intact_best_pt(tiny_argv, tmp_path, capsys):
    argv = tiny_argv("--max_steps=4", "--eval_interval=4")
    assert cli.main(argv) == 0
    checkpoints = tmp_path / "out" / "checkpoints"
    zero_a_block(checkpoints / "latest.pt")
    capsys.readouterr()
    assert cli.main([*argv, "--resume", "--max_steps=6"]) == 0
    captured = capsys.readouterr()
    fell_back = (r"latest\.pt is damaged \(.*\): it changed after it was written\. Resuming from "
                 + re.escape(str(checkpoints / "best.pt")) + r" \(step 4\) instead")
    assert re.search(fell_back, captured.err), captured.err
    assert f"resumed from {checkpoints / 'best.pt'} at step 4" in captured.out
    assert checkpoint.load(checkpoints / "latest.pt")["trainer"]["step"] == 6  # intact again, and the run complete


def test_resuming_on_other_text_with_allow_new_data_trains_and_config_json_records_it(tiny_argv, tmp_path, tmpfs):
    case = other_text_same_characters(Where(tmp_path, tiny_argv, tmpfs))
    assert cli.main([*case.argv, "--allow_new_data"]) == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert [segment["from_step"] for segment in config["segments"]] == [0, 2]
    assert "corpus_digest" in config["segments"][-1]["changed"]
    assert checkpoint.load(tmp_path / "out" / "checkpoints" / "latest.pt")["trainer"]["step"] == 4


# ---- failures that come mid-run, from outside: the real script in a subprocess, real signals ------------------------
def start_training(tmp_path: Path, cache: Path, *extra: str, group: bool = False) -> subprocess.Popen:
    """train_single_gpu.py on the classic poems into tmp/out, printing a row per step; group=True: in its own process
    group, as a terminal's foreground job is (Ctrl-C goes to the group)."""
    argv = [f"--data_path={CLASSIC_POEMS}", f"--cache_dir={cache}", f"--output_dir={tmp_path / 'out'}", *TINY_SHAPE,
            "--max_steps=100000", "--log_interval=1", "--eval_interval=100000", "--save_interval=100000", *extra]
    return subprocess.Popen([sys.executable, str(ROOT / "train_single_gpu.py"), *argv], cwd=ROOT, env=script_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=group)


def wait_for_rows(proc: subprocess.Popen, metrics: Path, rows: int, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not metrics.exists() or len(metrics.read_text().splitlines()) < rows:
        assert proc.poll() is None, f"training ended early (exit {proc.returncode}): {proc.stderr.read()}"
        assert time.monotonic() < deadline, f"{metrics} has fewer than {rows} rows after {timeout} s"
        time.sleep(0.05)


def ends_in_a_sentence(err: str, words: str) -> None:
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and words in last, err
    assert "Traceback" not in err, err


@pytest.fixture
def stop_at_the_end():
    """Kill what a test started if it is still running when the test ends (a failed assertion)."""
    started = []
    yield started.append
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.mark.slow
def test_a_second_ctrl_c_stops_at_once_with_exit_130(tmp_path, cache_dir, stop_at_the_end):
    # a bigger model than the tiny one: its steps and saves take long enough for the second Ctrl-C to come while the
    # first is being honoured (with the tiny model the run could finish its save and exit in between)
    proc = start_training(tmp_path, cache_dir, "--n_layer=4", "--n_head=4", "--n_embd=256", "--block_size=64",
                          "--batch_size=8", group=True)
    stop_at_the_end(proc)
    wait_for_rows(proc, tmp_path / "out" / "metrics.jsonl", 3)
    err = []

    def read_stderr():  # the second Ctrl-C right after the first was seen
        for line in proc.stderr:
            err.append(line)
            if line.startswith("SIGINT: saving a checkpoint"):
                os.killpg(proc.pid, signal.SIGINT)
    reader = threading.Thread(target=read_stderr)
    reader.start()
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal does on Ctrl-C: the whole foreground group
    proc.stdout.read()
    proc.wait(timeout=60)
    reader.join(timeout=10)
    err = "".join(err)
    assert proc.returncode == 130, err
    ends_in_a_sentence(err, "stopped at once (a second Ctrl-C")
    assert not list((tmp_path / "out" / "checkpoints").glob(".*.tmp-*"))  # a save cut short leaves no stray file


@pytest.mark.slow
def test_the_output_folder_deleted_mid_run_stops_with_exit_1(tmp_path, cache_dir, stop_at_the_end):
    out = tmp_path / "out"
    proc = start_training(tmp_path, cache_dir, "--save_interval=25", "--max_steps=400")  # ~3 s if it went on
    stop_at_the_end(proc)
    wait_for_rows(proc, out / "metrics.jsonl", 3)
    while out.exists():  # what `rm -rf out` does to a folder a process writes to: try until it is gone
        shutil.rmtree(out, ignore_errors=True)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err
    ends_in_a_sentence(err, f"{out} is gone: it vanished while the command used it")
    assert not out.exists()  # not made again by the run


@pytest.mark.slow
def test_sigterm_during_a_long_evaluation_stops_within_seconds(tmp_path, cache_dir, stop_at_the_end, capsys):
    # 20,000 validation batches: about 10 s of evaluation on a CPU, so finishing it would miss the 5 s
    proc = start_training(tmp_path, cache_dir, "--eval_interval=5", "--eval_steps=20000", "--save_interval=5")
    stop_at_the_end(proc)
    metrics = tmp_path / "out" / "metrics.jsonl"
    wait_for_rows(proc, metrics, 4)  # steps 1-4 are logged; step 5 takes milliseconds, then its evaluation starts
    time.sleep(1.0)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)  # what `docker stop` sends
    _, err = proc.communicate(timeout=60)
    took = time.monotonic() - sent
    with capsys.disabled():
        print(f"\nSIGTERM during an evaluation: exited {took:.2f} s after the signal")
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert took < 5, f"exited {took:.1f} s after SIGTERM"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3, 4, 5]
    assert not any("eval/loss" in row for row in rows)  # the evaluation was cut short, not finished
    assert checkpoint.load(tmp_path / "out" / "checkpoints" / "latest.pt")["trainer"]["step"] == 5  # a whole step
    assert "SIGTERM: saving a checkpoint" in err and "Traceback" not in err
