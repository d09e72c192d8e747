import torch

from gpt_trainer.commands.doctor import main

FAKE_KEY = "FAKEKEY_" + "d0" * 20


def test_doctor_reports_versions_backend_and_key_source_but_never_the_key(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    monkeypatch.setenv("SWANLAB_API_KEY", FAKE_KEY)
    monkeypatch.delenv("WANDB_DIR", raising=False)
    assert main([f"--output_dir={tmp_path / 'out'}"]) == 0
    out = capsys.readouterr().out
    assert "torch:" in out and "torch build:" in out and "tensorboard:" in out and "wandb:" in out
    assert "swanlab key:   from SWANLAB_API_KEY" in out and "swanlab:" in out
    if torch.cuda.is_available():
        assert f"GPU 0:         {torch.cuda.get_device_name(0)}" in out
    else:
        assert "GPU:           none visible" in out
    assert "wandb key:     from WANDB_API_KEY" in out and FAKE_KEY not in out
    assert f"output dir:    {tmp_path / 'out'} (writable)" in out and "ready to train" in out


def test_doctor_fails_when_the_output_dir_cannot_be_written(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    assert main([f"--output_dir={blocker / 'out'}"]) == 1
    assert "output dir" in capsys.readouterr().err


def test_doctor_fails_when_a_required_package_is_missing(tmp_path, monkeypatch, capsys):
    import importlib.metadata
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda name: (_ for _ in ()).throw(importlib.metadata.PackageNotFoundError(name))
                        if name == "sentencepiece" else real(name))
    assert main([f"--output_dir={tmp_path}"]) == 1
    assert "sentencepiece is not installed" in capsys.readouterr().err


def test_doctor_can_require_a_gpu(tmp_path, capsys):
    if torch.cuda.is_available():
        assert main([f"--output_dir={tmp_path}", "--require_gpu"]) == 0
    else:
        assert main([f"--output_dir={tmp_path}", "--require_gpu"]) == 1
        assert "no GPU is visible" in capsys.readouterr().err


def test_doctor_says_whether_torch_compile_can_build_kernels(tmp_path, monkeypatch, capsys):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "gcc").write_text("#!/bin/sh\n")
    (bin_dir / "gcc").chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    assert main([f"--output_dir={tmp_path}"]) == 0
    assert f"C compiler:    {bin_dir / 'gcc'} (torch.compile can build its kernels)" in capsys.readouterr().out
    (bin_dir / "gcc").unlink()  # now no compiler is on PATH
    assert main([f"--output_dir={tmp_path}"]) == 0  # running uncompiled is a slowdown, not a problem
    assert "C compiler:    none found (--compile falls back to running uncompiled" in capsys.readouterr().out
