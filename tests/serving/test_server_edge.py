"""The server's edge, against real uvicorn servers on 127.0.0.1: half-open sockets closed within the
header and body timeouts, a flood of silent sockets that cannot lock a real client out, the
Host/Origin allow-list (DNS rebinding, cross-origin POSTs, CORS only when asked), /health while the
model loads and after a load fails, `serve`'s bad flags as one line, /metrics parsed as Prometheus
text, /tokenize and /detokenize against the tokenizer, /openapi.json with the real models, and a
handler's exception answered as a 500 error object on a connection that stays open."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest

from annotated_llama import Tokenizer
from annotated_llama.cli.serve import run_in_thread
from annotated_llama.serving.server import create_app

from fixtures import RawHTTP, tiny_model

N_CTX = 96


@pytest.fixture(scope="module")
def tokenizer(spm_path):
    return Tokenizer(spm_path)


@pytest.fixture(scope="module")
def guarded(tokenizer):
    """A server with short timeouts, 8 connections at most, and serve's Host allow-list."""
    app = create_app(tiny_model(max_seq_len=N_CTX), tokenizer, model_name="tiny", allowed_hosts=(),
                     allowed_origins=["https://app.example"])
    with run_in_thread(app, header_timeout=1.0, body_timeout=1.5, max_connections=8) as url:
        yield url


def connect(url) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def seconds_until_closed(sock, send=b"") -> float:
    t0 = time.monotonic()
    if send:
        sock.sendall(send)
    while True:
        if sock.recv(1 << 16) == b"":
            return time.monotonic() - t0


@pytest.mark.parametrize("name,send,limit", [
    ("silent", b"", 1.0),
    ("half-a-request-line", b"POST /v1/completi", 1.0),
    ("headers-never-end", b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n", 1.0),
    ("body-stalls", b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 100\r\n\r\n{\"prompt\": ", 1.5),
])
def test_half_open_sockets_are_closed_within_the_timeout(guarded, name, send, limit):
    sock = connect(guarded)
    try:
        took = seconds_until_closed(sock, send)
    finally:
        sock.close()
    assert limit * 0.8 <= took <= limit + 2.0, (name, took)  # closed by the timer, not at once, not never


def test_idle_keep_alive_then_slow_headers(guarded):
    """A kept-alive connection that starts a second request and stalls is closed by the header timer."""
    sock = connect(guarded)
    try:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert sock.recv(1 << 16).startswith(b"HTTP/1.1 200")
        took = seconds_until_closed(sock, b"GET /health HTTP/1.1\r\nHo")
        assert took <= 3.0
    finally:
        sock.close()


def test_a_flood_of_silent_sockets_cannot_lock_out_a_client(guarded):
    flood = [connect(guarded) for _ in range(40)]  # 5x the cap of 8
    try:
        time.sleep(0.3)
        t0 = time.monotonic()
        r = httpx.get(guarded + "/health", timeout=5)  # a new connection: the longest-silent one makes room
        assert r.status_code == 200 and time.monotonic() - t0 < 0.9  # well before any header timeout
        closed = 0
        for s in flood:
            s.settimeout(0.01)
            try:
                closed += s.recv(1) == b""
            except (socket.timeout, ConnectionResetError):
                pass
        assert closed >= 40 - 8  # all but the cap were closed to make room
    finally:
        for s in flood:
            s.close()


def test_host_allow_list_refuses_dns_rebinding(guarded):
    port = guarded.rsplit(":", 1)[1]
    ok = {"127.0.0.1:" + port, "localhost:" + port, "LOCALHOST", "api.localhost:" + port, "[::1]:" + port,
          "10.0.0.7:" + port}
    for host in sorted(ok):
        r = httpx.get(guarded + "/health", headers={"Host": host})
        assert r.status_code == 200, host
    for host in ("attacker.example:" + port, "localhost.attacker.example", "127.0.0.1.nip.io:" + port):
        r = httpx.post(guarded + "/v1/completions", headers={"Host": host}, json={"prompt": "hi", "max_tokens": 1})
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden_host", host
        assert "--allow-host" in r.json()["error"]["message"]


def test_foreign_origin_refused_own_and_allowed_origins_served(guarded):
    body = {"prompt": "hi", "max_tokens": 1}
    # a simple cross-origin POST (text/plain needs no preflight): refused before it reaches the model
    r = httpx.post(guarded + "/v1/completions", headers={"Origin": "http://evil.example", "Content-Type": "text/plain"},
                   content=json.dumps(body))
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden_origin"
    assert "access-control-allow-origin" not in r.headers
    r = httpx.post(guarded + "/v1/completions", headers={"Origin": "null"}, json=body)  # sandboxed frames, file://
    assert r.status_code == 403
    r = httpx.post(guarded + "/v1/completions", headers={"Origin": guarded}, json=body)  # the chat page itself
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers  # same origin: no CORS needed
    r = httpx.post(guarded + "/v1/completions", headers={"Origin": "https://app.example"}, json=body)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
    pre = httpx.options(guarded + "/v1/chat/completions", headers={
        "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "https://app.example"
    pre = httpx.options(guarded + "/v1/chat/completions", headers={
        "Origin": "https://other.example", "Access-Control-Request-Method": "POST"})
    assert pre.status_code == 403


def test_cors_off_by_default(tokenizer):
    with run_in_thread(create_app(tiny_model(max_seq_len=N_CTX), tokenizer)) as url:
        r = httpx.get(url + "/health", headers={"Origin": "https://app.example"})
        assert r.status_code == 403 and "access-control-allow-origin" not in r.headers
        assert httpx.get(url + "/health", headers={"Host": "anything.example"}).status_code == 200  # library default


def test_health_is_503_while_loading_then_200(tokenizer):
    release = threading.Event()

    def loader():
        release.wait(30)
        return tiny_model(max_seq_len=N_CTX), tokenizer
    with run_in_thread(create_app(loader=loader, model_name="late")) as url:
        r = httpx.get(url + "/health")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        r = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading" and r.headers["retry-after"]
        assert httpx.get(url + "/metrics").status_code == 200  # scrapes work while loading
        release.set()
        deadline = time.monotonic() + 30
        while httpx.get(url + "/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        r = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert r.status_code == 200 and r.json()["model"] == "late"


def test_health_reports_a_failed_load(tokenizer):
    errors = []

    def loader():
        raise ValueError("/models/x: params.json is missing")
    with run_in_thread(create_app(loader=loader, on_load_error=errors.append)) as url:
        deadline = time.monotonic() + 10
        while not errors:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        h = httpx.get(url + "/health")
        assert h.status_code == 503 and h.json()["status"] == "error" and "params.json" in h.json()["error"]
        r = httpx.post(url + "/v1/completions", json={"prompt": "hi"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_load_failed"
    assert errors == ["/models/x: params.json is missing"]


@pytest.mark.parametrize("argv,needle", [
    (["--port", "99999"], "--port must be in 0..65535, got 99999"),
    (["--port", "-1"], "--port must be in 0..65535"),
    (["--max-connections", "0"], "--max-connections must be positive"),
    (["--kv-budget", "-5"], "--kv-budget must be positive"),
    (["--header-timeout", "nan"], "--header-timeout must be a positive number"),
    (["--body-timeout", "inf"], "--body-timeout must be a positive number"),
    (["--host", "no-such-host.invalid"], "--host no-such-host.invalid --port"),
    (["--tokenizer", "/nonexistent/tok.model"], "--tokenizer /nonexistent/tok.model: no such file"),
])
def test_serve_bad_flags_are_one_line(argv, needle, capsys):
    from annotated_llama.__main__ import main
    assert main(["serve", *argv]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


def test_serve_port_in_use_is_one_line(capsys):
    from annotated_llama.__main__ import main
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"--port {port}: cannot listen there" in err and len(err.strip().splitlines()) == 1, err


@pytest.fixture(scope="module")
def plain(tokenizer):
    app = create_app(tiny_model(max_seq_len=N_CTX), tokenizer, model_name="tiny", max_batch_size=2)
    with run_in_thread(app) as url:
        yield url, app


def test_metrics_are_prometheus_text(plain):
    from prometheus_client.parser import text_string_to_metric_families
    url, _ = plain
    for _ in range(2):
        assert httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 3, "ignore_eos": True,
                                                         "temperature": 0}).status_code == 200
    httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": -1})  # a 400 is counted too
    r = httpx.get(url + "/metrics")
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert samples[("annotated_llama_http_requests_total", (("route", "/v1/completions"), ("status", "200")))] == 2
    assert samples[("annotated_llama_http_requests_total", (("route", "/v1/completions"), ("status", "400")))] == 1
    n_prompt = 2  # BOS + "hi"
    assert samples[("annotated_llama_prompt_tokens_total", ())] == 2 * n_prompt
    assert samples[("annotated_llama_generation_tokens_total", ())] == 2 * 3
    assert samples[("annotated_llama_time_to_first_token_seconds_count", ())] == 2
    assert samples[("annotated_llama_time_per_output_token_seconds_count", ())] == 2
    for gauge in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_ratio", "kv_cache_budget_tokens"):
        assert ("annotated_llama_" + gauge, ()) in samples, gauge
    assert samples[("annotated_llama_kv_cache_budget_tokens", ())] == 2 * N_CTX
    assert samples[("annotated_llama_steps_total", ())] >= 4  # 2 requests x (3 tokens - 1 from the prefill)


def test_tokenize_and_detokenize_match_the_tokenizer(plain, tokenizer):
    from annotated_llama.core.chat_format import encode_dialog
    url, _ = plain
    text = "Hello, wörld! 1234"
    r = httpx.post(url + "/tokenize", json={"prompt": text, "return_token_strs": True}).json()
    want = tokenizer.encode(text, bos=True, eos=False)
    assert r["tokens"] == want and r["count"] == len(want) and r["max_model_len"] == N_CTX
    assert r["token_strs"] == [tokenizer.id_to_piece(i) for i in want]
    r = httpx.post(url + "/tokenize", json={"prompt": text, "add_special_tokens": False}).json()
    assert r["tokens"] == want[1:] and r["token_strs"] is None
    dialog = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    r = httpx.post(url + "/tokenize", json={"messages": dialog}).json()
    assert r["tokens"] == encode_dialog(tokenizer, dialog, "llama-2")
    chat = httpx.post(url + "/v1/chat/completions", json={"messages": dialog, "max_tokens": 1}).json()
    assert chat["usage"]["prompt_tokens"] == r["count"]  # the same prompt the chat route builds
    r = httpx.post(url + "/tokenize", json={"messages": dialog, "add_generation_prompt": False})
    assert r.status_code == 400 and r.json()["error"]["param"] == "add_generation_prompt"
    r = httpx.post(url + "/detokenize", json={"tokens": want}).json()
    assert r == {"prompt": tokenizer.decode(want)} and r["prompt"] == text
    r = httpx.post(url + "/detokenize", json={"tokens": [1, 32000]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tokens"


def test_openapi_has_the_real_models(plain):
    from annotated_llama.serving.openai_schema import ChatRequest, CompletionRequest
    url, _ = plain
    spec = httpx.get(url + "/openapi.json").json()
    assert spec["openapi"].startswith("3.")
    schemas = spec["components"]["schemas"]
    for name in ("CompletionRequest", "ChatRequest", "ChatMessage", "Completion", "ChatCompletion",
                 "ChatCompletionChunk", "ErrorResponse", "TokenizeRequest", "TokenizeResponse", "ModelList"):
        assert name in schemas, name
    assert set(schemas["ChatRequest"]["properties"]) == set(ChatRequest.model_fields)
    assert set(schemas["CompletionRequest"]["properties"]) == set(CompletionRequest.model_fields)
    body = spec["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/ChatRequest"}
    refused = schemas["ChatRequest"]["properties"]["store"]  # the no-op values only, and why
    assert refused["anyOf"] == [{"type": "null"}, {"const": False}] and "Not supported" in refused["description"]
    from annotated_llama.core.sampling import LIMITS  # the ranges published are the engine's own
    for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "seed", "top_k"):
        low, high, closed = LIMITS[name]
        number = next(a for a in schemas["ChatRequest"]["properties"][name]["anyOf"] if a.get("type") != "null")
        assert number[("minimum" if closed else "exclusiveMinimum")] == low and number["maximum"] == high, name
    bias = schemas["ChatRequest"]["properties"]["logit_bias"]["anyOf"][0]["additionalProperties"]
    assert (bias["minimum"], bias["maximum"]) == LIMITS["logit_bias"][:2]


def test_an_exception_in_a_handler_is_a_500_on_a_kept_connection(tokenizer):
    app = create_app(tiny_model(max_seq_len=N_CTX), tokenizer)
    real = app.state.scheduler.submit
    with run_in_thread(app) as url:
        raw = RawHTTP(url)
        try:
            app.state.scheduler.submit = lambda *a, **k: {}["boom"]  # a KeyError nobody expected
            status, data = raw.request("POST", "/v1/completions", {"Content-Type": "application/json"},
                                       b'{"prompt": "hi", "max_tokens": 2}')
            err = json.loads(data)["error"]
            assert status == 500 and err["type"] == "server_error" and "KeyError" in err["message"]
            app.state.scheduler.submit = real
            status, _ = raw.request("POST", "/v1/completions", {"Content-Type": "application/json"},
                                    b'{"prompt": "hi", "max_tokens": 2}')
            assert status == 200
        finally:
            raw.close()
