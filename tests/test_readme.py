"""The README's commands stay true: its first lines are the set-up, its main job runs on the
embedded default model, and every `annotated-llama ...` line it shows parses with the real CLI."""

import argparse
import importlib
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from annotated_llama.__main__ import COMMANDS

README = Path(__file__).resolve().parents[1] / "README.md"


def bash_blocks(text):
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def readme_commands():
    out = []
    for block in bash_blocks(README.read_text()):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#", 1)[0].strip()
            for part in line.split("&&"):
                part = part.strip()
                if part.startswith("annotated-llama "):
                    out.append(part)
                elif " -m annotated_llama " in part:  # torchrun ... -m annotated_llama COMMAND ...
                    out.append("annotated-llama " + part.split(" -m annotated_llama ", 1)[1])
    return out


def test_first_block_is_install_main_job_and_tests():
    first = [line.split("#", 1)[0].strip() for line in bash_blocks(README.read_text())[0].splitlines()]
    assert first == ['pip install -e ".[dev]"', 'annotated-llama generate "In the beginning"', "python -m pytest -q"]
    ci = (README.parent / ".ci" / "run").read_text()
    assert 'pip install -q -e ".[dev]"' in ci and "python -m pytest -q" in ci


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command_parses(command):
    words = shlex.split(command)[1:]
    name = words[0]
    assert name in COMMANDS, f"README uses an unknown command: {command}"
    parser = argparse.ArgumentParser(prog=f"annotated-llama {name}", exit_on_error=False)
    importlib.import_module(f"annotated_llama.cli.{COMMANDS[name][0]}").add_arguments(parser)
    try:
        parser.parse_args(words[1:])
    except (argparse.ArgumentError, SystemExit) as e:
        pytest.fail(f"README command does not parse: {command} ({e})")


def test_readme_main_job_runs_on_the_default_model():
    # the command prints the default model's own continuation: the Python API's, greedy, for the same prompt
    import json

    from annotated_llama import Llama

    r = subprocess.run([sys.executable, "-m", "annotated_llama", "generate", "In the beginning",
                        "--max-new-tokens", "16", "--temperature", "0", "--json"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    expected = Llama.build(None).text_completion(["In the beginning"], temperature=0, max_gen_len=16)[0]
    assert json.loads(r.stdout.splitlines()[-1])["text"] == expected["generation"] != ""
