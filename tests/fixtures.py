"""What the tests share (not a test module; pytest fixtures built on these are in conftest.py).

The reference implementations every generation path is checked against:

- `meta_generate`: meta-llama/llama generation.py (v2) `generate`, step for step: prompts
  right-padded into one (B, total_len) grid, the model run from the shortest prompt's end one
  position per call for every row, rows inside their prompt teacher-forced, Meta's
  `forward(tokens, start_pos)` contract. Slow (every row pays until the last is done) and
  independent of the engine: the engine's batching must reproduce it row for row.
- `greedy_reference`: greedy decoding with no KV cache at all, one full forward per token.

Besides them: `tiny_model` (every test's random LLaMA), `FileServer` (a local HTTP server that
drops, stalls, lies and attacks, for the downloader), `RawHTTP` (one client connection driven by
h11), `cli` (the command line in this process) and the shared data of the training and grammar tests.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
import socket
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import h11

import torch
import torch.nn.functional as F

from annotated_llama import ModelArgs, Transformer
from annotated_llama.core.sampling import sample, token_presence


@torch.inference_mode()
def meta_generate(model, tokenizer, prompt_tokens, max_gen_len=None, temperature=0.6, top_p=0.9, logprobs=False,
                  echo=False, *, top_k=None, repetition_penalty=1.0, ignore_eos=False, generator=None):
    """(tokens, logprobs or None) per prompt, exactly as Meta's loop computes them; also returns
    the number of forward calls it made."""
    params = model.params
    dev = model.tok_embeddings.weight.device
    bsz = len(prompt_tokens)
    if max_gen_len is None:
        max_gen_len = params.max_seq_len - 1  # Meta's text_completion default
    min_prompt_len = min(len(t) for t in prompt_tokens)
    max_prompt_len = max(len(t) for t in prompt_tokens)
    total_len = min(params.max_seq_len, max_gen_len + max_prompt_len)
    pad_id = -1
    tokens = torch.full((bsz, total_len), pad_id, dtype=torch.long, device=dev)
    for k, t in enumerate(prompt_tokens):
        tokens[k, :len(t)] = torch.tensor(t, dtype=torch.long, device=dev)
    token_logprobs = torch.zeros_like(tokens, dtype=torch.float)
    prev_pos, calls = 0, 0
    eos_reached = torch.tensor([False] * bsz, device=dev)
    input_text_mask = tokens != pad_id
    stop_ids = torch.tensor(sorted(tokenizer.stop_ids), device=dev, dtype=torch.long)
    for cur_pos in range(min_prompt_len, total_len):
        logits = model(tokens[:, prev_pos:cur_pos].clamp(min=0), prev_pos)
        calls += 1
        presence = token_presence(tokens[:, :cur_pos], params.vocab_size) if repetition_penalty != 1.0 else None
        next_token = sample(logits[:, -1], temperature, top_p, top_k, generator=generator, presence=presence,
                            repetition_penalty=repetition_penalty)
        # teacher forcing: rows still inside their prompt take the prompt token
        next_token = torch.where(input_text_mask[:, cur_pos], tokens[:, cur_pos], next_token)
        tokens[:, cur_pos] = next_token
        if logprobs:
            token_logprobs[:, prev_pos + 1:cur_pos + 1] = -F.cross_entropy(
                logits.transpose(1, 2), tokens[:, prev_pos + 1:cur_pos + 1], reduction="none", ignore_index=pad_id)
        if not ignore_eos:
            eos_reached |= ~input_text_mask[:, cur_pos] & torch.isin(next_token, stop_ids)
        prev_pos = cur_pos
        if all(eos_reached):
            break
    out_tokens, out_logprobs = [], []
    for i, toks in enumerate(tokens.tolist()):
        start = 0 if echo else len(prompt_tokens[i])
        toks = toks[start:len(prompt_tokens[i]) + max_gen_len]
        probs = token_logprobs[i][start:len(prompt_tokens[i]) + max_gen_len].tolist() if logprobs else None
        if not ignore_eos:
            for s in tokenizer.stop_ids:  # cut at the first stop id
                if s in toks[len(prompt_tokens[i]) - start:]:
                    idx = toks.index(s, len(prompt_tokens[i]) - start)
                    toks = toks[:idx]
                    probs = probs[:idx] if logprobs else None
        toks = [t for t in toks if t != pad_id]  # positions never reached (early stop)
        out_tokens.append(toks)
        out_logprobs.append(probs[:len(toks)] if logprobs else None)
    return out_tokens, (out_logprobs if logprobs else None), calls


@torch.inference_mode()
def greedy_reference(model, prompt, max_new_tokens: int, stop_ids=()) -> list[int]:
    """Greedy new tokens with a full forward over the whole sequence for each (no cache); a stop
    id ends the list and is not part of it (Meta's rule)."""
    dev = model.tok_embeddings.weight.device
    seq, new = list(prompt), []
    for _ in range(max_new_tokens):
        tok = int(model(torch.tensor([seq], device=dev), cache=False)[0, -1].argmax())
        if tok in stop_ids:
            break
        new.append(tok)
        seq.append(tok)
    return new



def greedy_text(model, tokenizer, ids: list[int], n: int) -> str:
    """greedy_reference's new tokens as the text a server streams after the prompt `ids` (a
    continuation: decoded after the prompt's last token, so a leading space survives)."""
    new = greedy_reference(model, ids, n, stop_ids=tokenizer.stop_ids)
    return tokenizer.decode(ids[-1:] + new)[len(tokenizer.decode(ids[-1:])):]

# ---- tiny models ------------------------------------------------------------------------------

# 2 layers of width 64 over LLaMA's 32,000 ids: real tokenizers fit, and a step takes a millisecond.
TINY_ARGS = dict(dim=64, n_layers=2, n_heads=4, vocab_size=32000, multiple_of=32, max_seq_len=128)


def tiny_model(seed: int = 0, name: str | None = None, *, norm_noise: float = 0.0, sharpen: float | None = None,
               echo: float | None = None, cls=Transformer, **args) -> Transformer:
    """A random LLaMA in eval mode, built right after torch.manual_seed(seed): the preset `name`
    (ModelArgs.from_name) or TINY_ARGS, with `args` overriding. Random weights give near-uniform
    logits, so tests that compare argmaxes across code paths reshape them:
    norm_noise: non-trivial RMSNorm weights (N(1, norm_noise^2) instead of all ones);
    sharpen: the output head times this (logits spread enough that argmax has no near-ties that
    float rounding could flip); echo: the output head set to echo x the embedding (a model that
    likes to repeat what it reads, so repetition penalties show)."""
    torch.manual_seed(seed)
    model = cls(ModelArgs.from_name(name, **args) if name else ModelArgs(**{**TINY_ARGS, **args}))
    with torch.no_grad():
        if norm_noise:
            for pname, p in model.named_parameters():
                if "norm" in pname:
                    p.add_(torch.randn_like(p) * norm_noise)
        if sharpen is not None:
            model.output.weight.mul_(sharpen)
        if echo is not None:
            model.output.weight.copy_(model.tok_embeddings.weight * echo)
    return model.eval()


class NumberVocab:
    """What the engine reads of a tokenizer, for random-weight models with no vocabulary of their own:
    n_words ids, no stop ids, each id decoded as its number."""

    def __init__(self, n):
        self.n_words, self.stop_ids = n, set()

    def decode(self, ids):
        return " ".join(map(str, ids))


# ---- HTTP: a file server that misbehaves on purpose, and a raw client connection -----------------

def payload(n, seed=0):
    """n bytes of a pattern that no off-by-one or repeated block leaves unchanged."""
    return bytes((i * 7919 + seed * 31 + (i >> 8)) % 251 for i in range(n))


def md5(data):
    return hashlib.md5(data).hexdigest()


class FileServer:
    """Serves `files` ({"/path": bytes}) with Range support on 127.0.0.1. `plans[path]` lists what
    to do on successive requests (the last one repeats):
    "ok"; 403, 404; "drop:N" (N bytes of the body, then hang up); "stall:N" (N bytes, then silence,
    the connection open, far past a client's timeout); "stall-headers" (silence before any header);
    "corrupt" (one byte flipped); "ignore-range" (a full 200 for a Range request); "no-length" (no
    Content-Length, the body delimited by closing); "no-length-cut:N"; "bad-length" (Content-Length:
    abc); "short-length:N" (claims and sends N bytes: a lie about the file); "long-length" (claims 1000
    more than it sends); "chunked-cut:N" (one chunk, never the last); "bad-total" (a 206 whose
    Content-Range total is too small); "cd:VALUE" (a Content-Disposition header).
    `log` holds (path, Range header, query) of every request."""

    def __init__(self):
        self.files, self.plans, self.log = {}, {}, []
        self.release = threading.Event()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads, self.httpd.block_on_close = True, False
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def requests(self, path):
        return [rng for p, rng, _ in self.log if p == path]

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def _handler(self):
        srv = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                path, _, query = self.path.partition("?")
                srv.log.append((path, self.headers.get("Range"), query))
                plan = srv.plans.get(path) or ["ok"]
                action = plan.pop(0) if len(plan) > 1 else plan[0]
                kind, _, arg = str(action).partition(":")
                if action in (403, 404) or path not in srv.files:
                    self.send_error(action if action in (403, 404) else 404)
                    return
                if kind == "stall-headers":
                    srv.release.wait(30)
                    return
                data = srv.files[path]
                m = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
                start = int(m.group(1)) if m and kind not in ("ignore-range", "no-length", "no-length-cut") else 0
                if start >= len(data) and start:  # RFC 9110 15.5.17: 416 states the length
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = data[start:]
                if kind == "corrupt":
                    body = body[:10] + bytes([body[10] ^ 0xFF]) + body[11:]
                self.send_response(206 if start else 200)
                if start:
                    total = len(data) if kind != "bad-total" else start + 1
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{total}")
                if kind == "cd":
                    self.send_header("Content-Disposition", arg)
                if kind == "bad-length":
                    self.send_header("Content-Length", "abc")
                elif kind == "short-length":
                    body = body[:int(arg)]
                    self.send_header("Content-Length", arg)
                elif kind == "long-length":
                    self.send_header("Content-Length", str(len(body) + 1000))
                elif kind == "chunked-cut":
                    self.send_header("Transfer-Encoding", "chunked")
                elif kind not in ("no-length", "no-length-cut"):
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if kind == "chunked-cut":
                    self.wfile.write(b"%x\r\n" % int(arg) + body[:int(arg)] + b"\r\n")  # and never the last chunk
                elif kind in ("drop", "stall", "no-length-cut"):
                    self.wfile.write(body[:int(arg)])
                    self.wfile.flush()
                    if kind == "stall":
                        srv.release.wait(30)
                else:
                    self.wfile.write(body)
                self.close_connection = True
        return Handler


class RawHTTP:
    """One HTTP/1.1 connection driven with h11, so a test sees exactly whether the server keeps it
    open after a response (h11 refuses a second request on a connection the server has closed)."""

    def __init__(self, base: str):
        host, port = base.removeprefix("http://").split(":")
        self.host = f"{host}:{port}"
        self.sock = socket.create_connection((host, int(port)), timeout=60)
        self.conn = h11.Connection(h11.CLIENT)

    def request(self, method, path, headers=None, body=None):
        """(status, body) of one request; `body` is bytes, or a callable giving the chunks to send
        with Transfer-Encoding: chunked."""
        headers = {"Host": self.host, **(headers or {})}
        chunks = body() if callable(body) else None
        if chunks is None:
            headers["Content-Length"] = str(len(body or b""))
        else:
            headers["Transfer-Encoding"] = "chunked"
        out = self.conn.send(h11.Request(method=method, target=path, headers=list(headers.items())))
        for part in (chunks if chunks is not None else [body] if body else []):
            out += self.conn.send(h11.Data(data=part))
        self.sock.sendall(out + self.conn.send(h11.EndOfMessage()))
        status, data, reply_headers = None, b"", {}
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(self.sock.recv(1 << 16))
            elif isinstance(event, h11.Response):
                status, reply_headers = event.status_code, dict(event.headers)
            elif isinstance(event, h11.Data):
                data += event.data
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                break
        assert reply_headers.get(b"connection") != b"close", "the server closed the connection"
        self.conn.start_next_cycle()  # raises if either side cannot go on with this connection
        return status, data

    def close(self):
        self.sock.close()


# ---- shared data and helpers of the training, fine-tuning, tokenizer and grammar tests ----------

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "assets"


TINY = {"dim": 32, "n_layers": 2, "n_heads": 4, "vocab_size": -1, "multiple_of": 16, "max_seq_len": 64}


RECORDS = [
    {"instruction": "Name the first book.", "input": "", "output": "Genesis"},
    {"instruction": "Reverse the order of this list.", "input": "bread, water, lamb", "output": "lamb, water, bread"},
    {"instruction": "What is 3 plus 4?", "input": "", "output": "7"},
    {"instruction": "What is the last word of this verse?", "input": "God saw the light.", "output": "light"},
    {"instruction": "Say hello.", "input": "", "output": "Hello there, friend."},
    {"instruction": "Count the words.", "input": "in the beginning", "output": "3"},
]


def cli(*args, check=True):
    """`annotated-llama ARGS` in this process (no torch import per call): (returncode, stdout, stderr)."""
    from annotated_llama.__main__ import main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    proc = subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())
    if check and code != 0:
        raise AssertionError(f"exit {code}: {proc.stderr[-2000:]}")
    return proc


def read_log(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def pretrain_args(shards, params_json, out, steps=12, *extra):
    return ["pretrain", "--data", shards, "--preset", params_json, "--out", out, "--max-steps", steps,
            "--batch-size", 2, "--seq-len", 32, "--lr", 3e-3, "--warmup-steps", 2, "--dtype", "float32",
            "--log-every", 1, "--eval-every", 6, "--eval-windows", 2, "--ckpt-every", 2, "--keep-checkpoints", 2,
            "--seed", 5, *extra]


def obj(props: dict) -> dict:
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


SCHEMAS = {
    "nested": obj({"name": {"type": "string", "maxLength": 12},
                   "address": obj({"city": {"enum": ["Paris", "Rome", "Oslo"]},
                                   "zip": {"type": "integer", "minimum": 1000, "maximum": 99999}}),
                   "tags": obj({"primary": {"type": "boolean"}})}),
    "enums": obj({"color": {"enum": ["red", "green", "blue"]}, "size": {"type": "string", "enum": ["S", "M", "L"]},
                  "ok": {"type": "boolean"}, "nothing": {"type": "null"}}),
    "arrays": obj({"tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 4},
                   "scores": {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5},
                              "maxItems": 3},
                   "pairs": {"type": "array", "maxItems": 2,
                             "items": obj({"k": {"type": "string", "maxLength": 3}, "v": {"type": "number",
                                                                                          "minimum": 0,
                                                                                          "maximum": 1}})}}),
    "integer-ranges": obj({"age": {"type": "integer", "minimum": 0, "maximum": 120},
                           "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
                           "delta": {"type": "integer", "exclusiveMinimum": -10, "exclusiveMaximum": 10},
                           "big": {"type": "integer", "minimum": 100000, "maximum": 100005}}),
    "defs-anyof-nullable": {**obj({"kind": {"anyOf": [{"type": "null"}, {"$ref": "#/$defs/k"}]},
                                   "note": {"type": ["string", "null"], "maxLength": 5}}),
                            "$defs": {"k": {"enum": ["x", "y"]}}},
}


def golden_cases(stem):
    inputs = (DATA / f"{stem}.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")[:-1]
    outputs = (DATA / f"{stem}.out").read_text(encoding="utf-8").split("\n")[:-1]
    assert len(inputs) == len(outputs) == 46
    return [(text, [int(i) for i in ids.split()]) for text, ids in zip(inputs, outputs)]


def random_strings(rng, n):
    alphabet = ("abcdefghijklmnopqrstuvwxyz ABCXYZ 0123456789 \t\n\r.,;:!?'\"()[]{}<>/\\|@#$%^&*-_=+~`"
                "éèüßøåçñ ÄÖÜ αβγδ абвгд 中文字 日本語 한국어 עברית العربية हिन्दी ")
    emoji = ["🦙", "👍🏽", "🇫🇷", "👨‍👩‍👧", "❤️", "\u200b", "\u0000", "\u0007", "\x7f", "\ufeff"]
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(0, 12)):
            r = rng.random()
            if r < 0.6:
                parts.append("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 8))))
            elif r < 0.8:
                parts.append(rng.choice(emoji))
            else:  # any valid code point, surrogates excluded
                cp = rng.randint(0, 0x10FFFF)
                parts.append(chr(cp) if not 0xD800 <= cp <= 0xDFFF else "x")
        out.append("".join(parts))
    return out
