"""The pretrain and finetune flags are generated from TrainConfig and FinetuneConfig
(cli/config_flags.py): every user field has a flag, its default is the field's, its help the
field's comment, and flags -> config gives back the values typed. The fields are enumerated with
`dataclasses.fields` on the imported classes, independently of the generator's source reading."""

import argparse
import dataclasses
import inspect
import re
import subprocess
import sys
import typing
from dataclasses import dataclass
from typing import Optional

import pytest

from annotated_llama.__main__ import OneLineParser, main
from annotated_llama.cli import argtypes, config_flags
from annotated_llama.cli import finetune as finetune_cli
from annotated_llama.cli import pretrain as pretrain_cli
from annotated_llama.train.finetune import FinetuneConfig, train_config
from annotated_llama.train.loop import TrainConfig

REQUIRED = {"pretrain": ["--data", "d", "--preset", "tiny", "--out", "o"],
            "finetune": ["--model", "m", "--data", "d", "--out", "o"]}
COMMANDS = {"pretrain": (pretrain_cli, TrainConfig), "finetune": (finetune_cli, FinetuneConfig)}
# Every flag the two commands had when they were written by hand: users, scripts and docs call them.
FLAGS_BEFORE = {
    "pretrain": "--data --tokenizer --preset --out --resume --allow-changed-flags --force --max-steps --batch-size "
                "--seq-len --grad-accum --lr --min-lr-ratio --warmup-steps --weight-decay --grad-clip --eval-every "
                "--eval-windows --ckpt-every --keep-checkpoints --log-every --seed --device --dtype --parallel "
                "--nproc-per-node --activation-checkpointing --threads".split(),
    "finetune": "--model --data --out --lora --template --max-steps --epochs --batch-size --grad-accum --lr "
                "--warmup-ratio --weight-decay --max-len --lora-r --lora-alpha --lora-dropout --lora-targets "
                "--ckpt-every --resume --allow-changed-flags --force --seed --log-every --device --dtype".split(),
}


def parser_for(command):
    p = OneLineParser(prog=f"annotated-llama {command}")
    COMMANDS[command][0].add_arguments(p)
    return p


def user_fields(command):
    module, cls = COMMANDS[command]
    return [f for f in dataclasses.fields(cls) if f.name not in getattr(module, "EXCLUDE", ())]


def flag_of(command, name):
    return COMMANDS[command][0].RENAME.get(name, "--" + name.replace("_", "-"))


def help_text(command, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    return " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("command", COMMANDS)
def test_every_user_field_is_a_flag_in_help(command, capsys, monkeypatch):
    text = help_text(command, capsys, monkeypatch)
    for f in user_fields(command):
        assert re.search(rf"(?<![\w-]){re.escape(flag_of(command, f.name))}(?![\w-])", text), f.name
    excluded = set(getattr(COMMANDS[command][0], "EXCLUDE", ()))
    assert excluded <= {"run", "flops_per_token"}  # what the command computes itself, nothing a user sets


@pytest.mark.parametrize("command", COMMANDS)
def test_every_flag_of_before_still_exists(command):
    flags = {s for a in parser_for(command)._actions for s in a.option_strings}
    assert set(FLAGS_BEFORE[command]) <= flags, set(FLAGS_BEFORE[command]) - flags


def _comment(cls, name):
    # the field's trailing comment, read straight off its source line
    line = next(ln for ln in inspect.getsource(cls).splitlines() if re.match(rf"\s+{name}: ", ln))
    return line.split("  # ", 1)[1].strip()


def test_help_is_the_fields_comment(capsys, monkeypatch):
    text = help_text("pretrain", capsys, monkeypatch)
    for name, default in (("grad_clip", "1.0"), ("min_lr_ratio", "0.1"), ("eps", "1e-05")):
        flag = flag_of("pretrain", name)
        assert f"{flag} {flag[2:].upper().replace('-', '_')} {_comment(TrainConfig, name)} (default: {default})" \
            in text, name
    assert f"--activation-checkpointing {_comment(TrainConfig, 'activation_checkpointing')} --" in text
    text = help_text("finetune", capsys, monkeypatch)
    assert f"--lora-targets LORA_TARGETS {_comment(FinetuneConfig, 'lora_targets')} (default: wq,wv)" in text
    # a `field` in backticks is written as its flag, "None:" as "default:"
    assert _comment(FinetuneConfig, "max_steps") == "optimizer steps; None: `epochs` passes over the data"
    assert "--max-steps MAX_STEPS optimizer steps; default: --epochs passes over the data --epochs" in text
    # a field with its comment on the lines above it takes that
    src = inspect.getsource(FinetuneConfig).splitlines()
    i = next(i for i, ln in enumerate(src) if ln.strip().startswith("ckpt_every:"))
    above = " ".join(ln.strip().lstrip("# ") for ln in src[i - 2:i])
    assert above.startswith("steps between checkpoints")
    assert f"--ckpt-every CKPT_EVERY {above} (default: 0)" in text


@pytest.mark.parametrize("command", COMMANDS)
def test_defaults_are_the_fields_defaults(command):
    module, cls = COMMANDS[command]
    args = parser_for(command).parse_args(REQUIRED[command])
    overridden = getattr(module, "DEFAULTS", {})
    for f in user_fields(command):
        if f.default is dataclasses.MISSING:
            continue
        assert getattr(args, f.name) == overridden.get(f.name, f.default), f.name
    assert set(overridden) <= {"lr"}  # pretrain's one deliberate difference: a small model's peak


def test_the_pretrain_lr_default_is_the_one_before():
    assert parser_for("pretrain").parse_args(REQUIRED["pretrain"]).lr == 1e-3 != TrainConfig.lr


@pytest.mark.parametrize("command", COMMANDS)
def test_source_reading_matches_the_imported_dataclass(command):
    cls = COMMANDS[command][1]
    fields, hints = config_flags.read_fields(cls), typing.get_type_hints(cls)
    assert [f.name for f in fields] == [f.name for f in dataclasses.fields(cls)]
    for read, real in zip(fields, dataclasses.fields(cls)):
        if real.default is dataclasses.MISSING:
            assert read.default is config_flags.MISSING, real.name
        else:
            assert read.default == real.default and type(read.default) is type(real.default), real.name
        base = [a for a in typing.get_args(hints[real.name]) if a is not type(None)] or [hints[real.name]]
        if read.kind is not None:
            assert read.kind == base[0].__name__ and read.optional == (type(None) in typing.get_args(hints[real.name]))


def test_types_are_converted_and_range_checked():
    args = parser_for("pretrain").parse_args(REQUIRED["pretrain"] + [
        "--max-steps", "7", "--lr", "2e-3", "--warmup-steps", "3", "--beta2", "0.99", "--no-progress",
        "--resume", "--peak-flops", "1e12", "--dtype", "float32"])
    assert (args.max_steps, args.lr, args.warmup_steps, args.beta2, args.peak_flops) == (7, 2e-3, 3, 0.99, 1e12)
    assert type(args.max_steps) is int and type(args.lr) is float
    assert args.progress is False and args.resume is True and args.dtype == "float32"
    numeric = [a for a in parser_for("pretrain")._actions + parser_for("finetune")._actions
               if a.option_strings and a.type is not None]
    assert numeric and all(hasattr(a.type, "kind") or a.type is argtypes.device for a in numeric)


def test_a_bad_value_is_one_line_naming_the_flag():
    r = subprocess.run([sys.executable, "-m", "annotated_llama", "pretrain", *REQUIRED["pretrain"], "--max-steps",
                        "abc"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("annotated-llama pretrain: error: argument --max-steps: expected an integer"), r.stderr
    for argv in (["--beta1", "nan"], ["--dtype", "float16"], ["--seed", "-1"]):
        with pytest.raises(SystemExit) as e:
            parser_for("pretrain").parse_args(REQUIRED["pretrain"] + argv)
        assert e.value.code == 2


def _odd_value(f, hint):
    # a valid value other than the default, by type: what a user could type for every field
    base = ([a for a in typing.get_args(hint) if a is not type(None)] or [hint])[0]
    if base is bool:
        return not f.default
    if f.name == "dtype":
        return "float32"
    if f.name in ("device", "template"):
        return f.default
    return {int: 3, float: 0.25, str: "wq,wk,w2"}[base] if f.default is not dataclasses.MISSING else "some/path"


@pytest.mark.parametrize("command", COMMANDS)
def test_round_trip_flags_config_flags(command):
    module, cls = COMMANDS[command]
    hints = typing.get_type_hints(cls)
    want = {f.name: _odd_value(f, hints[f.name]) for f in user_fields(command)}
    argv = list(REQUIRED[command])  # the command's own flags (--data, --preset); the fields' below win
    for name, value in want.items():
        flag = flag_of(command, name)
        if value is True:
            argv.append(flag)
        elif value is False:
            argv.append("--no-" + flag[2:])  # only True-by-default bools are False here
        else:
            argv += [flag, str(value)]
    args = parser_for(command).parse_args(argv)
    cfg = argtypes.config_from_args(cls, args)
    assert {name: getattr(cfg, name) for name in want} == want
    back = parser_for(command).parse_args(argv)
    assert argtypes.config_from_args(cls, back) == cfg


def test_finetune_passes_the_shared_fields_to_the_loop(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("{}\n")
    hints = typing.get_type_hints(FinetuneConfig)
    odd = {f.name: _odd_value(f, hints[f.name]) for f in dataclasses.fields(FinetuneConfig)}
    cfg = FinetuneConfig(**{**odd, "model": str(tmp_path), "data": str(data), "out": str(tmp_path / "out")})
    loop = train_config(cfg, max_steps=40, lr=1e-3)
    shared = {f.name for f in dataclasses.fields(TrainConfig)} & {f.name for f in dataclasses.fields(FinetuneConfig)}
    assert shared >= {"seed", "grad_accum", "weight_decay", "dtype", "ckpt_every", "resume", "allow_changed"}
    for name in shared - {"max_steps", "lr"}:
        assert getattr(loop, name) == getattr(cfg, name), name
    assert (loop.max_steps, loop.lr, loop.out_dir, loop.overwrite) == (40, 1e-3, cfg.out, cfg.force)
    assert loop.warmup_steps == round(0.25 * 40) and loop.run["--lr"] == 1e-3


@dataclass
class Toy:
    path: str  # where it goes
    # two lines above
    # make one help text
    steps: int = 5
    rate: Optional[float] = None  # None: as `steps` says, 5% more
    name: str | None = None
    on: bool = True  # a switch that is on
    table: dict = None  # no flag for a dict


def test_generator_on_a_toy_dataclass(capsys):
    p = argparse.ArgumentParser(prog="toy")
    with pytest.raises(TypeError, match="table"):
        config_flags.add_config_flags(p, Toy)
    p = argparse.ArgumentParser(prog="toy")
    added = config_flags.add_config_flags(p, Toy, exclude=("table",), rename={"steps": "--n"},
                                          help={"name": "its name"}, default={"steps": 9})
    assert added == ["path", "steps", "rate", "name", "on"]
    helps = {a.dest: a.help for a in p._actions}
    assert helps["path"] == "where it goes" and helps["name"] == "its name"
    assert helps["steps"] == "two lines above make one help text (default: %(default)s)"
    assert helps["rate"] == "default: as --n says, 5%% more"
    args = p.parse_args(["--path", "x", "--rate", "0.5", "--no-on"])
    assert (args.path, args.steps, args.rate, args.name, args.on) == ("x", 9, 0.5, None, False)
    p.print_help()  # the escaped % formats
    assert "5% more" in capsys.readouterr().out
    with pytest.raises(TypeError, match="no field"):
        config_flags.add_config_flags(argparse.ArgumentParser(), Toy, exclude=("table", "nope"))
