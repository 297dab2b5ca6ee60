"""The command line: dispatch, --help for every command, one-line errors."""

import subprocess
import sys

import pytest

from annotated_llama.__main__ import COMMANDS, main


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "annotated_llama", *args], capture_output=True, text=True, timeout=120)


# the commands users are promised (the README's, written out here rather than read from COMMANDS)
PROMISED = ["generate", "chat", "tokenize", "convert", "download", "train-tokenizer", "pretokenize", "pretrain",
            "finetune", "quantize", "serve", "info", "evaluate", "eval-instruct", "merge-lora", "self-instruct",
            "export"]


def test_top_level_help_lists_every_promised_command():
    r = run_cli("--help")
    assert r.returncode == 0
    import re
    listed = set(re.findall(r"^    (\S+)", r.stdout, re.M))  # argparse's sub-command lines, indented 4
    assert listed == set(PROMISED) == set(COMMANDS)
    for name in PROMISED:  # and each command's own --help works (its module imports, its flags parse)
        assert f"usage: annotated-llama {name}" in run_cli(name, "--help").stdout


def test_a_bug_keeps_its_traceback_a_bad_input_does_not(monkeypatch, capsys):
    from annotated_llama.cli import tokenize

    def bug(args):
        return {}["missing"]  # a KeyError in our code is a bug, not bad input

    monkeypatch.setattr(tokenize, "run", bug)
    with pytest.raises(KeyError):
        main(["tokenize", "x"])

    def bad_input(args):
        raise ValueError("--tokenizer x: not a tokenizer")

    monkeypatch.setattr(tokenize, "run", bad_input)
    assert main(["tokenize", "x"]) == 2
    assert capsys.readouterr().err == "annotated-llama tokenize: error: --tokenizer x: not a tokenizer\n"

    from annotated_llama.core.kv_cache import CacheFull

    def ours(args):  # the project's own error types are bad input too
        raise CacheFull("the prompt needs 9000 cache slots, the cache holds 4096")

    monkeypatch.setattr(tokenize, "run", ours)
    assert main(["tokenize", "x"]) == 2


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
