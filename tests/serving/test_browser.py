"""The chat page in a real headless Chromium (Debian's `chromium`, driven by Playwright; no browser
is downloaded), against a uvicorn server on 127.0.0.1 with a tiny random model: type, Enter,
streamed text appears and ends equal to the API's answer for the same seed; Stop ends a long
answer and frees the server's slot; a conversation longer than the context leaves out its oldest
turns and says so; an over-long message shows the server's error; labelled controls; no horizontal
scrolling on a narrow window. (The documentation's screenshot, with the trained default model, is
made by docs/figures/make_chat_page.py; this test's random model must not replace it.)
If the browser cannot start, the test fails and says why."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
import torch

from annotated_llama import Tokenizer
from annotated_llama.cli.serve import run_in_thread
from annotated_llama.serving.server import create_app

from fixtures import tiny_model

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
N_CTX = 256

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(spm_path):
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: more threads only contend on a shared box
    model = tiny_model(max_seq_len=N_CTX)
    # step_delay makes the answer arrive over ~1 s, so "text appears while streaming" and Stop
    # are observable; it changes no token.
    app = create_app(model, Tokenizer(spm_path), model_name="tiny-random", template="llama-2", step_delay=0.03)
    with run_in_thread(app) as url:
        yield url
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as e:
        pytest.fail(f"the Python package 'playwright' is not installed (pip install -e .[dev]): {e}")
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} not found: install Debian's chromium package (apt-get install chromium)")
    with sync_playwright() as p:
        try:
            b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        except Exception as e:
            pytest.fail(f"headless Chromium at {CHROMIUM} did not start: {str(e).splitlines()[0]}")
        yield b
        b.close()


def settings(page, *, template="llama-2", temperature="0.8", top_p="0.9", max_tokens="24", seed="7"):
    page.select_option("#template", template)
    page.fill("#temperature", temperature)
    page.fill("#top-p", top_p)
    page.fill("#max-tokens", max_tokens)
    page.fill("#seed", seed)


def last_answer(page) -> str:
    return page.locator(".msg.assistant .content").last.text_content()


def test_chat_page_in_chromium(server, browser, tmp_path):
    page = browser.new_page(viewport={"width": 1000, "height": 760})
    page.goto(server + "/")
    page.wait_for_function("document.getElementById('model-name').textContent.includes('tiny-random')")
    # every control has a label a screen reader can announce
    unlabelled = page.evaluate("""[...document.querySelectorAll('input, select, textarea, button')]
        .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label') && !e.textContent.trim())
        .map(e => e.id)""")
    assert unlabelled == []

    # 1. type, press Enter: text streams in, then equals the API's answer for the same settings
    settings(page)
    page.fill("#prompt", "Write a short poem about the sea.")
    page.press("#prompt", "Enter")
    page.wait_for_function("""document.body.dataset.state === 'generating' &&
        (document.querySelector('.msg.assistant .content')?.textContent.length || 0) > 0""", timeout=20_000)
    partial = last_answer(page)
    page.wait_for_function("document.body.dataset.state === 'idle'", timeout=30_000)
    final = last_answer(page)
    assert final.startswith(partial) and len(final) > len(partial)  # it grew while we watched
    api = httpx.post(server + "/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": "Write a short poem about the sea."}], "template": "llama-2",
        "temperature": 0.8, "top_p": 0.9, "max_tokens": 24, "seed": 7}).json()
    assert final == api["choices"][0]["message"]["content"] and final
    assert page.locator(".msg.user .content").last.text_content() == "Write a short poem about the sea."
    page.screenshot(path=str(tmp_path / "chat-page.png"), full_page=True)  # the page renders to an image

    # 2. copy puts the transcript on the page's clipboard path
    page.click("#copy")
    page.wait_for_function("document.body.dataset.copied !== undefined")
    copied = page.evaluate("document.body.dataset.copied")
    assert copied == f"You: Write a short poem about the sea.\n\nAssistant: {final}"

    # 3. Stop mid-answer: generation ends early and the server frees the slot
    cancelled_before = httpx.get(server + "/health").json()["scheduler"]["cancelled"]
    settings(page, max_tokens="150", seed="8")
    page.fill("#prompt", "Now tell me a very long story.")
    page.click("#send")
    page.wait_for_function("(document.querySelectorAll('.msg.assistant .content')[1]?.textContent.length || 0) > 0",
                           timeout=20_000)
    page.click("#stop")
    page.wait_for_function("document.body.dataset.state === 'idle'", timeout=10_000)
    assert page.locator(".msg.assistant").last.get_attribute("data-finish") == "stopped"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        s = httpx.get(server + "/health").json()["scheduler"]
        if s["active"] == 0 and s["cancelled"] > cancelled_before:
            break
        time.sleep(0.05)
    assert s["active"] == 0 and s["cancelled"] == cancelled_before + 1, s
    assert s["tokens_generated"] < 24 + 150  # the long answer did not run to its 150 tokens

    # 3b. the keyboard: Escape stops too
    settings(page, max_tokens="100", seed="9")
    page.fill("#prompt", "Another long one.")
    page.press("#prompt", "Enter")
    page.wait_for_function("(document.querySelectorAll('.msg.assistant .content')[2]?.textContent.length || 0) > 0",
                           timeout=20_000)
    page.keyboard.press("Escape")
    page.wait_for_function("document.body.dataset.state === 'idle'", timeout=10_000)
    assert page.locator(".msg.assistant").last.get_attribute("data-finish") == "stopped"

    # 3c. a conversation that outgrows the context: the oldest turns are left out, and the page says so
    assert page.locator(".msg.dropped").count() == 0
    settings(page, max_tokens="100", seed="10")
    page.fill("#system", "You are a patient storyteller.")
    page.fill("#prompt", "Continue the story of the lighthouse keeper and the storm at sea " * 4)
    page.press("#prompt", "Enter")
    page.wait_for_function("document.body.dataset.state === 'idle'", timeout=60_000)
    assert page.is_hidden("#error"), page.text_content("#error")
    assert "Left out the 2 oldest messages" in page.text_content("#status")
    assert page.locator(".msg.dropped").count() == 2 and page.locator(".msg.user").first.get_attribute(
        "class").endswith("dropped")
    assert page.locator(".msg.assistant").last.get_attribute("data-finish") in ("stop", "length")
    page.fill("#system", "")

    # 4. an over-long message: the server's context error appears as readable text
    page.fill("#prompt", "word " * 400)
    page.press("#prompt", "Enter")
    page.wait_for_selector("#error:not([hidden])", timeout=10_000)
    error = page.text_content("#error")
    assert "Error 400" in error and f"maximum context length is {N_CTX} tokens" in error

    # 5. Clear empties the conversation; a narrow window does not scroll sideways
    page.click("#clear")
    assert page.locator(".msg").count() == 0 and page.is_hidden("#error")
    page.set_viewport_size({"width": 360, "height": 700})
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    page.close()
