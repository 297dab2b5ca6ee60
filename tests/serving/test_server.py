"""The OpenAI-compatible server, driven by the official `openai` client against a real uvicorn
server on 127.0.0.1: shapes, streaming == non-streaming, greedy parity with an independent
no-cache greedy loop and with `Llama.text_completion`, 16 concurrent clients decoded in shared
batches, and a client that disconnects mid-stream freeing its slot."""

from __future__ import annotations

import concurrent.futures
import logging
import time

import httpx
import openai
import pytest

from annotated_llama import Tokenizer, Transformer
from annotated_llama.cli.serve import run_in_thread
from annotated_llama.serving.server import create_app

import fixtures

TINY = dict(n_kv_heads=2, max_seq_len=192)
PROMPTS = ["The capital of France is", "Once upon a time", "1 2 3 4", "def main():", "In the beginning",
           "Hello, my name is", "The quick brown fox", "To be or not to be", "Water boils at", "Dear Sir,",
           "Il était une fois", "SELECT * FROM", "Roses are red", "The answer is", "A B C", "Why is the sky"]


def tiny_model(seed: int = 0) -> Transformer:
    return fixtures.tiny_model(seed, **TINY)


def greedy_reference(model, tokenizer, prompt: str, n: int) -> str:
    return fixtures.greedy_text(model, tokenizer, tokenizer.encode(prompt, bos=True, eos=False), n)


@pytest.fixture(scope="module")
def tokenizer(spm_path):
    return Tokenizer(spm_path)


@pytest.fixture(scope="module")
def served(tokenizer):
    """(base_url, app, model): the module's server, a tiny random model, batches of up to 8."""
    model = tiny_model()
    app = create_app(model, tokenizer, model_name="tiny", max_batch_size=8, step_delay=0.002)
    with run_in_thread(app) as url:
        yield url, app, model


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


_http = httpx.Client(timeout=10)  # one client: a new one per call costs ~60 ms (TLS setup)


def stats(url):
    return _http.get(url + "/health").json()["scheduler"]


def test_models_and_health(served, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    health = httpx.get(served[0] + "/health").json()
    assert health["status"] == "ok" and health["n_ctx"] == TINY["max_seq_len"] and health["scheduler"]["thread_alive"]
    # the server's default backend ("auto") builds the compiled step in the background, serving meanwhile
    assert health["decode"] in ("compiling", "compiled") and health["scheduler"]["compile_error"] is None
    assert "annotated_llama_steps" in httpx.get(served[0] + "/metrics").text


def test_completion_greedy_equals_reference_loop(served, client, tokenizer, caplog):
    _, _, model = served
    caplog.set_level(logging.INFO, logger="annotated_llama.server")
    r = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=12, temperature=0)
    assert r.object == "text_completion" and r.choices[0].finish_reason == "length"
    assert r.choices[0].text == greedy_reference(model, tokenizer, PROMPTS[0], 12)
    n_prompt = len(tokenizer.encode(PROMPTS[0], bos=True, eos=False))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (n_prompt, 12, n_prompt + 12)
    lines = [rec.getMessage() for rec in caplog.records if "/v1/completions" in rec.getMessage()]
    assert any(f"200 prompt_tokens={n_prompt} completion_tokens=12" in line for line in lines), lines


def test_greedy_equals_llama_text_completion(served, client, tokenizer):
    from annotated_llama.inference.generation import Llama
    _, _, model = served
    llama = Llama(tiny_model(), tokenizer)  # same weights, its own cache
    want = llama.text_completion([PROMPTS[1]], temperature=0, max_gen_len=10)[0]["generation"]
    got = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=10, temperature=0)
    assert got.choices[0].text == want


def test_chat_completion_and_stream_concatenate(served, client):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    full = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=14, temperature=0.9, seed=1234)
    assert full.object == "chat.completion" and full.choices[0].message.role == "assistant"
    assert full.choices[0].finish_reason in ("stop", "length") and full.usage.completion_tokens > 0
    again = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=14, temperature=0.9, seed=1234)
    assert again.choices[0].message.content == full.choices[0].message.content  # the seed is honoured
    other = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=14, temperature=0.9, seed=99)
    assert other.choices[0].message.content != full.choices[0].message.content

    chunks = list(client.chat.completions.create(model="tiny", messages=msgs, max_tokens=14, temperature=0.9,
                                                 seed=1234, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # really streamed
    assert text == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_completion_stream_and_stop_string(served, client, tokenizer):
    _, _, model = served
    full = greedy_reference(model, tokenizer, PROMPTS[2], 16)
    stop = full[len(full) // 2: len(full) // 2 + 3]  # a stop string from the middle of the answer
    assert stop.strip()
    want = full[:full.index(stop)]
    r = client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=16, temperature=0, stop=[stop])
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
    pieces = [c.choices[0].text for c in client.completions.create(
        model="tiny", prompt=PROMPTS[2], max_tokens=16, temperature=0, stop=[stop], stream=True)]
    assert "".join(pieces) == want and not any(stop in p for p in pieces)


def test_raw_sse_framing_ends_with_done(served):
    body = {"prompt": "Hi", "max_tokens": 3, "temperature": 0, "stream": True}
    with httpx.stream("POST", served[0] + "/v1/completions", json=body, timeout=30) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


@pytest.mark.slow  # 16 no-cache reference decodes + 16 concurrent requests
def test_sixteen_concurrent_clients_share_batches(served, client, tokenizer):
    url, _, model = served
    solo = {p: greedy_reference(model, tokenizer, p, 16) for p in PROMPTS}
    before = stats(url)

    def ask(prompt):  # the client is thread-safe; each call is its own HTTP connection from the pool
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=0,
                                      extra_body={"ignore_eos": True})
        return r.choices[0].text, r.usage.completion_tokens

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = dict(zip(PROMPTS, pool.map(ask, PROMPTS)))
    after = stats(url)
    for p in PROMPTS:
        assert answers[p] == (solo[p], 16), p
    steps, rows = after["steps"] - before["steps"], after["batch_rows"] - before["batch_rows"]
    assert rows == 16 * 15  # each request's first token comes from its prefill, the other 15 from decode steps
    assert after["max_batch_seen"] >= 4 and rows / steps >= 2.0, (steps, rows)
    assert steps < 16 * 15 / 2  # far fewer forwards than one request at a time would need
    assert after["active"] == 0 and after["waiting"] == 0


def test_disconnect_mid_stream_frees_slot(tokenizer):
    model = tiny_model()
    app = create_app(model, tokenizer, max_batch_size=2, step_delay=0.05)
    with run_in_thread(app) as url:
        body = {"prompt": "Tell me a long story", "max_tokens": 150, "temperature": 0, "ignore_eos": True,
                "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            got = [next(lines) for _ in range(6)]
            assert stats(url)["active"] == 1
        closed_at = stats(url)["steps"]  # the client has hung up
        assert any(line.startswith("data: {") for line in got)
        deadline = time.monotonic() + 10
        while stats(url)["active"] and time.monotonic() < deadline:
            time.sleep(0.01)
        s = stats(url)
        assert s["active"] == 0 and s["cancelled"] == 1 and s["completed"] == 0
        assert s["steps"] - closed_at <= 10, s  # freed within a few decode steps, far before its 150 tokens

        # a non-streamed request whose client gives up: the handler notices (it polls every 0.5 s)
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/completions", json={**body, "stream": False}, timeout=0.3)
        deadline = time.monotonic() + 10
        while stats(url)["cancelled"] < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        s = stats(url)
        assert s["active"] == 0 and s["cancelled"] == 2 and s["completed"] == 0, s


def test_cli_serve_help_and_bad_model(capsys):
    from annotated_llama.__main__ import main
    with pytest.raises(SystemExit) as e:
        main(["serve", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "--api-key" in out and "127.0.0.1" in out and "--max-batch-size" in out
    assert main(["serve", "--model", "/nonexistent/model"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("annotated-llama serve: error:") and "/nonexistent/model" in err
    assert len(err.splitlines()) == 1
    assert main(["serve", "--max-batch-size", "0"]) == 2
    assert "--max-batch-size must be positive" in capsys.readouterr().err


def test_chat_templates_match_raw_prompts(served, client):
    from annotated_llama.core.chat_format import format_alpaca
    q = "List three fruits."
    for template, raw in (("alpaca", format_alpaca(q)), ("none", q)):
        chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": q}], max_tokens=8,
                                              temperature=0, extra_body={"template": template})
        comp = client.completions.create(model="tiny", prompt=raw, max_tokens=8, temperature=0)
        # a chat answer starts at its first non-space, as Meta's chat_completion strips it
        assert chat.choices[0].message.content == comp.choices[0].text.lstrip(), template
        assert chat.usage.prompt_tokens == comp.usage.prompt_tokens


def test_chat_greedy_equals_llama_chat_completion(served, client, tokenizer):
    from annotated_llama.inference.generation import Llama
    dialog = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    for template in ("llama-2", "alpaca"):
        want = Llama(tiny_model(), tokenizer).chat_completion([dialog], temperature=0, max_gen_len=10,
                                                              template=template)[0]["generation"]["content"]
        got = client.chat.completions.create(model="tiny", messages=dialog, max_tokens=10, temperature=0,
                                             extra_body={"template": template})
        assert got.choices[0].message.content.rstrip() == want, template


def test_kv_budget_limits_the_batch(tokenizer):
    from annotated_llama.serving.scheduler import SamplingParams, Scheduler
    model = tiny_model()
    prompts = [tokenizer.encode(p, bos=True, eos=False) for p in PROMPTS[:4]]
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    worst = max(len(p) for p in prompts) + params.max_tokens
    s = Scheduler(model, tokenizer, max_batch_size=4, kv_budget=2 * worst)  # room for two at a time
    with pytest.raises(ValueError, match="KV budget"):
        s.submit([1] * (2 * worst), params, lambda ev: None)
    done = concurrent.futures.ThreadPoolExecutor(4)
    answers = list(done.map(lambda p: s.generate(p, params).text, prompts))
    done.shutdown()
    s.stop()
    assert answers == [greedy_reference(model, tokenizer, p, 6) for p in PROMPTS[:4]]
    assert s.stats()["max_batch_seen"] == 2 and s.stats()["completed"] == 4


@pytest.mark.slow  # the first meta-device model build imports torch's prims (seconds on a busy box)
def test_cli_serve_loads_a_checkpoint_dir(tmp_path, tokenizer, spm_path, monkeypatch):
    # `serve --model DIR` binds its port, then loads our checkpoint format in the background;
    # serve_app (uvicorn) is replaced by a TestClient on the same app, so no request is sent over the port.
    import json
    import shutil

    from fastapi.testclient import TestClient
    from safetensors.torch import save_file

    from annotated_llama.__main__ import main
    from annotated_llama.cli import serve
    model = tiny_model()
    (tmp_path / "params.json").write_text(json.dumps(model.params.to_params_json()))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "model.safetensors")
    shutil.copy(spm_path, tmp_path / "tokenizer.model")
    seen = {}

    def fake_serve(app, sock, args, stop_when=None):
        seen["bound"] = sock.getsockname()
        sock.close()
        with TestClient(app, base_url="http://127.0.0.1") as c:
            seen["loading"] = c.get("/health").json()["status"]  # at once: still loading, or (rarely) done
            deadline = time.monotonic() + 60
            while c.get("/health").status_code != 200:
                assert time.monotonic() < deadline and not (stop_when and stop_when())
                time.sleep(0.05)
            seen["models"] = c.get("/v1/models", headers={"Authorization": "Bearer k"}).json()
            seen["noauth"] = c.get("/v1/models").status_code
            seen["text"] = c.post("/v1/completions", headers={"Authorization": "Bearer k"}, json={
                "prompt": PROMPTS[3], "max_tokens": 5, "temperature": 0}).json()["choices"][0]["text"]
            seen["page"] = c.get("/").text
            seen["rebinding"] = c.get("/health", headers={"Host": "attacker.example:8123"}).status_code
    monkeypatch.setattr(serve, "serve_app", fake_serve)
    assert main(["serve", "--model", str(tmp_path), "--api-key", "k", "--port", "0"]) == 0
    assert seen["bound"][0] == "127.0.0.1" and seen["bound"][1] > 0 and seen["noauth"] == 401
    assert seen["loading"] in ("loading", "ok")
    assert seen["models"]["data"][0]["id"] == tmp_path.name
    assert seen["text"] == greedy_reference(model, tokenizer, PROMPTS[3], 5)
    assert '<label for="prompt">' in seen["page"]
    assert seen["rebinding"] == 403  # serve allows localhost names and IP addresses only


def test_chunked_prefill_and_repetition_penalty_match_references(tokenizer, monkeypatch):
    from annotated_llama.serving import scheduler as sched
    from annotated_llama.inference.generation import Llama
    model = tiny_model()
    prompt = "The history of the world in a few words"
    ids = tokenizer.encode(prompt, bos=True, eos=False)
    assert len(ids) > 8
    s = sched.Scheduler(model, tokenizer, max_batch_size=2)
    s.engine.prefill_chunk = 4  # a 13-token prompt in 4 forwards
    s.start()
    try:
        plain = s.generate(ids, sched.SamplingParams(max_tokens=8, temperature=0)).text
        penalized = s.generate(ids, sched.SamplingParams(max_tokens=8, temperature=0, repetition_penalty=0.2)).text
    finally:
        s.stop()
    assert plain == greedy_reference(model, tokenizer, prompt, 8)
    want = Llama(tiny_model(), tokenizer).text_completion([prompt], temperature=0, max_gen_len=8,
                                                         repetition_penalty=0.2)[0]["generation"]
    assert penalized == want and penalized != plain  # penalty < 1 favours the prompt's tokens: it must show


def test_create_app_accepts_a_llama_and_rejects_bad_settings(tokenizer):
    from fastapi.testclient import TestClient

    from annotated_llama.inference.generation import Llama
    model = tiny_model()
    with TestClient(create_app(Llama(model, tokenizer), model_name="from-llama")) as c:
        r = c.post("/v1/completions", json={"prompt": PROMPTS[4], "max_tokens": 4, "temperature": 0})
    assert r.json()["choices"][0]["text"] == greedy_reference(model, tokenizer, PROMPTS[4], 4)
    with pytest.raises(ValueError, match="tokenizer"):
        create_app(model)
    with pytest.raises(ValueError, match="template"):
        create_app(model, tokenizer, template="chatml")


def test_a_failing_request_does_not_stop_the_server(tokenizer):
    from fastapi.testclient import TestClient

    class Flaky(Transformer):  # the same weights as tiny_model(); fails on one token id
        def step(self, tokens, *args, **kw):
            if (tokens == 31999).any():
                raise RuntimeError("boom")
            return super().step(tokens, *args, **kw)
    model = fixtures.tiny_model(0, cls=Flaky, **TINY)
    with TestClient(create_app(model, tokenizer)) as c:
        bad = c.post("/v1/completions", json={"prompt": [1, 31999], "max_tokens": 3})
        good = c.post("/v1/completions", json={"prompt": PROMPTS[5], "max_tokens": 5, "temperature": 0})
        health = c.get("/health").json()
    assert bad.status_code == 500 and "RuntimeError: boom" in bad.json()["error"]["message"]
    assert good.status_code == 200
    assert good.json()["choices"][0]["text"] == greedy_reference(model, tokenizer, PROMPTS[5], 5)
    assert health["status"] == "ok" and health["scheduler"]["failures"] == 1
