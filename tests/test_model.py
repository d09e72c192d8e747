import math

import pytest
import torch
import torch.nn as nn

from gpt_trainer.config import MODEL_PRESETS
from gpt_trainer.model.gpt import GPT, GPTConfig, KVCache, build_model, sample_next, saved_activation_bytes


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
    model = GPT.create(GPTConfig(vocab_size=500, block_size=32, n_layer=8, n_head=4, n_embd=128))
    assert model.lm_head.weight is model.wte.weight
    assert model.blocks[0].attn.proj.weight.std().item() == pytest.approx(0.02 / 4, rel=0.1)  # 0.02 / sqrt(2 * 8)
    assert model.blocks[0].mlp.fc.weight.std().item() == pytest.approx(0.02, rel=0.1)


def built_the_old_way(cfg: GPTConfig) -> GPT:
    """The reference: a GPT as it was built before models were built on the meta device - constructed on the CPU
    (each module's constructor drawing torch's default weights), then GPT-2's initialisation applied post-order, then
    the residual projections scaled (the code GPT.__init__ ran, kept here)."""
    model = GPT(cfg)  # on the CPU: the constructors draw, in construction order

    def init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
    model.apply(init)
    for name, p in model.named_parameters():
        if name.endswith("proj.weight"):
            nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))
    return model


@pytest.mark.parametrize("seed, shape", [
    (0, {"vocab_size": 65, "block_size": 16, "n_layer": 2, "n_head": 2, "n_embd": 32}),
    (1234, {"vocab_size": 500, "block_size": 64, "n_layer": 3, "n_head": 4, "n_embd": 48, "dropout": 0.1}),
])
def test_a_model_built_on_the_meta_device_has_the_weights_and_random_state_of_one_built_on_the_cpu(seed, shape):
    """build_model replays on the CPU, tensor by tensor, the draws of building the model there: the same weights bit
    for bit, and the generator left where it was left (so dropout masks and everything after are unchanged)."""
    cfg = GPTConfig(**shape)
    torch.manual_seed(seed)
    reference = built_the_old_way(cfg).state_dict()
    reference_rng = torch.get_rng_state()
    torch.manual_seed(seed)
    flags = {key: value for key, value in shape.items() if key != "vocab_size"}
    model = build_model(flags, cfg.vocab_size, "cpu")
    assert torch.equal(torch.get_rng_state(), reference_rng)
    assert list(model.state_dict()) == list(reference)
    assert [key for key, value in model.state_dict().items() if not torch.equal(value, reference[key])] == []
    assert model.lm_head.weight is model.wte.weight  # tied again after materialising
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_whole_weights_load_by_name_and_shape():
    model = GPT.create(GPTConfig(vocab_size=50, block_size=8, n_layer=1, n_head=2, n_embd=16))
    other = GPT.create(GPTConfig(vocab_size=50, block_size=8, n_layer=1, n_head=2, n_embd=16))
    model.load_whole(other.state_dict())
    assert all(torch.equal(value, other.state_dict()[key]) for key, value in model.state_dict().items())
    with pytest.raises(ValueError):
        model.load_whole({**other.state_dict(), "wpe.weight": torch.zeros(1, 16)})  # copy_ would broadcast it


def test_weight_decay_only_on_matrices():
    model = GPT.create(GPTConfig(vocab_size=50, block_size=8, n_layer=1, n_head=2, n_embd=16))
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
    model = GPT.create(GPTConfig(vocab_size=40, block_size=16, n_layer=2, n_head=2, n_embd=32)).eval()
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


def twin_models(dropout: float, **shape) -> tuple[GPT, GPT]:
    """The same weights twice: without and with activation checkpointing."""
    shape = {"vocab_size": 50, "block_size": 16, "n_layer": 3, "n_head": 2, "n_embd": 32, **shape}
    torch.manual_seed(0)
    plain = GPT.create(GPTConfig(**shape, dropout=dropout)).train()
    checkpointed = GPT.create(GPTConfig(**shape, dropout=dropout, activation_checkpointing=True)).train()
    checkpointed.load_state_dict(plain.state_dict())
    return plain, checkpointed


def forward_backward(model: GPT, idx: torch.Tensor) -> tuple[torch.Tensor, int, torch.Tensor]:
    """The loss, how many times a block started (forward and any recomputation), and the RNG state afterwards."""
    calls = []  # a pre-hook: a recomputation stops early once it has what backward needs, so post-hooks do not run
    hooks = [b.register_forward_pre_hook(lambda *_: calls.append(1)) for b in model.blocks]
    torch.manual_seed(1234)  # the same dropout masks for both models, unless recomputation drew new ones
    _, loss = model(idx, idx)
    loss.backward()
    for h in hooks:
        h.remove()
    return loss.detach(), len(calls), torch.get_rng_state()


@pytest.mark.parametrize("dropout", [0.0, 0.2])  # 0.2: recomputation must replay the forward's dropout masks
def test_activation_checkpointing_gives_the_plain_gradients(dropout):
    plain, checkpointed = twin_models(dropout)
    idx = torch.randint(0, 50, (4, 16), generator=torch.Generator().manual_seed(0))
    loss, plain_calls, plain_rng = forward_backward(plain, idx)
    ckpt_loss, ckpt_calls, ckpt_rng = forward_backward(checkpointed, idx)
    assert (plain_calls, ckpt_calls) == (3, 6)  # each block ran again in backward: checkpointing really happened
    assert torch.equal(loss, ckpt_loss)
    assert torch.equal(plain_rng, ckpt_rng)  # recomputation leaves the RNG where the plain run leaves it
    ckpt_params = dict(checkpointed.named_parameters())
    for name, p in plain.named_parameters():
        assert p.grad is not None and ckpt_params[name].grad is not None, name
        torch.testing.assert_close(ckpt_params[name].grad, p.grad, rtol=0, atol=1e-6, msg=name)


def test_activation_checkpointing_saves_far_fewer_bytes_for_backward():
    # saved_activation_bytes counts each storage autograd keeps for backward once (parameters and inputs excluded);
    # with checkpointing that is each block's input, stashed for recomputation, plus what lies outside the blocks.
    plain, checkpointed = twin_models(0.1, vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=64)
    idx = torch.randint(0, 65, (8, 64), generator=torch.Generator().manual_seed(0))
    plain_bytes = saved_activation_bytes(plain, idx, idx)
    ckpt_bytes = saved_activation_bytes(checkpointed, idx, idx)
    print(f"saved for backward: plain {plain_bytes:,} bytes, checkpointed {ckpt_bytes:,} bytes")
    block_input = 8 * 64 * 64 * 4  # (B, T, C) float32
    assert ckpt_bytes >= 4 * block_input  # the checkpoints' stashed inputs are counted, not missed
    assert ckpt_bytes < 0.5 * plain_bytes
    assert plain_bytes > 4 * 10 * block_input  # a plain block saves its attention and MLP activations
    with torch.no_grad():  # the measurement does not depend on the caller's grad mode
        assert saved_activation_bytes(checkpointed, idx, idx) == ckpt_bytes


@pytest.mark.parametrize("checkpointing", [False, True])
def test_saved_activation_bytes_is_what_forward_leaves_alive(checkpointing):
    """Cross-check against storage liveness: every storage an op made during forward that is still alive afterwards
    (parameters, inputs and the returned logits and loss aside) is exactly what saved_activation_bytes counts."""
    from torch.multiprocessing.reductions import StorageWeakRef
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class RecordStorages(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.made = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self.made[t.untyped_storage()._cdata] = (StorageWeakRef(t.untyped_storage()), t.untyped_storage())
            return out

    model = twin_models(0.1, n_layer=2)[checkpointing]
    idx = torch.randint(0, 50, (4, 16), generator=torch.Generator().manual_seed(0))
    recorder = RecordStorages()
    with recorder:
        logits, loss = model(idx, idx)
    kept = {t.untyped_storage()._cdata for t in (*model.parameters(), idx, logits, loss)}
    sizes = {key: storage.nbytes() for key, (_, storage) in recorder.made.items()}
    recorder.made = {key: ref for key, (ref, _) in recorder.made.items()}  # drop the strong references
    alive = sum(sizes[key] for key, ref in recorder.made.items() if not ref.expired() and key not in kept)
    assert alive == saved_activation_bytes(model, idx, idx) > 0


def test_activation_checkpointing_keeps_state_dict_keys_and_generation():
    plain, checkpointed = twin_models(0.0)
    assert list(plain.state_dict()) == list(checkpointed.state_dict())
    plain.load_state_dict(checkpointed.state_dict())  # a checkpoint from either run loads into the other
    prompt = torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(0))
    for model in (plain, checkpointed):
        model.train()  # checkpointing applies in training mode, yet generation (no grad, KV cache) must not use it
    assert torch.equal(checkpointed.generate(prompt, 20, temperature=0), plain.generate(prompt, 20, temperature=0))
    with torch.no_grad():  # an evaluation-style forward: no grad, so no checkpointing, same logits
        assert torch.equal(checkpointed(prompt, prompt)[0], plain(prompt, prompt)[0])


def test_activation_checkpointing_flag_is_read_from_flags_and_old_checkpoints_default_off():
    flags = {"block_size": 16, "n_layer": 1, "n_head": 2, "n_embd": 32, "dropout": 0.0}
    assert GPTConfig.from_flags(flags, 50).activation_checkpointing is False  # an old checkpoint's config lacks it
    assert GPTConfig.from_flags({**flags, "activation_checkpointing": True}, 50).activation_checkpointing is True
    assert build_model({**flags, "activation_checkpointing": True}, 50, "cpu").cfg.activation_checkpointing


# ---- --arch llama ---------------------------------------------------------------------------------------------------
def llama_params(vocab: int, layers: int, heads: int, width: int) -> int:
    hidden = 8 * math.ceil(width * 8 / 3 / 8)  # 8/3 of the width, rounded up to a multiple of 8
    per_block = 4 * width * width + 3 * width * hidden + 2 * width + 2 * (width // heads)  # attention, SwiGLU, norms
    return layers * per_block + 2 * vocab * width + width  # embedding and output layer apart; no position table


@pytest.mark.parametrize("size", list(MODEL_PRESETS))
def test_every_preset_builds_as_llama_with_the_expected_parameter_count(size):
    shape = MODEL_PRESETS[size]
    with torch.device("meta"):
        gpt2 = GPT(GPTConfig(50257, 1024, shape.n_layer, shape.n_head, shape.n_embd))
        llama = GPT(GPTConfig(50257, 1024, shape.n_layer, shape.n_head, shape.n_embd, arch="llama"))
    assert llama.num_params() == llama_params(50257, shape.n_layer, shape.n_head, shape.n_embd)
    # the blocks hold about what gpt2's hold (SwiGLU's 8/3 x 3 matrices against GELU's 4 x 2); the rest is the
    # output layer of its own less the position table
    blocks = [sum(p.numel() for p in model.blocks.parameters()) for model in (gpt2, llama)]
    assert abs(blocks[1] - blocks[0]) < 0.01 * blocks[0]
    assert llama.num_params() - gpt2.num_params() == blocks[1] - blocks[0] + (50257 - 1024) * shape.n_embd \
        - shape.n_embd


def test_the_swiglu_width_is_8_thirds_rounded_up_to_a_multiple_of_8():
    assert [GPTConfig(10, 8, 1, 2, width, arch="llama").mlp_hidden for width in (32, 128, 384, 768)] == \
        [88, 344, 1024, 2048]
    assert GPTConfig(10, 8, 1, 2, 128).mlp_hidden == 512  # gpt2: 4 x the width


def llama(seed: int = 0, awake: bool = True, **shape) -> GPT:
    """A small llama; `awake`: its zero-initialised residual projections drawn too, so that every block's attention
    and MLP change the output (at initialisation each block is the identity)."""
    shape = {"vocab_size": 50, "block_size": 16, "n_layer": 2, "n_head": 2, "n_embd": 32, **shape}
    torch.manual_seed(seed)
    model = GPT.create(GPTConfig(**shape, arch="llama"))
    if awake:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("proj.weight"):
                    p.normal_(0.0, 0.02)
    return model


def test_llama_has_no_biases_its_own_output_layer_and_blocks_that_start_as_the_identity():
    model = llama(awake=False, n_layer=3)
    params = dict(model.named_parameters())
    assert not any(name.endswith(".bias") for name in params) and "wpe.weight" not in params
    assert model.lm_head.weight is not model.wte.weight
    assert {name for name, p in params.items() if p.dim() == 1 and torch.equal(p, torch.ones_like(p))} == \
        {name for name, p in params.items() if p.dim() == 1}  # every gain 1: ln_1, ln_2, ln_f, q_norm, k_norm
    zero = {name for name, p in params.items() if not p.any()}
    assert zero == {f"blocks.{i}.{part}.proj.weight" for i in range(3) for part in ("attn", "mlp")}
    for name, p in params.items():
        if p.dim() == 2 and name not in zero:
            assert p.std().item() == pytest.approx(0.02, rel=0.1), name
    idx = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # every block adds zero to the residual stream: the logits skip them
        assert torch.equal(model(idx, idx)[0], model.lm_head(model.ln_f(model.wte(idx))))


def test_llama_trains_every_parameter():
    model = llama(dropout=0.1).train()
    idx = torch.randint(0, 50, (4, 16), generator=torch.Generator().manual_seed(0))
    _, loss = model(idx, idx)
    loss.backward()
    assert math.isfinite(loss.item())
    assert [name for name, p in model.named_parameters() if p.grad is None or not p.grad.any()] == []


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_a_later_token_never_changes_an_earlier_logit(arch):
    torch.manual_seed(0)
    model = (llama() if arch == "llama" else GPT.create(GPTConfig(50, 16, 2, 2, 32))).eval()
    idx = torch.randint(0, 50, (1, 16), generator=torch.Generator().manual_seed(1))
    changed = idx.clone()
    changed[0, 9:] = (changed[0, 9:] + 1) % 50
    with torch.no_grad():
        before, after = model(idx, idx)[0], model(changed, changed)[0]
    assert torch.equal(before[:, :9], after[:, :9])
    assert not torch.allclose(before[:, 9:], after[:, 9:])  # the control: the changed positions did change


def test_llama_logits_with_the_key_value_cache_at_their_absolute_positions_equal_a_full_forward():
    """Token by token with the cache (each rotated at its own position) gives the logits of one forward over the
    whole sequence; the control: a cache whose new tokens are all turned as position 0 does not."""
    model = llama().eval()
    idx = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(idx, idx)[0]

        def stepwise(start_of) -> torch.Tensor:
            """The logits of positions 3 to 11: the prompt's last, then one per token fed with the cache."""
            caches = [KVCache() for _ in model.blocks]
            first, _ = model(idx[:, :4], caches=caches)
            steps = [model(idx[:, t:t + 1], caches=caches, start=start_of(t))[0] for t in range(4, 12)]
            return torch.cat([first, *steps], dim=1)
        torch.testing.assert_close(stepwise(lambda t: t), full[:, 3:], rtol=0, atol=1e-5)
        assert (stepwise(lambda t: 0)[:, 1:] - full[:, 4:]).abs().max() > 1e-3


@pytest.mark.parametrize("new_tokens", [5, 30])  # 30 runs past block_size: the window is encoded again from 0
def test_llama_kv_cache_generation_matches_full_recomputation(new_tokens):
    model = llama(vocab_size=40).eval()
    prompt = torch.randint(0, 40, (2, 6), generator=torch.Generator().manual_seed(0))
    assert torch.equal(model.generate(prompt, new_tokens, temperature=0), naive_greedy(model, prompt, new_tokens))


def test_llama_weight_decay_spares_gains_and_the_embedding_but_not_the_output_layer():
    model = llama()
    decay, no_decay = model.optimizer_groups(0.1)
    decayed = {id(p) for p in decay["params"]}
    assert id(model.lm_head.weight) in decayed and id(model.wte.weight) not in decayed
    assert {name for name, p in model.named_parameters() if id(p) in decayed} == {
        name for name, p in model.named_parameters() if p.dim() == 2 and name != "wte.weight"}
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == model.num_params()


def test_llama_activation_checkpointing_gives_the_plain_gradients():
    plain, checkpointed = llama(n_layer=3), llama(n_layer=3, activation_checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    idx = torch.randint(0, 50, (4, 16), generator=torch.Generator().manual_seed(0))
    loss, plain_calls, _ = forward_backward(plain.train(), idx)
    ckpt_loss, ckpt_calls, _ = forward_backward(checkpointed.train(), idx)
    assert (plain_calls, ckpt_calls) == (3, 6) and torch.equal(loss, ckpt_loss)
    ckpt_params = dict(checkpointed.named_parameters())
    for name, p in plain.named_parameters():
        torch.testing.assert_close(ckpt_params[name].grad, p.grad, rtol=0, atol=1e-6, msg=name)


def test_a_seed_gives_the_same_llama_and_flags_without_arch_give_gpt2():
    flags = {"block_size": 16, "n_layer": 2, "n_head": 2, "n_embd": 32, "dropout": 0.0}
    torch.manual_seed(3)
    one = build_model({**flags, "arch": "llama"}, 50, "cpu").state_dict()
    torch.manual_seed(3)
    two = build_model({**flags, "arch": "llama"}, 50, "cpu").state_dict()
    assert all(torch.equal(value, two[key]) for key, value in one.items())
    assert GPTConfig.from_flags(flags, 50).arch == "gpt2"  # a checkpoint from before --arch
    assert "wpe.weight" in build_model(flags, 50, "cpu").state_dict()


def test_llama_flops_count_the_output_layer_but_not_the_embedding_lookup():
    model = llama()
    c = model.cfg
    matrices = sum(p.numel() for name, p in model.named_parameters() if name != "wte.weight")
    assert model.flops_per_token() == 6 * matrices + 12 * c.n_layer * c.n_embd * c.block_size
    gpt2 = GPT.create(GPTConfig(50, 16, 2, 2, 32))
    assert gpt2.flops_per_token() == 6 * gpt2.num_params() + 12 * 2 * 32 * 16  # as measured before --arch
