import pytest

from gpt_trainer.errors import RunStopped, UsageError, run_cli


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
