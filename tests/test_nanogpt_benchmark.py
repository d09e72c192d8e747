"""tools/nanogpt_benchmark.py without a nanoGPT checkout: the data it prepares for nanoGPT, the parser of nanoGPT's
printed lines and the table row it prints."""

import pickle  # only to write the expected bytes of meta.pkl
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import nanogpt_benchmark  # noqa: E402

# Lines in nanoGPT train.py's own print formats:
#   f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
#   f"iter {iter_num}: loss {lossf:.4f}, time {dt*1000:.2f}ms, mfu {running_mfu*100:.2f}%"
LOG = "\n".join([
    "found vocab_size = 12 (inside data/song_ci_char/meta.pkl)",
    "step 0: train loss 8.1000, val loss 8.2000",
    *[f"iter {i}: loss 7.0000, time {1000.0 if i < 5 else 100.0 * (1 + i % 3):.2f}ms, mfu -100.00%" for i in range(10)],
    "step 25: train loss 6.5000, val loss 6.6000",
    "step 50: train loss 6.0000, val loss 6.1000",
])


def test_prepare_writes_ids_split_and_vocab_size(tmp_path):
    text = "春风又绿江南岸" * 10  # 70 characters, 7 distinct
    size = nanogpt_benchmark.prepare(text, tmp_path / "ds")
    train = np.fromfile(tmp_path / "ds" / "train.bin", dtype=np.uint16)
    val = np.fromfile(tmp_path / "ds" / "val.bin", dtype=np.uint16)
    chars = sorted(set(text))
    assert size == 7 and (len(train), len(val)) == (63, 7)
    assert "".join(chars[i] for i in np.concatenate([train, val])) == text
    # our code never reads a pickle, so the test compares meta.pkl's bytes with the dictionary it must hold
    meta = {"vocab_size": 7, "itos": dict(enumerate(chars)), "stoi": {c: i for i, c in enumerate(chars)}}
    assert (tmp_path / "ds" / "meta.pkl").read_bytes() == pickle.dumps(meta)


def test_parse_leaves_out_step_0_and_the_first_iterations():
    result = nanogpt_benchmark.parse(LOG)
    assert result["evals"] == {25: 6.6, 50: 6.1}
    # iterations 5..9 took 300, 100, 200, 300, 100 ms: median 200 ms, i.e. 16*128/0.2 tokens/s
    assert result["tokens_per_sec"] == 16 * 128 / 0.2


def test_row_in_the_recipe_table_layout():
    result = {"evals": {25: 6.6, 50: 6.1}, "tokens_per_sec": 10240.0}
    assert nanogpt_benchmark.row(result, 6.2) == "| nanoGPT (shakespeare_char recipe) | 6.6000 | 6.1000 | 50 | 10,240 |"
    assert nanogpt_benchmark.row(result, 5.0).endswith("| not reached | 10,240 |")
    assert nanogpt_benchmark.row(result, None).endswith("| — | 10,240 |")


def test_overrides_match_the_benchmark_shape(tmp_path):
    flags = nanogpt_benchmark.overrides(300, tmp_path)
    for flag in ["--n_layer=4", "--n_embd=128", "--block_size=128", "--batch_size=16", "--max_iters=300",
                 "--lr_decay_iters=300", "--device=cpu", "--compile=False", "--dtype=float32"]:
        assert flag in flags
    assert not any(f.startswith(("--learning_rate", "--dropout", "--min_lr", "--beta2")) for f in flags)
