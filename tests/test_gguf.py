"""GGUF export: the file gguf's own reader reads back, and real llama.cpp (node-llama-cpp's prebuilt CPU build)
tokenises a prompt as we do and continues it greedily as transformers and our sampler do. llama.cpp is installed on
first use from the npm registry into .cache/llama-cpp (git-ignored); the llama.cpp tests skip only where node or npm
is missing."""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt_trainer.commands import export
from gpt_trainer.config import parse_args
from gpt_trainer.data.tokenizer import SentencePieceTokenizer
from gpt_trainer.errors import UsageError
from gpt_trainer.model import gguf as to_gguf
from gpt_trainer.model.gpt import new_ids
from gpt_trainer.system.rundir import RunFolder
from tests.conftest import CLASSIC_POEMS, TINY_SHAPE, make_trainer
from tests.test_export import CORPUS, SP_VOCAB, ours

ROOT = Path(__file__).resolve().parents[1]
NODE_LLAMA_CPP = "3.21.1"  # pinned: the llama.cpp it bundles is the one the docs name as tested
LLAMA_CPP_DIR = ROOT / ".cache" / "llama-cpp"
PROMPT = "床前明月光，疑是地上霜。"
NEW = 24  # tokens generated greedily


# ---- a tiny Qwen3 folder as the llama architecture's export writes it ------------------------------------------------
def qwen3_folder(folder: Path, tokenizer: SentencePieceTokenizer) -> Path:
    """A random Qwen3 (2 layers, width 64, 4 heads of 16) with our sentencepiece tokenizer's files. The weights are
    drawn wider than transformers' default (0.02) so that the logits are far apart and greedy decoding is decided
    by the model, not by rounding."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, head_dim=16, max_position_embeddings=64,
                         tie_word_embeddings=False, rms_norm_eps=1e-6, rope_theta=10000.0, initializer_range=0.2)
    model = Qwen3ForCausalLM(config).eval()
    with torch.no_grad():  # norms start at one; other gains make a swapped q/k norm show
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    model.save_pretrained(folder)
    for name, data in export.tokenizer_files(tokenizer, 64, export.special_ids(tokenizer)).items():
        (folder / name).write_bytes(data)
    return folder


@pytest.fixture(scope="module")
def sp_tokenizer() -> SentencePieceTokenizer:
    return SentencePieceTokenizer.train(CORPUS, SP_VOCAB)


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory, sp_tokenizer) -> Path:
    return qwen3_folder(tmp_path_factory.mktemp("qwen3"), sp_tokenizer)


def transformers_greedy(folder: Path, ids: list[int], new: int) -> list[int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return model.generate(torch.tensor([ids]), max_new_tokens=new, do_sample=False)[0, len(ids):].tolist()


# ---- llama.cpp -------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def llama_cpp() -> Path:
    """The folder node-llama-cpp is installed in (installed now if it is not): its prebuilt CPU binaries only (no
    optional GPU packages, no install script: nothing is built or downloaded past the npm packages)."""
    if not (shutil.which("node") and shutil.which("npm")):
        pytest.skip("node and npm are needed to run llama.cpp through node-llama-cpp: install Node.js 20 or later")
    if (platform.system(), platform.machine()) != ("Linux", "x86_64"):
        pytest.skip(f"the pinned llama.cpp binaries are node-llama-cpp's linux-x64 build; this machine is "
                    f"{platform.system()} {platform.machine()}")
    packages = [LLAMA_CPP_DIR / "node_modules" / name / "package.json"
                for name in ("node-llama-cpp", "@node-llama-cpp/linux-x64")]
    if not all(p.is_file() and json.loads(p.read_text())["version"] == NODE_LLAMA_CPP for p in packages):
        LLAMA_CPP_DIR.mkdir(parents=True, exist_ok=True)
        subprocess.run(["npm", "install", "--prefix", str(LLAMA_CPP_DIR), "--omit=optional", "--ignore-scripts",
                        "--no-audit", "--no-fund", f"node-llama-cpp@{NODE_LLAMA_CPP}",
                        f"@node-llama-cpp/linux-x64@{NODE_LLAMA_CPP}"], check=True, timeout=600)
    return LLAMA_CPP_DIR


def llama_greedy(llama_cpp: Path, model: Path, prompt: str, new: int) -> dict:
    """tools/llama_greedy.mjs's answer: the prompt's ids, `new` greedy ids, the llama.cpp release."""
    done = subprocess.run(["node", str(ROOT / "tools" / "llama_greedy.mjs"), str(llama_cpp), str(model), prompt,
                           str(new)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_llama_cpp_tokenises_and_continues_a_qwen3_folder_as_transformers_does(qwen3, sp_tokenizer, llama_cpp):
    to_gguf.write_gguf(qwen3, qwen3 / "model.gguf")
    ids = sp_tokenizer.encode(PROMPT + " 2026 spaces  𠀀")  # digits, runs of spaces, a byte-fallback character
    theirs = llama_greedy(llama_cpp, qwen3 / "model.gguf", PROMPT + " 2026 spaces  𠀀", NEW)
    assert theirs["prompt"] == ids
    expected = transformers_greedy(qwen3, ids, NEW)
    assert len(set(expected)) > 3  # a continuation that says something, not one token repeated
    assert theirs["generated"] == expected
    assert theirs["llama_cpp"]["release"] == "v0.4.0"  # what docs/gguf.md names as tested


@pytest.mark.slow
def test_llama_cpp_runs_the_f16_file(qwen3, sp_tokenizer, llama_cpp, tmp_path):
    """f16 rounding may change a near-tie, so only the tokens' count is compared; the prompt's ids are ours."""
    to_gguf.write_gguf(qwen3, tmp_path / "model.gguf", "f16")
    theirs = llama_greedy(llama_cpp, tmp_path / "model.gguf", PROMPT, NEW)
    assert theirs["prompt"] == sp_tokenizer.encode(PROMPT) and len(theirs["generated"]) == NEW


@pytest.mark.slow
def test_a_gguf_with_the_k_and_q_norms_swapped_continues_otherwise(qwen3, sp_tokenizer, llama_cpp, tmp_path,
                                                                     monkeypatch):
    """The control of the test above: a naming slip that loads without an error shows in the generated ids."""
    block = dict(to_gguf.QWEN3_BLOCK)
    block["self_attn.q_norm.weight"], block["self_attn.k_norm.weight"] = "ATTN_K_NORM", "ATTN_Q_NORM"
    monkeypatch.setattr(to_gguf, "QWEN3_BLOCK", block)
    to_gguf.write_gguf(qwen3, tmp_path / "swapped.gguf")
    ids = sp_tokenizer.encode(PROMPT)
    assert llama_greedy(llama_cpp, tmp_path / "swapped.gguf", PROMPT, NEW)["generated"] != transformers_greedy(
        qwen3, ids, NEW)


GAINS = ("ln_1.weight", "ln_2.weight", "ln_f.weight", "q_norm.weight", "k_norm.weight")


def widened(path: Path, out: Path) -> Path:
    """The checkpoint with random weights drawn wide (std 0.3, gains and biases around 1 and 0): two steps of
    training leave a model that repeats the commonest token (a llama's blocks, their output projections starting at
    zero, are still nearly the identity), which would hide a misplaced matrix."""
    from gpt_trainer.train import checkpoint

    state = checkpoint.load(path)
    generator = torch.Generator().manual_seed(0)
    state["model"] = {key: (torch.randn(value.shape, generator=generator) * (0.3 if value.ndim > 1 else 0.1)
                            + (1.0 if key.endswith(GAINS) else 0.0))
                      for key, value in state["model"].items()}
    if state["config"].get("arch", "gpt2") == "gpt2":
        state["model"]["lm_head.weight"] = state["model"]["wte.weight"]  # tied, as in the model
    torch.save(state, out)
    return out


def trained(tmp_path: Path, cache_dir: Path, *flags: str) -> Path:
    """The best.pt of a tiny run of two steps on the classic poems."""
    cfg = parse_args([f"--data_path={CLASSIC_POEMS}", f"--cache_dir={cache_dir}", f"--output_dir={tmp_path / 'run'}",
                      *TINY_SHAPE, "--max_steps=2", "--eval_interval=2", *flags])
    make_trainer(cfg).train()
    return RunFolder(tmp_path / "run").best


SENTENCEPIECE = ("--tokenizer=sentencepiece", f"--vocab_size={SP_VOCAB}")


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_export_gguf_of_a_run_continues_as_our_sampler_and_transformers_do(llama_cpp, tmp_path, cache_dir, arch):
    """gpt2 as GPT-2, llama as Qwen3: llama.cpp splits the prompt into our ids and continues it with our sampler's
    greedy ids, over the whole context (a llama's rotary positions at every offset, through its key/value cache)."""
    checkpoint = widened(trained(tmp_path, cache_dir, f"--arch={arch}", "--block_size=48", *SENTENCEPIECE),
                         tmp_path / "wide.pt")
    out = tmp_path / "model"
    assert export.main([str(checkpoint), str(out), "--gguf"]) == 0
    state, model, tokenizer = ours(checkpoint)
    assert state["config"]["arch"] == arch
    assert json.loads((out / "config.json").read_text())["model_type"] == {"gpt2": "gpt2", "llama": "qwen3"}[arch]
    prompt = "春眠不觉晓，"
    ids = tokenizer.encode(prompt)
    new = state["config"]["block_size"] - len(ids)  # the whole context: the model's positions end there
    theirs = llama_greedy(llama_cpp, out / "model.gguf", prompt, new)
    assert theirs["prompt"] == ids
    mine = list(new_ids(model, ids, "fp32", new, 0.0, 0, 1.0))  # temperature 0: the argmax
    assert new > 40 and len(set(mine)) > 3  # a continuation that says something, not one token repeated
    assert theirs["generated"] == mine == transformers_greedy(out, ids, new)
    assert "model.gguf" in json.loads((out / export.EXPORT_MARKER).read_text())["files"]
    # an export without --gguf over it removes the earlier GGUF file: it would hold other weights than the folder
    assert export.main([str(checkpoint), str(out), "--overwrite"]) == 0
    assert not (out / "model.gguf").exists()


# ---- gguf's own reader ----------------------------------------------------------------------------------------------
def field(reader, key: str):
    return reader.get_field(key).contents()


@pytest.mark.parametrize("gguf_type", to_gguf.GGUF_TYPES)
def test_ggufs_reader_reads_back_the_metadata_and_every_tensor(qwen3, sp_tokenizer, tmp_path, gguf_type):
    import gguf
    from safetensors.torch import load_file

    to_gguf.write_gguf(qwen3, tmp_path / "model.gguf", gguf_type)
    reader = gguf.GGUFReader(tmp_path / "model.gguf")
    sp = sp_tokenizer.sp
    assert field(reader, "general.architecture") == "qwen3"
    assert (field(reader, "qwen3.block_count"), field(reader, "qwen3.embedding_length"),
            field(reader, "qwen3.attention.head_count"), field(reader, "qwen3.attention.key_length"),
            field(reader, "qwen3.context_length")) == (2, 64, 4, 16, 64)
    assert field(reader, "qwen3.rope.freq_base") == 10000.0
    assert field(reader, "tokenizer.ggml.model") == "llama"
    assert field(reader, "tokenizer.ggml.tokens") == [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    types = field(reader, "tokenizer.ggml.token_type")
    assert types[sp.piece_to_id("<0x0A>")] == gguf.TokenType.BYTE and types[sp.bos_id()] == gguf.TokenType.CONTROL
    assert types[sp.unk_id()] == gguf.TokenType.UNKNOWN and types[sp.piece_to_id("，")] == gguf.TokenType.NORMAL
    assert (field(reader, "tokenizer.ggml.bos_token_id"), field(reader, "tokenizer.ggml.eos_token_id"),
            field(reader, "tokenizer.ggml.unknown_token_id")) == (sp.bos_id(), sp.eos_id(), sp.unk_id())
    assert reader.get_field("tokenizer.ggml.padding_token_id") is None  # ours has none: never a made-up id
    assert (field(reader, "tokenizer.ggml.add_bos_token"), field(reader, "tokenizer.ggml.add_space_prefix")) == (
        False, False)
    weights = load_file(qwen3 / "model.safetensors")
    names = to_gguf.qwen3_names(2)
    tensors = {t.name: t for t in reader.tensors}
    assert sorted(tensors) == sorted(names.values())
    for key, name in names.items():
        expected = weights[key].numpy()
        stored = np.asarray(tensors[name].data).reshape(expected.shape)
        wanted_type = "F16" if gguf_type == "f16" and expected.ndim > 1 else "F32"
        assert tensors[name].tensor_type.name == wanted_type, name
        assert np.array_equal(stored, expected.astype(stored.dtype)), name


# ---- refusals: exit 2, a sentence, nothing written ------------------------------------------------------------------
def test_a_char_checkpoint_with_gguf_is_refused_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "out"
    assert export.main([str(ROOT / "tests" / "fixtures" / "checkpoint_v2.pt"), str(out), "--gguf"]) == 2
    said = capsys.readouterr().err
    assert "char-level" in said and "byte-fallback" in said and "--tokenizer sentencepiece" in said
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_an_init_from_checkpoint_with_gguf_is_refused_before_anything_is_written(tmp_path, capsys):
    """Its tokenizer is the starting folder's tokenizer.json (here a char export's): no sentencepiece model."""
    from gpt_trainer.data.tokenizer import HFTokenizer
    from gpt_trainer.train import checkpoint

    fixture = ROOT / "tests" / "fixtures" / "checkpoint_v2.pt"
    assert export.main([str(fixture), str(tmp_path / "start")]) == 0
    state = checkpoint.load(fixture)
    tokenizer = HFTokenizer((tmp_path / "start" / "tokenizer.json").read_text(), state["vocab_size"])
    torch.save({**state, "tokenizer": tokenizer.to_dict()}, tmp_path / "init_from.pt")
    out = tmp_path / "out"
    assert export.main([str(tmp_path / "init_from.pt"), str(out), "--gguf"]) == 2
    said = capsys.readouterr().err
    assert "--init_from folder's" in said and "--tokenizer sentencepiece" in said
    assert not out.exists()


@pytest.mark.slow
def test_llama_checkpoints_of_a_char_or_init_from_tokenizer_with_gguf_are_refused_before_anything_is_written(
        tmp_path, cache_dir, capsys):
    """A llama run on characters, and a llama run started (--init_from) from that run's Qwen3 export: neither has a
    sentencepiece model for llama.cpp, and neither export writes a file."""
    from gpt_trainer.commands.train import main as train_main

    char = trained(tmp_path, cache_dir, "--arch=llama")
    start, run, out = tmp_path / "start", tmp_path / "from-start", tmp_path / "out"
    capsys.readouterr()
    assert export.main([str(char), str(out), "--gguf"]) == 2
    said = capsys.readouterr().err
    assert "char-level" in said and "byte-fallback" in said and "--tokenizer sentencepiece" in said
    assert not out.exists()
    assert export.main([str(char), str(start)]) == 0
    shape = [flag for flag in TINY_SHAPE if not flag.startswith(("--n_layer", "--n_head", "--n_embd"))]
    assert train_main([f"--init_from={start}", f"--data_path={CLASSIC_POEMS}", f"--cache_dir={cache_dir}",
                       f"--output_dir={run}", *shape, "--max_steps=1", "--eval_interval=1"]) == 0
    capsys.readouterr()
    assert export.main([str(RunFolder(run).latest), str(out), "--gguf"]) == 2
    said = capsys.readouterr().err
    assert "--init_from folder's" in said and "--tokenizer sentencepiece" in said and "Traceback" not in said
    assert not out.exists()


def test_gguf_type_without_gguf_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    assert export.main([str(ROOT / "tests" / "fixtures" / "checkpoint_v2.pt"), str(out), "--gguf_type=f16"]) == 2
    assert "without --gguf" in capsys.readouterr().err
    assert not out.exists()


def test_a_folder_with_a_char_vocabulary_is_refused_and_no_file_is_opened(tmp_path):
    folder = tmp_path / "char"
    assert export.main([str(ROOT / "tests" / "fixtures" / "checkpoint_v2.pt"), str(folder)]) == 0
    with pytest.raises(UsageError, match="only a tokenizer.json .*byte-fallback.*--tokenizer sentencepiece"):
        to_gguf.write_gguf(folder, tmp_path / "model.gguf")
    assert not (tmp_path / "model.gguf").exists()


def test_a_qwen3_that_llama_cpp_would_compute_otherwise_is_refused(qwen3, tmp_path):
    folder = tmp_path / "scaled"
    shutil.copytree(qwen3, folder)
    config = json.loads((folder / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UsageError, match="RoPE is scaled"):
        to_gguf.write_gguf(folder, tmp_path / "model.gguf")
    assert not (tmp_path / "model.gguf").exists()
