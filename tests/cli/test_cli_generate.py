"""`annotated-llama generate` and `chat` on a tiny random model saved in our checkpoint-dir format."""

import io
import os
import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from annotated_llama import ModelArgs, Tokenizer, Transformer
from annotated_llama.__main__ import main
from annotated_llama.inference.generation import Llama


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, spm_path):
    d = tmp_path_factory.mktemp("tiny-ckpt")
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=32000, multiple_of=32, max_seq_len=96)
    torch.manual_seed(0)
    model = Transformer(args)
    (d / "params.json").write_text(json.dumps(args.to_params_json()))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "model.safetensors"))
    shutil.copy(spm_path, d / "tokenizer.model")
    return d


def cli(capsys, *argv, stdin=None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_generate_json_fields_match_the_python_api(capsys, model_dir):
    code, out, err = cli(capsys, "generate", "Hello there", "--model", str(model_dir), "--temperature", "0",
                         "--max-new-tokens", "12", "--ignore-eos", "--json")
    assert code == 0, err
    obj = json.loads(out)
    assert set(obj) >= {"text", "tokens", "prompt_tokens", "generated_tokens", "prefill_tokens_per_s",
                        "decode_tokens_per_s"}
    llama = Llama.build(str(model_dir))
    ids = llama.tokenizer.encode("Hello there", bos=True, eos=False)
    expected = llama.generate([ids], 12, temperature=0, ignore_eos=True)[0][0]
    assert obj["tokens"] == expected and obj["generated_tokens"] == 12 and obj["prompt_tokens"] == len(ids)
    assert obj["text"] == llama.text_completion(["Hello there"], temperature=0, max_gen_len=12,
                                                ignore_eos=True)[0]["generation"]
    assert obj["prefill_tokens_per_s"] > 0 and obj["decode_tokens_per_s"] > 0


def test_generate_streams_the_same_text(capsys, model_dir):
    argv = ["generate", "Once", "--model", str(model_dir), "--temperature", "0.8", "--seed", "3",
            "--max-new-tokens", "10", "--ignore-eos", "--top-k", "40", "--repetition-penalty", "1.2"]
    code, out, err = cli(capsys, *argv)
    assert code == 0, err
    code, js, _ = cli(capsys, *argv, "--json")
    assert out == json.loads(js)["text"] + "\n"


def test_generate_stop_string_and_template(capsys, model_dir):
    base = ["generate", "Tell me", "--model", str(model_dir), "--temperature", "0", "--max-new-tokens", "20",
            "--ignore-eos", "--json"]
    full = json.loads(cli(capsys, *base)[1])["text"]
    stop = full.strip()[3:6]
    cut = json.loads(cli(capsys, *base, "--stop", stop, "--stop", "zzzq")[1])
    assert cut["text"] == full[:full.index(stop)] and cut["generated_tokens"] < 20
    code, out, err = cli(capsys, *base, "--template", "alpaca", "--system", "context here")
    assert code == 0, err
    assert json.loads(out)["prompt_tokens"] > 40  # the Alpaca preamble was added


def test_generate_reads_the_prompt_from_stdin(capsys, model_dir, monkeypatch):
    code, out, err = cli(capsys, "generate", "--model", str(model_dir), "--temperature", "0",
                         "--max-new-tokens", "3", "--json", stdin="Hello there", monkeypatch=monkeypatch)
    assert code == 0, err
    assert json.loads(out)["prompt_tokens"] == len(Tokenizer(model_dir / "tokenizer.model").encode("Hello there", True, False))


@pytest.mark.parametrize("extra, message", [
    (["--top-p", "0"], "argument --top-p"),  # refused while parsing (cli/argtypes.py)
    (["--temperature", "-1"], "argument --temperature"),
    (["--tp", "3"], "--tp 3"),  # n_heads 4 is not divisible by 3: refused before any process starts
    (["--template", "llama-3"], "Llama 3 tokenizer"),
    (["--template", "llama-2", "--system", "say [INST]"], "special tags"),
])
def test_generate_errors_are_one_line(capsys, model_dir, extra, message):
    try:
        code, out, err = cli(capsys, "generate", "Hi", "--model", str(model_dir), "--max-new-tokens", "2", *extra)
    except SystemExit as e:  # argparse
        code, err = e.code, capsys.readouterr().err
    assert code == 2 and message in err and err.strip().count("\n") == 0, err


@pytest.mark.slow  # a fresh interpreter importing torch: ~5 s alone, tens of seconds on a loaded box
def test_generate_errors_from_a_real_process(tmp_path, model_dir):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "annotated_llama", "generate", "x" * 500, "--model", str(model_dir)],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "context" in r.stderr
    code = main(["generate", "Hi", "--model", str(tmp_path / "nope")])
    assert code == 2


def test_build_caps_but_never_extends_the_context(model_dir):
    assert Llama.build(str(model_dir), max_seq_len=64).max_seq_len == 64
    llama = Llama.build(str(model_dir))  # default 2048 > the trained 96: stays 96
    assert llama.max_seq_len == 96
    with pytest.raises(ValueError, match="context"):
        llama.generate([[1] * 96], 4)


def test_generate_on_an_hf_directory(capsys, model_dir, tmp_path):
    """A directory saved by transformers itself (config.json + model.safetensors) + tokenizer.model."""
    transformers = pytest.importorskip("transformers")
    from annotated_llama.weights.hf import meta_to_hf_state_dict
    from safetensors.torch import load_file
    args = ModelArgs.from_params_json(model_dir / "params.json")
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**args.to_hf_config()))
    hf.load_state_dict(meta_to_hf_state_dict(load_file(str(model_dir / "model.safetensors")), args))
    hf.save_pretrained(tmp_path / "hf")
    shutil.copy(model_dir / "tokenizer.model", tmp_path / "hf" / "tokenizer.model")
    runs = [json.loads(cli(capsys, "generate", "Hello", "--model", str(d), "--temperature", "0",
                           "--max-new-tokens", "8", "--ignore-eos", "--json")[1]) for d in (model_dir, tmp_path / "hf")]
    assert runs[0]["tokens"] == runs[1]["tokens"] and len(runs[0]["tokens"]) == 8


def test_chat_over_stdin_ends_at_eof(capsys, model_dir, monkeypatch):
    code, out, err = cli(capsys, "chat", "--model", str(model_dir), "--temperature", "0", "--max-new-tokens", "5",
                         "--system", "Be brief.", stdin="Hello\n\nHow are you?\n", monkeypatch=monkeypatch)
    assert code == 0, err
    assert out.count("\n") == 2  # two answers, one line each; the empty line was skipped


def test_chat_drops_oldest_turns_to_fit_the_context(spm_path):
    from annotated_llama.cli.chat import fit_history
    tok = Tokenizer(spm_path)
    dialog = [{"role": "system", "content": "S"}]
    for i in range(6):
        dialog += [{"role": "user", "content": f"question {i} " * 5}, {"role": "assistant", "content": "answer " * 5}]
    dialog.append({"role": "user", "content": "last"})
    ids, kept = fit_history(tok, dialog, "llama-2", 60)
    assert len(ids) <= 60 and kept[0]["role"] == "system" and kept[-1]["content"] == "last"
    assert len(kept) < len(dialog) and kept[1]["role"] == "user"


def _json_run(capsys, *argv):
    code, out, err = cli(capsys, "generate", *argv, "--json")
    assert code == 0, err
    r = json.loads(out)
    return r["text"], r["tokens"]


@pytest.mark.slow  # one torch.compile of the default model's decode step
def test_generate_compiled_backend_gives_the_eager_text(capsys):
    # the embedded model (trained, so no near-ties for float rounding to flip); a stop string too
    base = ("In the beginning", "--temperature", "0", "--max-new-tokens", "24", "--dtype", "float32")
    eager = _json_run(capsys, *base, "--backend", "eager")
    assert _json_run(capsys, *base) == eager  # auto: one generation runs eagerly
    assert _json_run(capsys, *base, "--backend", "compiled") == eager
    stopped = _json_run(capsys, *base, "--stop", "the", "--backend", "compiled")
    assert stopped == _json_run(capsys, *base, "--stop", "the") and len(stopped[1]) < len(eager[1])
