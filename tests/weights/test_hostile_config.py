"""Absurd configurations, refused from the config alone: a layer count of 10**9 (or a dim, vocabulary,
head count, context or FFN width as absurd) in params.json, config.json, a GGUF's metadata, a
quantized dir or a pretraining preset fails within seconds and a bounded amount of memory, with
the size the config describes in the message, before any model (even a meta-device skeleton) is
built. Once, such a config grew the loader by ~35 MB/s until the machine killed it.

All cases run in one subprocess, which reports each one's exit status, stderr, seconds and the
growth of its peak resident memory (ru_maxrss)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from annotated_llama.core.config import LIMITS, ModelArgs

from fixtures import REPO


# (field in our/Meta's params.json, field in HF's config.json, GGUF key, absurd value)
FIELDS = [
    ("n_layers", "num_hidden_layers", "block_count", 10 ** 9),
    ("dim", "hidden_size", "embedding_length", 1 << 30),
    ("n_heads", "num_attention_heads", "head_count", 10 ** 6),
    ("n_kv_heads", "num_key_value_heads", "head_count_kv", 10 ** 6),
    ("vocab_size", "vocab_size", None, 10 ** 12),
    ("max_seq_len", "max_position_embeddings", "context_length", 10 ** 12),
    ("hidden_dim", "intermediate_size", "feed_forward_length", 10 ** 9),
    ("n_layers", "num_hidden_layers", "block_count", 1000),  # within the limits, a lie about the file
]
# JSON texts for n_layers in params.json: a float, a string, a negative, a bool, NaN and Infinity
# (Python's json reads both), and an integer of 5,000 digits
ODD_VALUES = ["1e9", '"32"', "-1", "true", "NaN", "Infinity", "9" * 5000, "null", "[32]"]

SCRIPT = r'''
import copy, json, math, resource, sys, time, io, contextlib
from pathlib import Path
import torch
from annotated_llama import ModelArgs, Tokenizer, Transformer
from annotated_llama.__main__ import main
from annotated_llama.weights import save_model
from annotated_llama.weights.gguf import save_gguf
import annotated_llama.cli.pretrain, annotated_llama.train.pretrain, annotated_llama.train.evaluation  # noqa: E401

root, tok_path, fields, odd = Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
tok = Tokenizer(tok_path)
torch.manual_seed(0)
model = Transformer(ModelArgs.from_name("tiny", vocab_size=tok.n_words, max_seq_len=128))
good = {}
for fmt in ("ours", "hf", "meta"):
    good[fmt] = root / fmt
    save_model(model, tok, good[fmt], format=fmt)
main(["quantize", str(good["ours"]), str(root / "quantized")])
text = root / "text.txt"
text.write_text("In the beginning God created the heavens and the earth. " * 400 + "\n\n" + "And God said. " * 400)
main(["pretokenize", str(text), "--tokenizer", tok_path, "--out", str(root / "shards"), "--val-every", "2"])

def rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

def run(argv):
    err = io.StringIO()
    t0, m0 = time.perf_counter(), rss_mb()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(argv)
    return {"rc": rc, "err": err.getvalue(), "s": time.perf_counter() - t0, "rss_mb": rss_mb() - m0}

results = []
def case(name, path, argv):
    r = run(argv)
    r.update(case=name, path=str(path))
    results.append(r)

def patched_json(fmt, file, key, value):
    d = root / f"{fmt}-{key}-{len(results)}"
    import shutil
    shutil.copytree(good[fmt], d)
    cfg = json.loads((d / file).read_text())
    cfg[key] = value
    (d / file).write_text(json.dumps(cfg) if not isinstance(value, str) or not value.startswith("RAW:")
                          else json.dumps(cfg).replace(json.dumps(value), value[4:]))
    return d

base = m0 = rss_mb()
for ours, hf, gguf_key, value in fields:
    for fmt, file, key in (("ours", "params.json", ours), ("meta", "params.json", ours), ("hf", "config.json", hf)):
        d = patched_json(fmt, file, key, value)
        case(f"{fmt} {key}={value}", d / file, ["convert", str(d), str(d) + "-out", "--to", "ours"])
    d = patched_json("quantized" if False else "ours", "params.json", ours, value)
    case(f"evaluate {ours}={value}", d / "params.json", ["evaluate", "--model", str(d), "--data", str(root / "shards")])
    # a quantized dir: load_quantized builds (and fills) the model from params.json before reading
    import shutil
    q = root / f"q-{len(results)}"
    shutil.copytree(root / "quantized", q)
    cfg = json.loads((q / "params.json").read_text())
    cfg[ours] = value
    (q / "params.json").write_text(json.dumps(cfg))
    case(f"quantized {ours}={value}", q / "params.json", ["convert", str(q), str(q) + "-out", "--to", "ours"])
    if gguf_key is not None:
        args = copy.copy(model.params)
        setattr(args, {"block_count": "n_layers", "embedding_length": "dim", "head_count": "n_heads",
                       "head_count_kv": "n_kv_heads", "context_length": "max_seq_len",
                       "feed_forward_length": "hidden_dim"}[gguf_key], min(value, 2 ** 32 - 1))  # GGUF's uint32
        g = root / f"m-{len(results)}.gguf"
        save_gguf(g, args, {k: v.detach() for k, v in model.state_dict().items()}, tok)
        case(f"gguf llama.{gguf_key}={value}", g, ["convert", str(g), str(g) + "-out", "--to", "ours"])
    if value == 1000:
        continue  # within the limits: a lie about a checkpoint, but a real (50M) model to pretrain
    preset = root / f"preset-{len(results)}.json"
    preset.write_text(json.dumps({**ModelArgs.from_name("tiny").to_params_json(), "vocab_size": -1, ours: value}))
    case(f"pretrain --preset {ours}={value}", preset,
         ["pretrain", "--data", str(root / "shards"), "--preset", str(preset), "--out",
          str(root / f"run-{len(results)}"), "--max-steps", "1", "--seq-len", "16", "--batch-size", "1"])
for value in json.loads(odd):
    d = patched_json("ours", "params.json", "n_layers", value)
    case(f"ours n_layers={value}"[:60], d / "params.json", ["convert", str(d), str(d) + "-out", "--to", "ours"])
# within every limit (a 70B shape), but no machine here can train it: 16 bytes per parameter
preset = root / "huge.json"
preset.write_text(json.dumps({"dim": 8192, "n_layers": 80, "n_heads": 64, "vocab_size": -1}))
case("pretrain --preset 8192 x 80", preset, ["pretrain", "--data", str(root / "shards"), "--preset", str(preset),
                                                  "--out", str(root / "huge-run"), "--max-steps", "1"])
print(json.dumps({"results": results, "total_rss_mb": rss_mb() - base}))
'''


def test_absurd_configs_are_refused_fast_in_bounded_memory(tmp_path, tiny_tokenizer_path):  # noqa: F811
    odd = json.dumps(["RAW:" + v for v in ODD_VALUES])
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), str(tiny_tokenizer_path),
                           json.dumps(FIELDS), odd], capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    results = report["results"]
    assert len(results) >= 50, len(results)
    for r in results:
        lines = r["err"].strip().splitlines()
        assert r["rc"] == 2 and len(lines) == 1 and "Traceback" not in r["err"], r
        assert Path(r["path"]).name in lines[0], r  # names the file the absurd value is in
        assert r["s"] < 10 and r["rss_mb"] < 100, r  # seconds (a loaded 2-core box), megabytes of peak growth
        assert any(w in lines[0] for w in ("limit", "positive", "integer", "not valid JSON", "finite", "needs",
                                            "describes", "differs", "divisible")), r
        if "n_layers=1000" in r["case"] or "block_count=1000" in r["case"] or "beyond the limit" in lines[0]:
            assert "parameters" in lines[0] and ("GB" in lines[0] or "MB" in lines[0] or "B in" in lines[0]), r
    assert report["total_rss_mb"] < 300


def test_the_limits_cover_every_released_llama():
    from annotated_llama.core.config import PRESETS

    for name, preset in PRESETS.items():  # none refused
        ModelArgs(**preset)
    # Llama 3.1 405B (params.json of meta-llama/Llama-3.1-405B) and a 1M-context 8B fine-tune
    big = ModelArgs(dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, vocab_size=128256, multiple_of=4096,
                    ffn_dim_multiplier=1.2, rope_theta=500000.0, use_scaled_rope=True, max_seq_len=131072)
    assert 4.0e11 < big.num_params() < 4.1e11
    ModelArgs.from_name("llama-3.1-8b", max_seq_len=1 << 20)
    for name, limit in LIMITS.items():
        with pytest.raises(ValueError, match=f"{name}="):
            ModelArgs(**{**PRESETS["tiny"], name: limit * 2})
