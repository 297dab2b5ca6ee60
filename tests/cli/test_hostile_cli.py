"""The command line under hostile input: every numeric flag of every command with values out of
range (NaN, infinities, 5,000-digit integers, 65-bit seeds), devices that do not exist, bytes
that are not UTF-8, pickled adapters and shards, weights that are not finite or not floating
point, and every writing command run twice and onto its own input.

Every case asserts the exit status, one line naming the argument or file, no traceback, and that
nothing outside its place was written or changed."""

import importlib
import io
import json
import lzma
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from annotated_llama import ModelArgs, Tokenizer, Transformer
from annotated_llama.__main__ import COMMANDS, OneLineParser, main
from annotated_llama.cli import argtypes

from fixtures import RECORDS

# Commands whose flags this suite enumerates, with the required arguments that let them parse.
# (serve, self-instruct's sampling flags, convert and quantize are checked by their own suites.)
REQUIRED = {
    "generate": [], "chat": [], "download": ["--url", "http://127.0.0.1:9/x", "--dest", "d"],
    "pretrain": ["--data", "d", "--preset", "tiny", "--out", "o"], "evaluate": ["--data", "d"],
    "finetune": ["--model", "m", "--data", "d", "--out", "o"], "eval-instruct": ["--data", "d"],
    "train-tokenizer": ["c.txt", "--out", "o"], "pretokenize": ["c.txt", "--tokenizer", "t", "--out", "o"],
}


def call(capsys, *argv, stdin=None, monkeypatch=None):
    """(exit status, stdout, stderr lines) of `annotated-llama ARGV` in this process."""
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8"))
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:  # argparse
        rc = e.code
    out = capsys.readouterr()
    assert "Traceback" not in out.err, out.err
    return rc, out.out, out.err.strip().splitlines()


def refused(capsys, *argv, needles=(), **kw):
    rc, _, err = call(capsys, *argv, **kw)
    assert rc == 2 and len(err) == 1, (argv, err)
    for n in needles:
        assert str(n) in err[0], (n, err[0])
    return err[0]


def tree(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in Path(root).rglob("*") if p.is_file()}


# ---- numbers: every numeric flag, by class ---------------------------------------------------

def _actions(command):
    parser = OneLineParser(prog=f"annotated-llama {command}")
    importlib.import_module(f"annotated_llama.cli.{COMMANDS[command][0]}").add_arguments(parser)
    return [a for a in parser._actions if a.option_strings and a.type is not None]


def _bad_values(t):
    if t is argtypes.device:
        return ["tpu9", "cuda:99", "cuda" if not torch.cuda.is_available() else "cuda:99", "", "cpu:0"]
    if t.kind == "int":
        values = ["abc", "1.5", "1e3", "9" * 5000, str(t.lo - 1)]
        return values + ([str(t.hi + 1)] if t.hi < argtypes.INT64_MAX else [str(1 << 64)])
    values = ["nan", "inf", "-inf", "1e400", "abc"]
    values.append(str(t.lo) if t.lo_open else str(t.lo - 1) if t.lo > -float("inf") else "-1e400")
    return values + ([str(t.hi * 2 + 1)] if t.hi < float("inf") else [])


def test_every_numeric_flag_is_range_checked(capsys):
    tried = 0
    for command, required in REQUIRED.items():
        for action in _actions(command):
            assert hasattr(action.type, "kind") or action.type is argtypes.device, \
                f"{command} {action.option_strings[0]}: a bare {action.type.__name__}, not a cli/argtypes type"
            flag = action.option_strings[0]
            for value in _bad_values(action.type):
                rc, _, err = call(capsys, command, *required, f"{flag}={value}")
                assert rc == 2 and len(err) == 1, (command, flag, value, err)
                assert err[0].startswith(f"annotated-llama {command}: error: argument {flag}"), err[0]
                tried += 1
    assert tried > 250, tried  # about 45 flags x 5-7 values


def test_sampling_flags_take_the_engines_ranges():
    # one source of truth: the flags' types are built from sampling.LIMITS, which the engine checks too
    from annotated_llama.core.sampling import LIMITS, check_sampling_args

    for name in ("temperature", "top_p", "top_k", "repetition_penalty"):
        t, (low, high, closed) = getattr(argtypes, name), LIMITS[name]
        assert t.hi == high and (t.lo == low if closed or t.kind == "float" else t.lo == low + 1), name
    for kw in ({"temperature": float("inf")}, {"temperature": float("nan")}, {"temperature": 1e3},
               {"repetition_penalty": float("nan")}, {"repetition_penalty": float("inf")}, {"top_p": float("nan")},
               {"top_k": float("nan")}, {"top_k": float("inf")}, {"top_k": -1}, {"temperature": -0.5}):
        with pytest.raises(ValueError, match=next(iter(kw))):
            check_sampling_args(**kw)
    check_sampling_args(temperature=2.0, repetition_penalty=1.3, top_k=0)


# ---- text that is not UTF-8 ------------------------------------------------------------------

def test_invalid_utf8_on_stdin_and_in_arguments(capsys, monkeypatch, base_dir, tiny_tokenizer_path,  # noqa: F811
                                                tmp_path):
    line = refused(capsys, "generate", "--model", base_dir, "--max-new-tokens", 2, stdin=b"In the \xffbeginning",
                   monkeypatch=monkeypatch, needles=["stdin", "not valid UTF-8", "0xff", "offset 7"])
    assert line.startswith("annotated-llama generate: error:")
    for bad in (b"\xc3(", b"\xed\xa0\x80 (a UTF-8-encoded surrogate)", b"ok\xf8\x88\x80\x80\x80"):
        refused(capsys, "generate", "--model", base_dir, stdin=bad, monkeypatch=monkeypatch, needles=["stdin"])
    # chat: a bad line is one error line, and the conversation goes on
    rc, out, err = call(capsys, "chat", "--model", base_dir, "--temperature", 0, "--max-new-tokens", 3,
                        stdin=b"hello\n\xff\xfe\nthanks\n", monkeypatch=monkeypatch)
    assert rc == 0 and len(err) == 1 and "stdin: not valid UTF-8" in err[0] and len(out.splitlines()) == 2
    # lone surrogates (invalid UTF-8 in argv, as Python decodes it) in tokenize's TEXT
    for text in ("a\udcffb", "\ud800", "x\udfff"):
        refused(capsys, "tokenize", text, "--tokenizer", tiny_tokenizer_path, needles=["argument text", "UTF-8"])
    # corpora that are not UTF-8 (or not xz) name the file
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("Genèse 1: Au commencement.\n".encode("latin-1") * 50)
    broken_xz = tmp_path / "broken.txt.xz"
    broken_xz.write_bytes(lzma.compress(b"In the beginning.\n" * 100)[:60])
    not_xz = tmp_path / "plain.txt.xz"
    not_xz.write_bytes(b"not xz at all")
    for corpus_file in (latin, broken_xz, not_xz):  # noqa: F402
        before = tree(tmp_path)
        refused(capsys, "pretokenize", corpus_file, "--tokenizer", tiny_tokenizer_path, "--out", tmp_path / "s",
                needles=[corpus_file])
        refused(capsys, "train-tokenizer", corpus_file, "--out", tmp_path / "t", needles=[corpus_file])
        refused(capsys, "evaluate", "--model", base_dir, "--data", corpus_file, needles=[corpus_file])
        assert tree(tmp_path) == before


# ---- files that are not what they claim -----------------------------------------------------

class Evil:  # unpickling this would run a shell command
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (__import__("os").system, (f"touch {self.marker}",))


def test_pickled_adapters_and_shards_are_refused_without_torchs_advice(capsys, base_dir, tmp_path):
    marker = tmp_path / "pwned"
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16,
                                                             "target_modules": ["q_proj"]}))
    torch.save({"x": Evil(marker)}, adapter / "adapter_model.bin")
    for command in ("generate", "eval-instruct"):
        extra = ["--data", tmp_path / "none.json"] if command == "eval-instruct" else ["hi"]
        if command == "eval-instruct":
            (tmp_path / "none.json").write_text(json.dumps(RECORDS))
        line = refused(capsys, command, *extra, "--model", base_dir, "--lora", adapter,
                       needles=["adapter_model.bin", "pickled"])
        assert "weights_only" not in line
    shard_dir = tmp_path / "meta"
    shard_dir.mkdir()
    (shard_dir / "params.json").write_text(json.dumps(ModelArgs.from_name("tiny").to_params_json()))
    torch.save({"layers.0.attention.wq.weight": torch.zeros(64, 64), "x": Evil(marker)},
               shard_dir / "consolidated.00.pth")
    line = refused(capsys, "generate", "hi", "--model", shard_dir, "--tp", 2, needles=["consolidated.00.pth",
                                                                                        "pickled"])
    assert "weights_only" not in line and not marker.exists()


@pytest.mark.parametrize("poison", ["int32", "int64", "nan", "inf", "-inf", "bool"])
def test_weights_that_are_not_finite_floats_are_refused_naming_the_tensor(capsys, base_dir, tmp_path, poison):
    from safetensors.torch import load_file

    src = tmp_path / "poisoned"
    shutil.copytree(base_dir, src)
    sd = load_file(src / "model.safetensors")
    name = "layers.1.feed_forward.w2.weight"
    if poison in ("int32", "int64", "bool"):
        sd[name] = sd[name].to(getattr(torch, poison))
    else:
        sd[name] = sd[name].clone()
        sd[name].view(-1)[777] = float(poison)
    save_file(sd, src / "model.safetensors")
    before = tree(tmp_path)
    refused(capsys, "convert", src, tmp_path / "out", "--to", "hf", needles=[name, "model.safetensors"])
    refused(capsys, "generate", "hi", "--model", src, needles=[name])
    assert tree(tmp_path) == before


# ---- every writing command: twice, and onto its own input -------------------------------------

def _twice(capsys, root, argv_for, out, needle="already exists"):
    """argv_for(out) runs once (0); again: refused, unchanged; with --force: 0 again."""
    rc, _, err = call(capsys, *argv_for(out))
    assert rc == 0, err
    first = tree(root)
    refused(capsys, *argv_for(out), needles=[needle, "--force"])
    assert tree(root) == first
    rc, _, err = call(capsys, *argv_for(out), "--force")
    assert rc == 0, err


def _own_input(capsys, root, argv):
    before = tree(root)
    for extra in ([], ["--force"]):
        refused(capsys, *argv, *extra, needles=["never written over"])
    assert tree(root) == before


def test_convert_and_quantize(capsys, base_dir, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(base_dir, src)
    cases = 0
    for command, extra in (("convert", ["--to", "hf"]), ("convert", ["--to", "gguf"]),
                           ("quantize", ["--mode", "int8"])):
        out = tmp_path / (f"{command}-{extra[-1]}" + (".gguf" if extra[-1] == "gguf" else ""))
        _twice(capsys, tmp_path, lambda o: [command, src, o, *extra], out)
        _own_input(capsys, tmp_path, [command, src, src, *extra])
        _own_input(capsys, tmp_path, [command, src, tmp_path, *extra])  # a dir holding the input
        cases += 3
    assert cases == 9


def test_pretokenize_and_train_tokenizer(capsys, corpus, tokenizer_path, tmp_path):  # noqa: F811
    text = tmp_path / "text"
    text.mkdir()
    shutil.copy(corpus, text / "genesis.txt")
    _twice(capsys, tmp_path, lambda o: ["pretokenize", text / "genesis.txt", "--tokenizer", tokenizer_path,
                                        "--out", o, "--val-every", 8], tmp_path / "shards")
    _own_input(capsys, tmp_path, ["pretokenize", text / "genesis.txt", "--tokenizer", tokenizer_path, "--out", text])
    _twice(capsys, tmp_path, lambda o: ["train-tokenizer", text / "genesis.txt", "--vocab-size", 400, "--out", o],
           tmp_path / "tok")
    shutil.copy(tmp_path / "tok" / "tokenizer.model", text / "tokenizer.model")
    _own_input(capsys, tmp_path, ["train-tokenizer", text / "tokenizer.model", "--vocab-size", 400, "--out", text])


def test_merge_lora_and_export(capsys, base_dir, corpus, tokenizer_path, tmp_path):  # noqa: F811
    from annotated_llama.transforms.lora import apply_lora, save_adapter
    from annotated_llama.train.checkpoint import save_checkpoint
    from annotated_llama.data.pretokenize import pretokenize
    from annotated_llama.weights import load_model

    model, _ = load_model(base_dir)
    apply_lora(model, "wq,wv", r=4)
    adapter = tmp_path / "adapter"
    save_adapter(model, adapter)
    base = tmp_path / "base"
    shutil.copytree(base_dir, base)
    _twice(capsys, tmp_path, lambda o: ["merge-lora", base, adapter, o], tmp_path / "merged")
    _own_input(capsys, tmp_path, ["merge-lora", base, adapter, base])
    _own_input(capsys, tmp_path, ["merge-lora", base, adapter, adapter])
    # export: a checkpoint of a 256-token model, and shards

    shards = tmp_path / "shards"
    pretokenize([corpus], tokenizer_path, shards, val_every=8, progress=False)
    args = ModelArgs.from_name("tiny", vocab_size=Tokenizer(tokenizer_path).n_words)
    ckpt = save_checkpoint(tmp_path / "run", 1, Transformer(args).state_dict(),
                           {"step": 1, "tokens": 0, "elapsed_s": 0.0, "optimizer": {},
                            "config": {k: 0 for k in ("lr", "min_lr_ratio", "warmup_steps", "weight_decay", "beta1",
                                                      "beta2", "eps", "grad_clip", "grad_accum", "dtype", "seed",
                                                      "max_steps")}},
                           lambda d: ((d / "params.json").write_text(json.dumps(args.to_params_json())),
                                      shutil.copy(tokenizer_path, d / "tokenizer.model")))

    def export(*argv):
        rc = main(["export", *map(str, argv)])
        err = capsys.readouterr().err.strip().splitlines()
        assert "Traceback" not in "\n".join(err)
        return rc, err

    assert export(ckpt, tmp_path / "exported", "--data", shards)[0] == 0
    first = tree(tmp_path)
    rc, err = export(ckpt, tmp_path / "exported", "--data", shards)
    assert rc == 2 and len(err) == 1 and "already exists" in err[0] and "--force" in err[0]
    assert tree(tmp_path) == first
    assert export(ckpt, tmp_path / "exported", "--data", shards, "--force")[0] == 0
    for out in (shards, ckpt, tmp_path / "run"):
        for extra in ([], ["--force"]):
            rc, err = export(ckpt, out, "--data", shards, *extra)
            assert rc == 2 and len(err) == 1 and "never written over" in err[0], err


def test_self_instruct_out(capsys, tmp_path):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    out = tmp_path / "records.jsonl"
    out.write_text('{"instruction": "mine"}\n')
    before = tree(tmp_path)
    base = ["self-instruct", "--seed-tasks", seeds, "--num", 2, "--endpoint", "http://127.0.0.1:9/v1", "--model", "m"]
    refused(capsys, *base, "--out", out, needles=["--out", "already exists", "--force"])
    for extra in ([], ["--force"]):
        refused(capsys, *base, "--out", seeds, *extra, needles=["never written over"])
    assert tree(tmp_path) == before


def test_the_output_rule_sees_through_links(tmp_path):
    from annotated_llama.core.outputs import check_output

    model = tmp_path / "model"
    model.mkdir()
    (model / "w.bin").write_bytes(b"w")
    (tmp_path / "alias").symlink_to(model, target_is_directory=True)
    (tmp_path / "hard.bin").hardlink_to(model / "w.bin")
    for out, inp in ((tmp_path / "alias", model), (tmp_path / "alias" / "..", model), (tmp_path / "hard.bin",
                                                                                         model / "w.bin")):
        with pytest.raises(ValueError, match="never written over"):
            check_output(out, force=True, inputs=[inp])
    check_output(tmp_path / "new", inputs=[model])  # a new place is fine
    (tmp_path / "empty").mkdir()
    check_output(tmp_path / "empty", inputs=[model])  # and so is an empty dir
