"""The demo, as `./dev.sh demo` runs it, with no network and a smaller step budget: it must really learn."""

import json
import math
import shlex

import pytest

from gpt_trainer.commands import demo, export
from tests.test_docs import ROOT, code_blocks


@pytest.mark.slow
def test_the_demo_learns_offline_without_memorising(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the demo writes to ./output_demo
    monkeypatch.setenv("CHINESE_POETRY_BASE_URL", "http://127.0.0.1:9")  # discard port: no network, as offline
    assert demo.main(["--max_steps=100", "--eval_interval=25", "--sample_tokens=16"]) == 0
    out_dir = tmp_path / "output_demo"
    config = json.loads((out_dir / "config.json").read_text())
    assert config["corpus"] == "builtin" and config["train_tokens"] > 150_000  # the embedded poems, all of them
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval/loss"] for r in rows if "eval/loss" in r]
    assert len(evals) >= 4
    assert evals[-1] < evals[0] - 0.3  # learning ...
    assert evals[-1] <= min(evals) * 1.01  # ... and not memorising: still at its best at the end
    assert evals[-1] < math.log(config["vocab_size"]) - 1  # well below guessing uniformly
    captured = capsys.readouterr()
    assert "embedded Tang poems" in captured.err
    summary = captured.out[captured.out.index("done: 100 steps"):]
    assert f"val loss {evals[0]:.4f} (step 25) -> {evals[-1]:.4f} (step 100)" in summary
    assert "samples in output_demo/samples.txt" in summary and "--logdir output_demo/logs" in summary
    assert "memorising" not in summary
    assert list((out_dir / "logs").glob("*/events.out.tfevents.*"))
    export_commands_paste_after_the_demo(tmp_path)


def export_commands_paste_after_the_demo(here):
    """The export example of the landing pages and the Hugging Face page, run as it stands where the demo ran."""
    pages = ["README.md", "README.zh-CN.md", "docs/huggingface.md", "docs/zh-CN/huggingface.md"]
    shown = {line for page in pages for _, body in code_blocks((ROOT / page).read_text(encoding="utf-8"))
             for line in body.splitlines() if line.startswith("python -m gpt_trainer.export ")}
    assert shown, "no export example found"
    for line in sorted(shown):  # the first exports, the second (--overwrite) replaces that export
        argv = shlex.split(line.split("#")[0])[3:]
        assert export.main(argv) == 0, line
        assert (here / argv[1] / "model.safetensors").is_file()
