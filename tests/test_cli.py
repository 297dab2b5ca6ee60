"""The command line: dispatch, --help for every command, one-line errors."""

import subprocess
import sys

import pytest

from annotated_llama.__main__ import COMMANDS, main


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "annotated_llama", *args], capture_output=True, text=True, timeout=120)


def test_top_level_help_lists_every_command():
    r = run_cli("--help")
    assert r.returncode == 0
    for name in COMMANDS:
        assert name in r.stdout


def test_tokenize(spm_path):
    r = run_cli("tokenize", "I believe the meaning of life is", "--tokenizer", str(spm_path), "--bos")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == "1 306 4658 278 6593 310 2834 338".split()


def test_bad_input_is_one_line_without_traceback(tmp_path):
    r = run_cli("tokenize", "hi", "--tokenizer", str(tmp_path / "missing.model"))
    assert r.returncode != 0
    assert r.stderr.strip().count("\n") == 0, r.stderr
    assert "missing.model: tokenizer file not found" in r.stderr
    assert "Traceback" not in r.stderr


def test_unknown_command_fails(capsys):
    with pytest.raises(SystemExit) as e:
        main(["no-such-command"])
    assert e.value.code == 2
