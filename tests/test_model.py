import pytest
import torch

from gpt_trainer.config import MODEL_PRESETS
from gpt_trainer.model import GPT, GPTConfig, sample_next


def expected_params(vocab: int, block: int, layers: int, width: int) -> int:
    per_block = 12 * width * width + 13 * width  # qkv, proj, two MLP matrices, their biases, two LayerNorms
    return layers * per_block + vocab * width + block * width + 2 * width  # tied head adds nothing


@pytest.mark.parametrize("size", list(MODEL_PRESETS))
def test_every_preset_builds_with_the_expected_parameter_count(size):
    shape = MODEL_PRESETS[size]
    with torch.device("meta"):  # no memory is allocated, so even xl builds instantly
        model = GPT(GPTConfig(50257, 1024, shape.n_layer, shape.n_head, shape.n_embd))
    assert model.num_params() == expected_params(50257, 1024, shape.n_layer, shape.n_embd)


def test_small_preset_is_gpt2_124m():
    shape = MODEL_PRESETS["small"]
    with torch.device("meta"):
        model = GPT(GPTConfig(50257, 1024, shape.n_layer, shape.n_head, shape.n_embd))
    assert model.num_params() == 124_439_808  # the published GPT-2 small count, position embeddings included


def test_embeddings_are_tied_and_residual_projections_scaled():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=500, block_size=32, n_layer=8, n_head=4, n_embd=128))
    assert model.lm_head.weight is model.wte.weight
    assert model.blocks[0].attn.proj.weight.std().item() == pytest.approx(0.02 / 4, rel=0.1)  # 0.02 / sqrt(2 * 8)
    assert model.blocks[0].mlp.fc.weight.std().item() == pytest.approx(0.02, rel=0.1)


def test_weight_decay_only_on_matrices():
    model = GPT(GPTConfig(vocab_size=50, block_size=8, n_layer=1, n_head=2, n_embd=16))
    decay, no_decay = model.optimizer_groups(0.1)
    assert all(p.dim() == 2 for p in decay["params"])
    assert any(p is model.wte.weight for p in no_decay["params"])
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == model.num_params()


def naive_greedy(model: GPT, idx: torch.Tensor, steps: int) -> torch.Tensor:
    for _ in range(steps):
        logits, _ = model(idx[:, -model.cfg.block_size:])
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx


@pytest.mark.parametrize("new_tokens", [5, 30])  # 30 runs past block_size, exercising the sliding window
def test_kv_cache_generation_matches_full_recomputation(new_tokens):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=40, block_size=16, n_layer=2, n_head=2, n_embd=32)).eval()
    prompt = torch.randint(0, 40, (2, 6))
    cached = model.generate(prompt, new_tokens, temperature=0)
    assert torch.equal(cached, naive_greedy(model, prompt, new_tokens))


def test_top_k_and_top_p_restrict_the_candidates():
    torch.manual_seed(0)
    logits = torch.tensor([[5.0, 4.0, 1.0, 0.0, -1.0]]).repeat(2000, 1)
    assert set(sample_next(logits, 1.0, top_k=2, top_p=1.0).flatten().tolist()) == {0, 1}
    # p(token 0) ~ 0.71 < 0.8, so nucleus 0.8 keeps tokens 0 and 1 and nothing else
    assert set(sample_next(logits, 1.0, top_k=0, top_p=0.8).flatten().tolist()) == {0, 1}
    assert set(sample_next(logits, 1.0, top_k=0, top_p=0.5).flatten().tolist()) == {0}
