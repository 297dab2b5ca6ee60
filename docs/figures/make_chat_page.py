"""Figure: the chat page of `annotated-llama serve`, answering with the embedded default model.

    python docs/figures/make_chat_page.py [OUT_DIR]    writes OUT_DIR/chat-page.png (default docs/figures/)

Serves the trained default model (annotated_llama/default_model: 6.9M parameters, World English Bible) on
127.0.0.1 with the package's own server, drives the page in Debian's headless Chromium through Playwright (no
browser is downloaded; as tests/serving/test_browser.py does), sends one prompt with the "none" template (the default
model is a base model: it continues text) at a fixed seed, waits for the streamed answer to finish, and takes a
screenshot. The answer shown is the model's, so it is the same on every run. A missing browser is an error.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
PROMPT = "In the beginning God created the heavens and the earth. And God said,"


def main(out_dir: Path) -> Path:
    import torch

    from annotated_llama import load_model
    from annotated_llama.cli.serve import run_in_thread
    from annotated_llama.default_model import default_model_dir
    from annotated_llama.serving.scheduler import Scheduler
    from annotated_llama.serving.server import create_app

    try:
        from playwright.sync_api import sync_playwright
    except ImportError as e:
        raise OSError(f"the Python package 'playwright' is not installed (pip install -e .[dev]): {e}") from None
    if not Path(CHROMIUM).exists():
        raise OSError(f"{CHROMIUM} not found: install Debian's chromium package")
    model, tok = load_model(default_model_dir(), dtype=torch.float32)
    # eager: a screenshot needs no compiled decode step (and no compiler thread left running at exit)
    app = create_app(Scheduler(model, tok, backend="eager"), model_name="default (6.9M, World English Bible)",
                     template="none")
    out = Path(out_dir) / "chat-page.png"
    with run_in_thread(app) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 720})
            page.goto(url + "/")
            page.wait_for_function("document.getElementById('model-name').textContent.includes('default')")
            page.select_option("#template", "none")
            page.fill("#temperature", "0.7")
            page.fill("#top-p", "0.9")
            page.fill("#max-tokens", "48")
            page.fill("#seed", "3")
            page.fill("#prompt", PROMPT)
            page.press("#prompt", "Enter")
            page.wait_for_function("document.body.dataset.state === 'generating'", timeout=20_000)
            page.wait_for_function("document.body.dataset.state === 'idle'", timeout=60_000)
            answer = page.locator(".msg.assistant .content").last.text_content()
            if not answer.strip():
                raise RuntimeError("the chat page shows no answer")
            page.screenshot(path=str(out), full_page=True)
        finally:
            browser.close()
    return out


if __name__ == "__main__":
    out_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE
    try:
        print(main(out_dir))
    except (OSError, RuntimeError) as e:
        print(f"make_chat_page.py: error: {e}", file=sys.stderr)
        sys.exit(2)
