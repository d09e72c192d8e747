from gpt_trainer.errors import UsageError, run_cli


def test_run_cli_turns_bad_input_into_one_line_and_exit_code_2(capsys):
    def command(argv):
        raise UsageError(f"--batch_size must be at least 1 (got {argv[0]}).")
    assert run_cli(command, ["0"]) == 2
    captured = capsys.readouterr()
    assert captured.err == "error: --batch_size must be at least 1 (got 0).\n" and captured.out == ""


def test_run_cli_passes_the_command_s_exit_code_through():
    assert run_cli(lambda argv: 130, []) == 130
