"""--arch llama and transformers' Qwen3ForCausalLM: a llama checkpoint exports to a folder transformers loads with no
warning and that computes our logits and greedy tokens; such a folder starts a run (--init_from) with the same
weights; a Qwen3 variant our llama does not compute the same way is refused naming the field."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from gpt_trainer.commands import export
from gpt_trainer.commands.train import main as train_main
from gpt_trainer.config import CHINESE_PROMPTS, parse_args
from gpt_trainer.model.gpt import generate_text
from gpt_trainer.system.rundir import RunFolder
from tests.conftest import CLASSIC_POEMS, TINY_SHAPE, make_trainer
from tests.test_export import KINDS, loaded_without_warnings, ours
from tests.test_hf import as_dtype, broken, config_text, edit_weights, with_values, without_key

CORPUS = CLASSIC_POEMS.read_text(encoding="utf-8")
# two full-size steps: the zero-initialised output projections of attention and MLP move far enough from zero that
# every block changes the logits (after two steps of warm-up each block is still nearly the identity, and a wrong
# mapping of its weights would pass the logits test unseen)
AWAKE = ["--learning_rate=1e-2", "--warmup_steps=0"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, cache_dir):
    """kind -> (the best.pt of a tiny llama trained 2 steps on the classic poems, its export folder)."""
    made = {}

    def make(kind: str) -> tuple[Path, Path]:
        if kind not in made:
            run, out = tmp_path_factory.mktemp(f"llama-{kind}"), tmp_path_factory.mktemp(f"qwen3-{kind}") / "model"
            cfg = parse_args([f"--data_path={CLASSIC_POEMS}", f"--cache_dir={cache_dir}", f"--output_dir={run}",
                              *TINY_SHAPE, "--arch=llama", "--max_steps=2", "--eval_interval=2", *AWAKE, *KINDS[kind]])
            make_trainer(cfg).train()
            assert export.main([str(RunFolder(run).best), str(out)]) == 0
            made[kind] = RunFolder(run).best, out
        return made[kind]
    return make


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_transformers_loads_the_llama_export_as_qwen3_with_every_weight_and_no_warning(exported, kind, capfd):
    from transformers import Qwen3ForCausalLM

    path, out = exported(kind)
    model = loaded_without_warnings(out, capfd)
    assert isinstance(model, Qwen3ForCausalLM)
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()  # untied, as ours
    card = (out / "README.md").read_text()
    assert "(--arch llama)" in card and "Qwen3ForCausalLM" in card and "tags: [qwen3," in card


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_the_qwen3_export_computes_our_logits_and_greedy_tokens(exported, kind):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, out = exported(kind)
    state, model, tokenizer = ours(path)
    assert state["config"]["arch"] == "llama"
    block = state["config"]["block_size"]
    theirs, their_tokenizer = AutoModelForCausalLM.from_pretrained(out).eval(), AutoTokenizer.from_pretrained(out)
    ids = torch.tensor(tokenizer.encode(CORPUS)[: 4 * block]).view(4, block)
    with torch.no_grad():
        difference = (model(ids, targets=ids)[0] - theirs(ids).logits).abs().max().item()
    print(f"{kind}: largest logit difference {difference:.2g}")
    assert difference <= 1e-4
    for prompt in CHINESE_PROMPTS.split(","):
        ids = tokenizer.encode(prompt)
        assert their_tokenizer(prompt).input_ids == ids
        new = block - len(ids)
        mine = model.generate(torch.tensor([ids]), new, temperature=0)[0].tolist()
        generated = theirs.generate(**their_tokenizer(prompt, return_tensors="pt"), do_sample=False,
                                    max_new_tokens=new)[0].tolist()
        assert generated == mine
        text = generate_text(model, tokenizer, prompt, "fp32", new, 0.0, 0, 1.0)
        assert their_tokenizer.decode(generated).replace("\ufffd", "") == text


@pytest.mark.slow
def test_queries_and_keys_split_in_the_wrong_order_load_but_break_the_logits(exported, tmp_path):
    """The control of the logits test: the square q_proj and k_proj swapped load without a shape error."""
    from transformers import AutoModelForCausalLM

    path, out = exported("char")
    folder = tmp_path / "swapped"
    shutil.copytree(out, folder)

    def swap(state):
        q, k = (f"model.layers.1.self_attn.{name}.weight" for name in ("q_proj", "k_proj"))
        state[q], state[k] = state[k], state[q]
    edit_weights(folder, swap)
    state, model, tokenizer = ours(path)
    ids = torch.tensor([tokenizer.encode(CORPUS)[: state["config"]["block_size"]]])
    with torch.no_grad():
        broken_model = AutoModelForCausalLM.from_pretrained(folder).eval()
        assert (model(ids, targets=ids)[0] - broken_model(ids).logits).abs().max().item() > 1e-3


@pytest.mark.slow
def test_export_init_from_export_gives_the_same_weights(exported, tmp_path, cache_dir):
    """A Qwen3 folder we wrote starts a llama run with its weights and tokenizer: one step of a vanishing learning
    rate later (a step must be taken to write a checkpoint), the second export holds the first's tensors bit for bit."""
    _, first = exported("sentencepiece")
    run, second = RunFolder(tmp_path / "run"), tmp_path / "second"
    shape = [flag for flag in TINY_SHAPE if not flag.startswith(("--n_layer", "--n_head", "--n_embd"))]
    assert train_main([f"--init_from={first}", f"--data_path={CLASSIC_POEMS}", f"--cache_dir={cache_dir}",
                       f"--output_dir={run.path}", *shape, "--max_steps=1", "--eval_interval=1",
                       "--learning_rate=1e-30", "--muon_learning_rate=1e-30", "--min_lr=1e-31",
                       "--warmup_steps=0"]) == 0
    assert json.loads((run.path / "config.json").read_text())["arch"] == "llama"
    assert export.main([str(run.latest), str(second)]) == 0  # best.pt: only if the loss fell
    one, two = weights(first), weights(second)
    assert one.keys() == two.keys() and all(torch.equal(one[key], two[key]) for key in one)
    assert json.loads((second / "config.json").read_text()) == json.loads((first / "config.json").read_text())


def unpaired(path: Path) -> None:
    broken(path, "config.json", rope_parameters=None, rope_scaling={"rope_type": "yarn", "factor": 2.0})


BAD = {  # name: (change to the exported folder, what the message must say)
    "tied embeddings": (lambda p: broken(p, "config.json", tie_word_embeddings=True),
                        "tie_word_embeddings is true, not false"),
    "attention bias": (lambda p: broken(p, "config.json", attention_bias=True), "attention_bias is true, not false"),
    "sliding window": (lambda p: broken(p, "config.json", use_sliding_window=True, sliding_window=8),
                       "use_sliding_window is true, not false"),
    "sliding layers": (lambda p: broken(p, "config.json", layer_types=["sliding_attention", "full_attention"]),
                       'layer_types holds ["full_attention", "sliding_attention"]'),
    "rope scaling": (unpaired, 'its rotary positions are scaled (rope_type "yarn", not "default")'),
    "another rope base": (lambda p: broken(p, "config.json", rope_parameters={"rope_type": "default",
                                                                             "rope_theta": 1e6}),
                          "rope_theta is 1000000.0, not 10000"),
    "a head_dim of its own": (lambda p: broken(p, "config.json", head_dim=8), "head_dim is 8, not 16"),
    "no head_dim (Qwen3's default 128)": (lambda p: (p / "config.json").write_text(json.dumps(
        {k: v for k, v in json.loads((p / "config.json").read_text()).items() if k != "head_dim"})),
        "head_dim is 128, not 16"),
    "grouped keys": (lambda p: broken(p, "config.json", num_key_value_heads=1), "num_key_value_heads is 1, not 2"),
    "another MLP width": (lambda p: broken(p, "config.json", intermediate_size=96), "intermediate_size is 96, not 88"),
    "gelu": (lambda p: broken(p, "config.json", hidden_act="gelu"), 'hidden_act is "gelu", not "silu"'),
    "another epsilon": (lambda p: broken(p, "config.json", rms_norm_eps=1e-5), "rms_norm_eps is 1e-05, not 1e-06"),
    "a weight missing": (lambda p: without_key(p, "model.layers.1.mlp.gate_proj.weight"),
                         "(2 layers): missing model.layers.1.mlp.gate_proj.weight"),
    "NaN weights": (with_values("model.layers.0.self_attn.k_norm.weight", math.nan), "are not all finite numbers"),
    "int8 weights": (as_dtype("model.layers.0.self_attn.q_proj.weight", torch.int8),
                     "are not all floating point"),
    "config.json an array": (config_text(b"[1]"), "config.json holds a JSON array, not an object of settings"),
    "a size as text": (lambda p: broken(p, "config.json", num_hidden_layers="2"),
                       'not whole numbers of at least 1 (num_hidden_layers is "2")'),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(BAD))
def test_a_qwen3_variant_we_cannot_map_exactly_is_refused_naming_the_field(exported, case, tmp_path, capsys):
    change, message = BAD[case]
    path = tmp_path / "qwen3"
    shutil.copytree(exported("char")[1], path)
    change(path)
    out, cache = tmp_path / "out", tmp_path / "cache"
    assert train_main([f"--init_from={path}", f"--data_path={CLASSIC_POEMS}", f"--cache_dir={cache}",
                       f"--output_dir={out}", "--batch_size=4", "--device=cpu", "--fp32", "--report_to=none",
                       "--max_steps=1"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists() and not cache.exists()


@pytest.mark.slow
def test_a_qwen3_folder_with_a_conflicting_arch_is_refused(exported, tmp_path, capsys):
    out = tmp_path / "out"
    assert train_main([f"--init_from={exported('char')[1]}", f"--data_path={CLASSIC_POEMS}", f"--output_dir={out}",
                       "--arch=gpt2", "--device=cpu", "--max_steps=1"]) == 2
    assert "--arch gpt2 (the folder's: llama)" in capsys.readouterr().err and not out.exists()
