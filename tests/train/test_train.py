"""Pretraining: tokenizer training, token shards, the loop's recipe, checkpoints and exact resume, bad input."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import sentencepiece as spm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from sentencepiece import sentencepiece_model_pb2 as pb

from annotated_llama import ModelArgs, Tokenizer, Transformer
from annotated_llama.data import pretokenize as tdata
from annotated_llama.train.loop import TrainConfig, lr_at, param_groups, token_loss_eval, train

import fixtures
from fixtures import TINY, cli, pretrain_args, read_log


# ---- tokenizer training -------------------------------------------------------------------

def test_tokenizer_has_llamas_settings(tokenizer_path, spm_path):
    ours, meta = pb.ModelProto(), pb.ModelProto()
    ours.ParseFromString(tokenizer_path.read_bytes())
    meta.ParseFromString(spm_path.read_bytes())
    stored = [f.name for f, _ in meta.trainer_spec.ListFields()]  # the fixture keeps the essential ones
    assert {"model_type", "split_digits", "byte_fallback"} <= set(stored)
    for field in stored:
        if field != "vocab_size":
            assert getattr(ours.trainer_spec, field) == getattr(meta.trainer_spec, field), field
    assert ours.trainer_spec.allow_whitespace_only_pieces  # as in Meta's full tokenizer.model
    for field in ("name", "add_dummy_prefix", "remove_extra_whitespaces", "escape_whitespaces"):
        assert getattr(ours.normalizer_spec, field) == getattr(meta.normalizer_spec, field), field
    assert ours.trainer_spec.vocab_size == 400 == len(ours.pieces)


def test_tokenizer_splits_digits_and_falls_back_to_bytes(tokenizer_path):
    tok = Tokenizer(tokenizer_path)
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))  # the reference implementation
    text = "In the beginning 1984 ☃ ü\n\n  two  spaces"
    ids = tok.encode(text, bos=True, eos=False)
    assert ids == [1] + sp.encode(text)
    pieces = [tok.id_to_piece(i) for i in ids]
    number = tok.encode("1984", bos=False, eos=False)
    assert [tok.decode([i]) for i in number[1:]] == list("1984")  # "▁" then the digits one by one
    assert "<0xE2>" in pieces  # the snowman (not in Genesis) decomposed into UTF-8 bytes
    assert tok.decode(ids) == text  # identity normalization keeps every space


# ---- data ---------------------------------------------------------------------------------

def test_pretokenize_split_is_whole_documents_and_deterministic(corpus, tokenizer_path, shards, tmp_path):
    meta = json.loads((shards / "meta.json").read_text())
    tok = Tokenizer(tokenizer_path)
    docs = tdata.documents(corpus.read_text())
    val_docs = [d for i, d in enumerate(docs) if i % 8 == tdata.VAL_OFFSET % 8]
    val = np.memmap(shards / "val.bin", dtype=np.uint16, mode="r")
    assert meta["dtype"] == "uint16" and meta["val_tokens"] == len(val)
    expected = [i for d in val_docs for i in tok.encode(d, bos=True, eos=True)]
    assert val.tolist() == expected
    train_text = tok.decode(np.memmap(shards / "train.bin", dtype=np.uint16, mode="r").tolist())
    assert all(d not in train_text for d in val_docs)  # no held-out paragraph leaks into training
    again = tmp_path / "again"
    tdata.pretokenize([corpus], tokenizer_path, again, val_every=8, progress=False)
    assert (again / "train.bin").read_bytes() == (shards / "train.bin").read_bytes()


def test_window_sampler_ranks_share_the_global_batch(shards):
    tokens = tdata.open_tokens(shards, "train")
    whole = tdata.WindowSampler(tokens, 6, 16, seed=3)(5)
    parts = [tdata.WindowSampler(tokens, 3, 16, seed=3, rank=r, world_size=2)(5) for r in range(2)]
    assert torch.equal(torch.cat([p[0] for p in parts]), whole[0])
    x, y = whole
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
    windows = np.lib.stride_tricks.sliding_window_view(np.asarray(tokens, dtype=np.int64), 16)  # (N, 16)
    assert all((windows == row.numpy()).all(1).any() for row in x)  # each row is a window of the shard
    assert not torch.equal(tdata.WindowSampler(tokens, 6, 16, seed=3)(6)[0], x)


# ---- the recipe ---------------------------------------------------------------------------

def test_lr_schedule_matches_the_formula():
    cfg = TrainConfig(out_dir="unused", max_steps=1000, lr=3e-4, warmup_steps=100, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(3e-4 / 100)  # warm-up start
    assert lr_at(49, cfg) == pytest.approx(3e-4 * 50 / 100)
    assert lr_at(99, cfg) == pytest.approx(3e-4)  # peak at the end of warm-up
    assert lr_at(100, cfg) == pytest.approx(3e-4)
    assert lr_at(550, cfg) == pytest.approx(3e-5 + 0.5 * (3e-4 - 3e-5))  # half-way down the cosine
    assert lr_at(1000, cfg) == pytest.approx(3e-5)  # end: 10% of the peak
    t = (700 - 100) / 900
    assert lr_at(700, cfg) == pytest.approx(3e-5 + (3e-4 - 3e-5) * (1 + math.cos(math.pi * t)) / 2)
    assert TrainConfig(out_dir="x", max_steps=1_000_000).warmup_steps == 2000  # the paper's, at most


def test_weight_decay_on_linear_matrices_only():
    model = Transformer(ModelArgs.from_name("tiny"))
    decay, keep = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in keep["params"]}
    assert decay["weight_decay"] == 0.1 and keep["weight_decay"] == 0.0
    assert kept == {n for n in names.values() if n.endswith("norm.weight")} | {"tok_embeddings.weight"}
    assert decayed == {n for n, p in model.named_parameters()
                       if n.endswith(("wq.weight", "wk.weight", "wv.weight", "wo.weight", "w1.weight", "w2.weight",
                                      "w3.weight")) or n == "output.weight"}


def repeated_batches(vocab=64, B=4, T=16):
    pattern = torch.randint(0, vocab, (37,), generator=torch.Generator().manual_seed(0))
    stream = pattern.repeat(20)

    def draw(i):
        starts = torch.randint(0, len(stream) - T - 1, (B,), generator=torch.Generator().manual_seed(i))
        rows = torch.stack([stream[s:s + T + 1] for s in starts.tolist()])
        return rows[:, :-1], rows[:, 1:]
    return draw


def tiny_model(vocab=64, seed=0):
    return fixtures.tiny_model(seed, **{**TINY, "vocab_size": vocab, "max_seq_len": 32}).train()


@pytest.mark.slow
def test_loss_falls_on_repeated_text(tmp_path):
    cfg = TrainConfig(out_dir=str(tmp_path), max_steps=40, lr=1e-2, warmup_steps=5, dtype="float32", log_every=1,
                      progress=False)
    result = train(tiny_model(), repeated_batches(), cfg)
    log = read_log(tmp_path / "log.jsonl")
    assert log[0]["loss"] == pytest.approx(math.log(64), rel=0.1)  # starts at chance
    assert result["loss"] < 0.3 * log[0]["loss"]
    assert {"step", "loss", "lr", "tokens_per_s", "mfu"} - set(log[-1]) == {"mfu"}  # no FLOPs given: no mfu


def test_val_ppl_is_exp_of_mean_token_loss():
    model = tiny_model().eval()
    x = torch.randint(0, 64, (2, 12))
    y = torch.randint(0, 64, (2, 12))
    y2 = y.clone()
    y2[0, :7] = -100  # ignored targets carry no loss and count no tokens
    metrics = token_loss_eval([(x, y), (x, y2)])(model)
    with torch.no_grad():
        logp = torch.log_softmax(model(x, cache=False), -1)  # (B, T, V)
    nll = -logp.gather(-1, y[..., None])[..., 0]  # (B, T)
    expected = torch.cat([nll.flatten(), nll[0, 7:], nll[1]]).mean()
    assert metrics["val_tokens"] == 24 + 17
    assert metrics["val_loss"] == pytest.approx(float(expected), rel=1e-5)
    assert metrics["val_ppl"] == pytest.approx(math.exp(float(expected)), rel=1e-5)


def test_grad_accum_and_activation_checkpointing_match_one_big_batch(tmp_path):
    draw = repeated_batches(B=4)
    whole = lambda i: draw(i)  # noqa: E731
    halves = lambda i: tuple(t[(i % 2) * 2:(i % 2) * 2 + 2] for t in draw(i // 2))  # noqa: E731
    base = dict(max_steps=3, lr=1e-2, warmup_steps=1, dtype="float32", progress=False)
    a, b, c = tiny_model(), tiny_model(), tiny_model()
    ra = train(a, whole, TrainConfig(out_dir=str(tmp_path / "a"), **base))
    rb = train(b, halves, TrainConfig(out_dir=str(tmp_path / "b"), grad_accum=2, **base))
    rc = train(c, whole, TrainConfig(out_dir=str(tmp_path / "c"), activation_checkpointing=True, **base))
    assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5)
    assert rc["loss"] == pytest.approx(ra["loss"], rel=1e-6)
    for (n, p), q, r in zip(a.named_parameters(), b.parameters(), c.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=n)
        torch.testing.assert_close(r, p, rtol=1e-5, atol=1e-6, msg=n)


def test_trainable_filter_freezes_the_rest(tmp_path):
    model = tiny_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, repeated_batches(), TrainConfig(out_dir=str(tmp_path), max_steps=2, dtype="float32", progress=False),
          trainable=lambda name, p: name.startswith("layers.1."))
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) != n.startswith("layers.1."), n


def test_bf16_autocast_trains(tmp_path):
    cfg = TrainConfig(out_dir=str(tmp_path), max_steps=20, lr=1e-2, warmup_steps=2, dtype="bfloat16", progress=False,
                      flops_per_token=1e6, log_every=5)
    model = tiny_model()
    result = train(model, repeated_batches(), cfg)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay float32
    assert result["loss"] < 0.6 * math.log(64)
    assert 0 < read_log(tmp_path / "log.jsonl")[-1]["mfu"] < 1


# ---- the command line: checkpoints, exact resume, bad input ---------------------------------


@pytest.mark.slow
def test_sigkill_and_resume_is_bitwise_exact(shards, params_json, tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    # every run in a process of its own with one thread: a float sum split over another number of
    # threads rounds differently, and the kill may land on either side of any step
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def command(out, *extra):
        return [sys.executable, "-m", "annotated_llama", *map(str, pretrain_args(shards, params_json, out, 16, *extra))]
    subprocess.run(command(whole), check=True, capture_output=True, env=env)
    proc = subprocess.Popen(command(killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 90
    while not (killed / "ckpt-0000006").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)  # mid-run: after some checkpoint, maybe while writing the next
    proc.wait()
    assert not (killed / "ckpt-0000016").exists(), "the run finished before the kill"
    # a checkpoint half-written at the kill, and a ckpt dir without its state: both must be ignored
    (killed / ".tmp-ckpt-0000098-1").mkdir()
    (killed / ".tmp-ckpt-0000098-1" / "model.safetensors").write_bytes(b"half")
    (killed / "ckpt-0000099").mkdir()
    (killed / "ckpt-0000099" / "model.safetensors").write_bytes(b"no train_state.pt")
    subprocess.run(command(killed, "--resume"), check=True, capture_output=True, env=env)
    a, b = read_log(whole / "log.jsonl"), read_log(killed / "log.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b]  # nothing logged twice
    assert [r.get("loss", r.get("val_loss")) for r in a] == [r.get("loss", r.get("val_loss")) for r in b]
    wa, wb = load_file(whole / "ckpt-0000016/model.safetensors"), load_file(killed / "ckpt-0000016/model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not (killed / ".tmp-ckpt-0000098-1").exists()
    kept = sorted(p.name for p in whole.glob("ckpt-*"))
    assert kept == ["ckpt-0000014", "ckpt-0000016"]  # the last k=2
    ckpt = whole / "ckpt-0000016"
    assert json.loads((ckpt / "params.json").read_text())["vocab_size"] == 400
    state = torch.load(ckpt / "train_state.pt", weights_only=True)
    assert state["step"] == 16 and state["tokens"] == 16 * 2 * 32


def test_pretrain_refuses_another_runs_out_dir(shards, params_json, tmp_path):
    out = tmp_path / "run"
    cli(*pretrain_args(shards, params_json, out, 2))
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    proc = cli(*pretrain_args(shards, params_json, out, 2), check=False)
    assert proc.returncode == 2 and "--resume" in proc.stderr and "Traceback" not in proc.stderr
    assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_vocab_mismatch_is_refused(shards, tmp_path, corpus):
    from annotated_llama.train.tokenizer_training import train_tokenizer
    other = train_tokenizer([corpus], 360, tmp_path / "other")
    proc = cli("pretrain", "--data", shards, "--tokenizer", other, "--preset", "tiny", "--out", tmp_path / "o",
               "--max-steps", 1, check=False)
    assert proc.returncode == 2 and "400-piece" in proc.stderr and "360" in proc.stderr
    assert not (tmp_path / "o").exists()
    proc = cli("pretrain", "--data", shards, "--preset", "tiny", "--out", tmp_path / "o", "--max-steps", 1, check=False)
    assert proc.returncode == 2 and "vocab_size 512" in proc.stderr  # the preset's vocabulary is not the data's


def test_empty_or_missing_corpus_is_refused(tmp_path, tokenizer_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    for args, needle in ((["train-tokenizer", empty, "--out", tmp_path / "t"], "empty"),
                         (["train-tokenizer", tmp_path / "nope.txt", "--out", tmp_path / "t"], "not found"),
                         (["pretokenize", empty, "--tokenizer", tokenizer_path, "--out", tmp_path / "d"], "empty")):
        proc = cli(*args, check=False)
        assert proc.returncode == 2 and needle in proc.stderr and str(args[1]) in proc.stderr, proc.stderr
    assert not (tmp_path / "t" / "tokenizer.model").exists() and not (tmp_path / "d").exists()


def test_evaluate_command_reports_perplexity(shards, params_json, tmp_path):
    out = tmp_path / "run"
    cli(*pretrain_args(shards, params_json, out, 4))
    ckpt = out / "ckpt-0000004"
    got = json.loads(cli("evaluate", "--model", ckpt, "--data", shards, "--seq-len", 32,
                         "--max-windows", 3).stdout)
    args = ModelArgs.from_params_json(ckpt / "params.json")
    model = Transformer(args)
    model.load_state_dict(load_file(ckpt / "model.safetensors"))
    val = torch.from_numpy(np.asarray(tdata.open_tokens(shards, "val")[:3 * 32 + 1], dtype=np.int64))
    with torch.no_grad():
        logits = model(torch.stack([val[i * 32:(i + 1) * 32] for i in range(3)]), cache=False)
    targets = torch.stack([val[i * 32 + 1:(i + 1) * 32 + 1] for i in range(3)])
    loss = float(F.cross_entropy(logits.flatten(0, 1), targets.flatten()))
    assert got["tokens"] == 96 and got["val_loss"] == pytest.approx(loss, rel=1e-5)
    assert got["val_ppl"] == pytest.approx(math.exp(loss), rel=1e-5)
    from annotated_llama import load_model  # a checkpoint dir is a model dir
    loaded, tok = load_model(ckpt)
    assert tok.n_words == 400
    with torch.no_grad():
        torch.testing.assert_close(loaded(val[None, :32], cache=False), logits[:1])


def test_parallel_without_torchrun_is_refused(shards, params_json, tmp_path):
    proc = cli(*pretrain_args(shards, params_json, tmp_path / "o", 2), "--parallel", "ddp", check=False)
    assert proc.returncode == 2 and "torchrun" in proc.stderr


def test_evaluate_on_a_text_file(shards, params_json, tokenizer_path, tmp_path):
    out = tmp_path / "run"
    cli(*pretrain_args(shards, params_json, out, 2))
    text = tmp_path / "psalm.txt"
    text.write_text("Psalms 23\n\nYahweh is my shepherd; I shall lack nothing. He makes me lie down in green pastures.\n")
    got = json.loads(cli("evaluate", "--model", out / "ckpt-0000002", "--data", text, "--seq-len", 8,
                         "--max-windows", 0).stdout)
    ids = Tokenizer(tokenizer_path).encode(tdata.documents(text.read_text())[0], bos=True, eos=True)
    assert got["windows"] == (len(ids) - 1) // 8 and got["tokens"] == got["windows"] * 8
    assert math.isfinite(got["val_loss"]) and got["val_ppl"] == pytest.approx(math.exp(got["val_loss"]))
