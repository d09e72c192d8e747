import torch

from gpt_trainer import checkpoint
from gpt_trainer.data import prepare_data
from gpt_trainer.sample import main
from gpt_trainer.trainer import Trainer


def test_sampling_needs_nothing_but_the_checkpoint(tiny_cfg, tmp_path, capsys):
    cfg = tiny_cfg("--max_steps=2", "--eval_interval=2")
    Trainer(cfg, prepare_data(cfg), torch.device("cpu"), "fp32").train()
    path = checkpoint.latest_path(cfg.output_dir)
    capsys.readouterr()
    assert main([str(path), "--prompts=春江,往事", "--tokens=5", "--device=cpu", "--seed=1"]) == 0
    out = capsys.readouterr().out
    assert "--- '春江' ---\n春江" in out and "--- '往事' ---\n往事" in out
    assert main([str(path), "--prompts=春江", "--tokens=5", "--device=cpu", "--seed=1"]) == 0
    again = capsys.readouterr().out
    assert again.split("--- '往事'")[0] == out.split("--- '往事'")[0]  # the same seed gives the same text


def test_a_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert main([str(tmp_path / "none.pt"), "--device=cpu"]) == 2
    assert "not a readable checkpoint" in capsys.readouterr().err


def test_a_file_that_is_not_our_checkpoint_is_a_usage_error(tmp_path, capsys):
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    assert main([str(tmp_path / "foreign.pt"), "--device=cpu"]) == 2
    assert "not a checkpoint written by train_single_gpu.py" in capsys.readouterr().err
