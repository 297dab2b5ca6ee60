"""Self-instruct against a scripted OpenAI-compatible stub (http.server on 127.0.0.1) and against our own
server: numbered-reply parsing, every filter rule, ROUGE-L de-duplication, retries on 429 and 500, resume
after SIGKILL without duplicates, and records that `annotated-llama finetune` loads."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from rouge_score import rouge_scorer

from annotated_llama.__main__ import main
from annotated_llama.data.self_instruct import Config, Deduplicator, discard_reason, parse_reply, run, state_path

from fixtures import REPO


ROOT = REPO
SEEDS = ROOT / "data" / "seed_tasks.jsonl"


# ---- a scripted OpenAI-compatible endpoint ------------------------------------------------------

class Stub:
    """Replies to POST /v1/chat/completions from `script(n, body) -> (status, text, finish_reason)`."""

    def __init__(self, script, delay=0.0):
        self.script, self.delay, self.calls, self.bodies = script, delay, 0, []
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with stub.lock:
                    n = stub.calls
                    stub.calls += 1
                    stub.bodies.append(body)
                    stub.in_flight += 1
                    stub.max_in_flight = max(stub.max_in_flight, stub.in_flight)
                time.sleep(stub.delay)
                with stub.lock:
                    stub.in_flight -= 1
                status, text, finish = stub.script(n, body)
                if status == 200:
                    payload = {"id": f"chatcmpl-{n}", "object": "chat.completion", "created": 0,
                               "model": body["model"], "choices": [{"index": 0, "finish_reason": finish,
                                                                    "message": {"role": "assistant", "content": text}}],
                               "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
                else:
                    payload = {"error": {"message": text, "type": "server_error", "param": None, "code": None}}
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub():
    made = []

    def make(script, delay=0.0):
        made.append(Stub(script, delay))
        return made[-1]
    yield make
    for s in made:
        s.close()


def numbered(tasks, start=4):
    return "".join(f"###\n{start + i}. Instruction: {t[0]}\n{start + i}. Input:\n{t[1] or '<noinput>'}\n"
                   f"{start + i}. Output:\n{t[2]}\n" for i, t in enumerate(tasks))


def unique_tasks(n, k=2):
    # words unique to request n: ROUGE-L between any two of these is 1/5, far below 0.7
    return numbered([(f"Name w{n}x{j}a w{n}x{j}b w{n}x{j}c w{n}x{j}d.", "", f"answer {n} {j}") for j in range(k)])


def config(tmp_path, url, **kw):
    return Config(**{"seed_tasks": str(SEEDS), "out": str(tmp_path / "gen.jsonl"), "num": 4, "endpoint": url,
                     "model": "stub", "batch": 2, "backoff": 0.01, "log": open(os.devnull, "w"), **kw})


# ---- parsing and filters --------------------------------------------------------------------

def test_parse_numbered_reply():
    reply = (numbered([("Give two synonyms for happy.", "", "Joyful, glad."),
                       ("Sort these letters alphabetically.", "c, a, b", "a, b, c")])
             + "###\n6. Instruction: a task with no input or output\n###\n7. Instruction: Cut off by the\n7. Input:\n")
    tasks, bad = parse_reply(reply, "length")
    assert tasks == [{"instruction": "Give two synonyms for happy.", "input": "", "output": "Joyful, glad."},
                     {"instruction": "Sort these letters alphabetically.", "input": "c, a, b", "output": "a, b, c"}]
    assert bad == {"malformed": 1, "truncated": 1}
    # without ### separators and with a multi-line output; the last one kept when not cut off
    reply = ("1. Instruction: List two rivers.\n1. Input: <noinput>\n1. Output:\nJordan\nNile\n"
             "2. Instruction: Add the numbers.\n2. Input:\n2, 3\n2. Output: 5")
    tasks, bad = parse_reply(reply, "stop")
    assert [t["output"] for t in tasks] == ["Jordan\nNile", "5"] and tasks[1]["input"] == "2, 3" and not bad


@pytest.mark.parametrize("instruction,output,reason", [
    ("Say it now.", "x", "too_short"),
    (" ".join(["word"] * 151), "x", "too_long"),
    ("Draw a cat sitting on a mat.", "x", "forbidden_keyword"),
    ("Describe the map of this city.", "x", "forbidden_keyword"),
    ("Please go to the market and buy bread.", "x", "forbidden_keyword"),
    ("Write a program that prints numbers.", "x", "program"),
    ("- List three kinds of trees.", "x", "starts_with_punctuation"),
    ("Écrivez une phrase sur la mer.", "x", "non_english"),
    ("Напишите короткое стихотворение о море.", "x", "non_english"),
    ("Name three kinds of trees.", "  ", "empty_output"),
    ("Explain the mapping from keys to values.", "x", None),  # "mapping" is not the word "map"
    ("Give three tips for staying healthy.", "Sleep, eat well, walk.", None),
])
def test_each_filter_rule(instruction, output, reason):
    assert discard_reason({"instruction": instruction, "input": "", "output": output}) == reason


def test_rouge_l_dedup_matches_rouge_score():
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    d = Deduplicator()
    d.add("Give three tips for staying healthy.")
    near, far = "Give three tips for staying healthy and fit.", "List the capitals of four European countries."
    assert scorer.score(d.kept[0], near)["rougeL"].fmeasure >= 0.7  # 6 of 6 vs 8 tokens: F = 0.857
    assert d.is_duplicate(near) and not d.is_duplicate(far)
    assert d.most_similar(near) == pytest.approx(2 * 6 / (6 + 8))


# ---- runs against the stub ------------------------------------------------------------------

def test_run_filters_dedups_and_reports(tmp_path, stub):
    first = numbered([
        ("Name the longest river in Egypt.", "", "The Nile"),  # kept
        ("Draw a picture of a lion.", "", "..."),  # forbidden keyword
        ("Which book of the Bible is this verse from?", "In the beginning...", "Genesis"),  # = a seed task
        ("Name the longest river in all of Egypt.", "", "The Nile"),  # near-duplicate of the first
        ("Do it.", "", "ok"),  # too short
    ])
    second = numbered([("Count the letters in the name given.", "bread", "5"),
                       ("Reverse these three numbers please.", "1, 2, 3", "3, 2, 1"),
                       ("Name a city that lies near the sea.", "", "Joppa"),
                       ("Give one word that rhymes with light.", "", "night")])
    replies = {0: first, 1: "I cannot help with that."}
    s = stub(lambda n, body: (200, replies.get(n, second), "stop"))
    report = run(config(tmp_path, s.url, num=4, batch=2))
    # round 1 (2 requests): `first` keeps 1 (the seed copy and the near-copy are ROUGE duplicates), the
    # refusal is malformed; round 2: request 2 keeps 3 of `second` (the 4th is over the target), request 3
    # repeats `second` (3 ROUGE duplicates, 1 over the target)
    assert report["requested"] == 4 and report["kept"] == 4 and report["complete"]
    assert report["parsed"] == 5 + 4 + 4
    assert report["discarded"] == {"forbidden_keyword": 1, "rouge_duplicate": 5, "too_short": 1, "malformed": 1,
                                   "over_target": 2}
    kept = [json.loads(line) for line in (tmp_path / "gen.jsonl").read_text().splitlines()]
    assert [r["instruction"] for r in kept] == ["Name the longest river in Egypt.", "Count the letters in the name given.",
                                                 "Reverse these three numbers please.",
                                                 "Name a city that lies near the sea."]
    assert kept[1] == {"instruction": "Count the letters in the name given.", "input": "bread", "output": "5"}
    # each prompt shows seed tasks in the numbered layout and asks for the list
    prompt = s.bodies[0]["messages"][0]["content"]
    assert "1. Instruction:" in prompt and "List of 20 tasks:" in prompt and s.bodies[0]["model"] == "stub"


def test_retries_on_429_and_500(tmp_path, stub):
    script = {0: (429, "slow down", "stop"), 1: (500, "boom", "stop")}
    s = stub(lambda n, body: script.get(n, (200, unique_tasks(n, 3), "stop")))
    report = run(config(tmp_path, s.url, num=3, batch=1))
    assert report["retries"] == 2 and report["kept"] == 3 and report["requested"] == 1
    assert s.calls == 3


def test_requests_are_concurrent_up_to_batch(tmp_path, stub):
    s = stub(lambda n, body: (200, unique_tasks(n, 1), "stop"), delay=0.5)
    report = run(config(tmp_path, s.url, num=6, batch=3))
    assert report["requested"] == 6 and report["kept"] == 6
    assert s.max_in_flight == 3  # three at a time, never more


def test_client_errors_are_one_line(tmp_path, stub, capsys):
    s = stub(lambda n, body: (404, "model 'nope' not found", "stop"))
    rc = main(["self-instruct", "--seed-tasks", str(SEEDS), "--out", str(tmp_path / "o.jsonl"), "--num", "2",
               "--endpoint", s.url, "--model", "nope", "--batch", "1"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "HTTP 404" in err and "not found" in err
    assert s.calls == 1  # a 404 is not retried


def test_existing_output_without_state_is_not_overwritten(tmp_path, stub):
    out = tmp_path / "gen.jsonl"
    out.write_text("my precious data\n")
    s = stub(lambda n, body: (200, unique_tasks(n), "stop"))
    with pytest.raises(FileExistsError, match="not overwriting"):
        run(config(tmp_path, s.url))
    assert out.read_text() == "my precious data\n"


def test_unfinished_round_is_cut_on_resume(tmp_path, stub):
    s = stub(lambda n, body: (200, unique_tasks(n), "stop"))
    run(config(tmp_path, s.url, num=4, batch=1))
    out = tmp_path / "gen.jsonl"
    committed = out.read_bytes()
    with open(out, "a") as f:  # a kill between appending a round and committing it
        f.write('{"instruction": "Name w99x0a w99x0b w99x0c w99x0d.", "input": "", "output": "x"}\n{"instr')
    report = run(config(tmp_path, s.url, num=6, batch=1))
    text = out.read_bytes()
    assert text.startswith(committed) and report["kept"] == 6
    records = [json.loads(line) for line in text.decode().splitlines()]
    assert len({r["instruction"] for r in records}) == 6 and not any("w99" in r["instruction"] for r in records)


@pytest.mark.slow
def test_resume_after_sigkill(tmp_path, stub):
    s = stub(lambda n, body: (200, unique_tasks(n), "stop"), delay=0.3)
    out, sp = tmp_path / "gen.jsonl", state_path(tmp_path / "gen.jsonl")
    cmd = [sys.executable, "-m", "annotated_llama", "self-instruct", "--seed-tasks", str(SEEDS), "--out", str(out),
           "--num", "16", "--endpoint", s.url, "--model", "stub", "--batch", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if sp.exists() and json.loads(sp.read_text())["requests"] >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = json.loads(sp.read_text())
    assert 2 <= state["requests"] and state["kept"] < 16  # killed mid-run
    committed = out.read_bytes()[: state["bytes"]]
    s.delay = 0.0
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["kept"] == 16 and report["complete"]
    text = out.read_bytes()
    assert text.startswith(committed)  # nothing committed before the kill was lost
    records = [json.loads(line) for line in text.decode().splitlines()]
    assert len(records) == 16 and len({r["instruction"] for r in records}) == 16  # and nothing twice


def test_records_load_in_finetune(tmp_path, stub, base_dir):  # noqa: F811
    s = stub(lambda n, body: (200, unique_tasks(n, 3), "stop"))
    run(config(tmp_path, s.url, num=5))
    rc = main(["finetune", "--model", str(base_dir), "--data", str(tmp_path / "gen.jsonl"), "--out",
               str(tmp_path / "ft"), "--lora", "--max-steps", "1", "--batch-size", "2"])
    assert rc == 0 and (tmp_path / "ft" / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_against_our_own_server(tmp_path, tiny_tokenizer_path):  # noqa: F811
    import socket
    import urllib.request

    from annotated_llama import ModelArgs, Tokenizer, Transformer
    from annotated_llama.weights import save_model

    tok = Tokenizer(tiny_tokenizer_path)
    torch.manual_seed(0)
    model_dir = tmp_path / "model"
    save_model(Transformer(ModelArgs.from_name("tiny", vocab_size=tok.n_words, max_seq_len=4096)), tok, model_dir,
               format="ours")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "annotated_llama", "serve", "--model", str(model_dir), "--port",
                               str(port)], env={**os.environ, "OMP_NUM_THREADS": "1"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "serve did not start"
                time.sleep(0.2)
        report = run(config(tmp_path, f"http://127.0.0.1:{port}/v1", model="model", num=3, batch=2, max_requests=4,
                            max_tokens=48))
    finally:
        server.terminate()
        server.wait(30)
    # a random-weight model's replies are nonsense: the run ends at max_requests and accounts for everything
    assert report["requested"] == 4 and not report["complete"]
    assert report["parsed"] == report["kept"] + sum(v for k, v in report["discarded"].items()
                                                    if k not in ("malformed", "truncated"))
    assert sum(report["discarded"].values()) >= 1


def test_fit_prompt_drops_examples_then_shortens_the_head():
    from annotated_llama.data.self_instruct import load_seed_tasks
    from annotated_llama.data.self_instruct_prompt import MIN_REPLY, encode_prompt, fit_prompt

    seeds = load_seed_tasks(SEEDS)[:3]
    words = lambda text: len(text.split())  # noqa: E731  (a stand-in token count)
    full = words(encode_prompt(seeds, 20)[0])
    assert fit_prompt(seeds, 20, full + 500, 1024, words)[2] == 500  # all fit: max_tokens cut to the room
    prompt, lead, room = fit_prompt(seeds, 20, full + MIN_REPLY - 1, 1024, words)  # one example too many
    assert prompt == encode_prompt(seeds[:2], 20)[0] and lead.startswith("###\n3.")
    short = words(encode_prompt(seeds[:1], 20, short=True)[0])
    prompt, _, room = fit_prompt(seeds, 20, short + 40, 1024, words)
    assert prompt == encode_prompt(seeds[:1], 20, short=True)[0] and room == 40
    with pytest.raises(ValueError, match="context of 30 tokens"):
        fit_prompt(seeds, 20, 30, 1024, words)


@pytest.mark.slow
def test_against_our_server_on_the_default_model(tmp_path):
    """The default model's context is 256 tokens, less than the full prompt: the run fits each
    prompt (no HTTP 400) and every request it makes is answered."""
    import logging

    from annotated_llama.cli.serve import run_in_thread
    from annotated_llama.default_model import default_model_dir
    from annotated_llama.serving.server import create_app
    from annotated_llama.weights import load_model

    model, tok = load_model(default_model_dir())
    assert model.params.max_seq_len == 256
    seen = []

    class Collect(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())
    handler = Collect()
    logging.getLogger("annotated_llama.server").addHandler(handler)
    logging.getLogger("annotated_llama.server").setLevel(logging.INFO)
    try:
        with run_in_thread(create_app(model.eval(), tok, model_name="default", max_batch_size=2)) as url:
            report = run(config(tmp_path, url + "/v1", model="default", num=3, batch=2, max_requests=4))
    finally:
        logging.getLogger("annotated_llama.server").removeHandler(handler)
    assert report["requested"] == 4  # every request answered (an HTTP 400 would have raised EndpointError)
    chats = [line for line in seen if line.startswith("POST /v1/chat/completions")]
    assert len(chats) == 4 and all(" 200 " in line for line in chats), chats
    for line in chats:  # prompt + reply within the 256 tokens
        p, c = (int(line.split(f"{k}=")[1].split()[0]) for k in ("prompt_tokens", "completion_tokens"))
        assert p + c <= 256 and c > 0
