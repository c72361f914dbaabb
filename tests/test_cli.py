"""The `scalesim` command: help for every flag, generation, one-line errors with exit code 2."""

import subprocess
import sys

import pytest

from scalesim.cli import build_parser, main


def test_generate_help_explains_every_flag():
    parser = build_parser()
    generate = parser._subparsers._group_actions[0].choices["generate"]
    for action in generate._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"{action.option_strings} has no help"


def test_generate_prints_a_completion(capsys):
    assert main(["generate", "tiny-random", "hello world", "--max-tokens", "5", "--kv-cache-memory", "4MiB"]) == 0
    assert capsys.readouterr().out.strip() != ""


def test_unknown_model_is_a_one_line_error_with_exit_code_2(capsys):
    assert main(["generate", "no-such-model", "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("scalesim: error: unknown model") and "\n" not in err


def test_bad_flag_value_is_exit_code_2(capsys):
    assert main(["generate", "tiny-random", "hi", "--top-p", "2"]) == 2
    assert "top_p" in capsys.readouterr().err


@pytest.mark.slow
def test_console_script_runs_as_a_process():
    done = subprocess.run([sys.executable, "-m", "scalesim.cli", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "generate" in done.stdout
