"""argparse flags made from a config dataclass (TrainConfig, FinetuneConfig): the field is the one
place a setting is written; its flag, type, default and help text all follow from it.

    max_steps: int = 1000  # optimizer steps   ->   --max-steps MAX_STEPS   optimizer steps (default: 1000)

The help text is the field's trailing `# comment`, or else the comment lines just above it, in
the command line's words: a `field` in backticks becomes its flag, "None:" (an Optional field
left unset) "default:". `field_name` gives `--field-name` and
`args.field_name`, so `argtypes.config_from_args(cls, args)` builds the config back without a
list of fields. A field whose type or default has no flag (a dict, a computed default) must be
excluded: a new field then fails loudly at `--help` instead of silently having no flag.

The class is read from its source file, not imported: train/loop.py pulls in torch.distributed
and train/finetune.py the weight readers, and `--help` or a mistyped flag should not wait for
them. tests/cli/test_config_flags.py holds the result against the imported dataclass.
"""

from __future__ import annotations

import argparse
import ast
import functools
import importlib.util
import inspect
import io
import re
import tokenize
from pathlib import Path
from typing import NamedTuple

from . import argtypes

# The range of each numeric training setting, by field name: TrainConfig and FinetuneConfig share
# most names (max_steps, lr, seed...) and a name means the same setting in both.
TRAINING_TYPES = {
    "max_steps": argtypes.positive_int,
    "epochs": argtypes.positive_float,
    "batch_size": argtypes.int_range(1, 1 << 20),
    "grad_accum": argtypes.int_range(1, 1 << 20),
    "max_len": argtypes.int_range(1, 1 << 22),
    "lr": argtypes.positive_float,
    "min_lr_ratio": argtypes.probability,
    "warmup_steps": argtypes.positive_int,
    "warmup_ratio": argtypes.probability,
    "weight_decay": argtypes.nonnegative_float,
    "beta1": argtypes.probability,  # 1.0 itself torch's AdamW refuses, in one line
    "beta2": argtypes.probability,
    "eps": argtypes.positive_float,
    "grad_clip": argtypes.nonnegative_float,
    "eval_every": argtypes.nonnegative_int,
    "ckpt_every": argtypes.nonnegative_int,
    "keep_checkpoints": argtypes.positive_int,
    "log_every": argtypes.positive_int,
    "seed": argtypes.seed,
    "device": argtypes.device,
    "peak_flops": argtypes.positive_float,
    "lora_r": argtypes.int_range(1, 1 << 16),
    "lora_alpha": argtypes.positive_float,
    "lora_dropout": argtypes.float_range(0.0, 1.0),
}
TRAINING_CHOICES = {"dtype": ["float32", "bfloat16"]}

# A type named in an annotation -> the argparse type used when no range is given: still checked
# (no NaN, no 5,000-digit int). str: argparse's own (None).
BY_ANNOTATION = {"int": argtypes.int_range(-argtypes.INT64_MAX - 1), "float": argtypes.finite_float,
                 "str": None, "bool": None}  # bool: a switch, no type
MISSING = object()  # a field without a default: a required flag
UNREADABLE = object()  # a default that is not a literal (a call, an expression): no flag default


class ConfigField(NamedTuple):
    name: str
    kind: str | None  # "int", "float", "str", "bool" (Optional[...] stripped); None: no flag type
    optional: bool  # Optional[X] / X | None
    default: object  # MISSING: required; UNREADABLE: not a literal (a call, an expression)
    comment: str


@functools.cache
def read_fields(spec) -> tuple[ConfigField, ...]:
    """The fields of the dataclass `spec` ("package.module:Class", or the class itself), in order,
    from its source file."""
    if isinstance(spec, type):
        path, name = Path(inspect.getsourcefile(spec)), spec.__name__
    else:
        module, name = spec.split(":")
        path = Path(importlib.util.find_spec(module).origin)
    source = path.read_text(encoding="utf-8")
    trailing, alone = {}, {}  # line number -> comment text
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            (alone if tok.line.strip().startswith("#") else trailing)[tok.start[0]] = text
    classes = [n for n in ast.parse(source).body if isinstance(n, ast.ClassDef) and n.name == name]
    if not classes:
        raise TypeError(f"{path}: no class {name}")
    fields = []
    for node in classes[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)) or \
                "ClassVar" in ast.unparse(node.annotation):
            continue
        comment = trailing.get(node.end_lineno)
        if comment is None:  # the comment-only lines right above, no blank line between
            above, line = [], node.lineno - 1
            while line in alone:
                above.insert(0, alone[line])
                line -= 1
            comment = " ".join(above)
        fields.append(ConfigField(node.target.id, *_kind(node.annotation), _literal(node.value), comment))
    return tuple(fields)


def _kind(node) -> tuple[str | None, bool]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):  # a quoted annotation
        return _kind(ast.parse(node.value, mode="eval").body)
    if isinstance(node, ast.Name):
        return (node.id if node.id in BY_ANNOTATION else None), False
    if isinstance(node, ast.Subscript) and ast.unparse(node.value) in ("Optional", "typing.Optional"):
        return _kind(node.slice)[0], True
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        sides = [n for n in (node.left, node.right) if not (isinstance(n, ast.Constant) and n.value is None)]
        if len(sides) == 1:
            return _kind(sides[0])[0], True
    return None, False


def _literal(node):
    if node is None:
        return MISSING
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError):
        return UNREADABLE


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _help_text(comment: str, names, rename) -> str:
    """A comment in the words of the command line: a `field` in backticks as its flag, "None:"
    (what an unset Optional field means) as "default:": "None: `epochs` passes" -> "default:
    --epochs passes"."""
    def flag(m):
        return rename.get(m[1], flag_name(m[1])) if m[1] in names else m[0]
    return re.sub(r"\bNone: ", "default: ", re.sub(r"`(\w+)`", flag, comment))


def add_config_flags(parser, spec, *, exclude=(), rename=None, help=None, type=None, choices=None, default=None):
    """One flag per field of the dataclass `spec` (see read_fields) on `parser` or an argument
    group, in field order; returns the names of the fields that got one.

    exclude: fields the command sets itself. rename: {field: "--flag"}, a flag named otherwise
    (kept for the users and scripts that call it). help, type, choices, default: {field: value}
    as add_argument takes them, in place of the comment, the type (else TRAINING_TYPES, else
    BY_ANNOTATION), the choices (else TRAINING_CHOICES) and the field's default."""
    fields = read_fields(spec)
    rename, helps, kinds, choices, defaults = (d or {} for d in (rename, help, type, choices, default))
    names = {f.name for f in fields}
    unknown = {*exclude, *rename, *helps, *kinds, *choices, *defaults} - names
    if unknown:
        raise TypeError(f"{spec}: no field(s) {sorted(unknown)}")
    added = []
    for f in fields:
        if f.name in exclude:
            continue
        value = defaults.get(f.name, f.default)
        if f.kind is None or value is UNREADABLE or (f.kind == "bool" and f.optional):
            raise TypeError(f"{spec}.{f.name}: no flag for its type or default; exclude it or give them")
        # argparse %-formats help: a comment's "5%" is escaped, an override is taken as written
        text = helps.get(f.name) or _help_text(f.comment, names, rename).replace("%", "%%")
        kw = {"dest": f.name, "help": text}
        if value is MISSING:
            kw["required"] = True
        else:
            kw["default"] = value
        if f.kind == "bool":
            # off by default: a switch (--resume); on by default: --progress / --no-progress
            kw["action"] = argparse.BooleanOptionalAction if value is True else "store_true"
        else:
            kw["type"] = kinds.get(f.name, TRAINING_TYPES.get(f.name, BY_ANNOTATION[f.kind]))
            if f.name in choices or f.name in TRAINING_CHOICES:
                kw["choices"] = choices.get(f.name, TRAINING_CHOICES.get(f.name))
            else:  # the flag's name, not the field's: --out OUT (argparse would write OUT_DIR)
                kw["metavar"] = rename.get(f.name, flag_name(f.name))[2:].replace("-", "_").upper()
        action = parser.add_argument(rename.get(f.name, flag_name(f.name)), **kw)
        if action.default is not None and action.default is not False and "%(default)" not in action.help:
            action.help = f"{action.help} (default: %(default)s)".lstrip()
        added.append(f.name)
    return added
