"""The Annotated LLaMA is tested: every chapter's code runs, and what it prints is what it shows.

One parametrized case per chapter (select one with `pytest tests/test_docs.py -k 04_architecture`):
- test_chapter_runs: every ```python block of docs/paper/NN_*.md (Part I) and docs/annotated/NN_*.md
  (Part II) runs, in order, in one
  namespace per chapter, with the working directory a fresh temp dir and the repo importable. A
  ```text block right after a python block (blank lines between are allowed) must equal what that
  block printed, trailing whitespace ignored. ```python no-run blocks are skipped.
- test_chapter_excerpts: every <!-- source: path::Name --> excerpt equals the current source, and every
  relative link points at a file that exists.
Also: the index lists the chapters written, the figure scripts make real PNGs, the model chapter's
parameter counts equal the presets' counted on the meta device, and the minimal implementations that
the chapters write (MINIMAL_CHECKS) equal the package's code, or an independent computation, on random
inputs other than the chapters' own.
Failures name the chapter file and line; tracebacks show the chapter's own lines.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import io
import re
import runpy
import subprocess
import sys
import time
import traceback
import types
import warnings
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
FIGURES = DOCS / "figures"


def _load_build():
    spec = importlib.util.spec_from_file_location("annotated_llama_docs_build", DOCS / "build.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


build = _load_build()
CHAPTERS = build.chapters()


def _rel(path: Path) -> str:
    try:
        return str(path.relative_to(REPO))
    except ValueError:
        return str(path)


def _normalize(out: str) -> list[str]:
    lines = [ln.rstrip() for ln in out.split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def run_chapter(path: Path, workdir: Path, namespace: dict | None = None) -> tuple[list[str], list[tuple[int, str]]]:
    """Execute a chapter. Returns (problems, [(code_line, printed output)] per run block).
    Stops at the first block that raises; output mismatches are collected and it goes on.
    `namespace`, if given, receives the chapter's global names after the run."""
    name = _rel(path)
    blocks = build.parse_blocks(path.read_text(), name)
    module = types.ModuleType(f"annotated_llama_docs_{path.stem}")  # a real module: dataclasses, pickle
    module.__file__ = str(path)
    sys.modules[module.__name__] = module
    problems, outputs = [], []
    try:
        prev = None
        for block in blocks:
            if block.lang == "text" and prev is not None and prev.runs and block.follows_prev:
                got, want = _normalize(outputs[-1][1]), _normalize(block.code)
                if got != want:
                    diff = "\n".join(difflib.unified_diff(want, got, "shown in the chapter", "printed", lineterm=""))
                    problems.append(f"{name}:{block.fence_line}: the output of the python block at line "
                                    f"{prev.fence_line} differs from this ```text block:\n{diff}")
            if block.runs:
                # Pad with newlines so tracebacks give the chapter's line numbers (and linecache
                # shows the chapter's own text, since the filename is the chapter).
                code = compile("\n" * (block.code_line - 1) + block.code, str(path), "exec")
                buf = io.StringIO()
                t0 = time.perf_counter()
                try:
                    with contextlib.redirect_stdout(buf):
                        exec(code, module.__dict__)
                except BaseException as e:  # noqa: BLE001 - report any failure of the chapter's code
                    if isinstance(e, KeyboardInterrupt):
                        raise
                    tb = "".join(traceback.format_exception(type(e), e, e.__traceback__.tb_next))  # not the runner's frame
                    problems.append(f"{name}:{block.fence_line}: the python block raised "
                                    f"{type(e).__name__}:\n{tb}\nprinted before the error:\n{buf.getvalue()}")
                    break
                finally:
                    seconds = time.perf_counter() - t0
                    if seconds > 10:  # a warning, not a failure: timings are not test assertions
                        warnings.warn(f"{name}:{block.fence_line}: this block took {seconds:.0f} s; "
                                      "chapters should run in seconds (use a tiny model, show long runs as no-run)")
                outputs.append((block.code_line, buf.getvalue()))
            prev = block
    finally:
        sys.modules.pop(module.__name__, None)
        if namespace is not None:
            namespace.update(module.__dict__)
    return problems, outputs


@pytest.fixture
def chapter_env(tmp_path, monkeypatch):
    """cwd = a fresh temp dir; the repo importable; sys.path, grad mode and dtype restored."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(REPO))  # also restores any sys.path edits a chapter makes
    dtype, grad = torch.get_default_dtype(), torch.is_grad_enabled()
    yield tmp_path
    torch.set_default_dtype(dtype)
    torch.set_grad_enabled(grad)


_RESULTS: dict[Path, tuple] = {}  # chapter -> run_chapter's result, so a chapter runs once per session
_NAMESPACES: dict[Path, dict] = {}  # chapter -> its global names after the run


def run_chapter_once(path: Path, workdir: Path):
    if path not in _RESULTS:
        _NAMESPACES[path] = {}
        _RESULTS[path] = run_chapter(path, workdir, _NAMESPACES[path])
    return _RESULTS[path]


# Chapters measured at over ~10 s on the shared 2-core box (tens of seconds each): marked slow, still run in CI.
# (10_speed: the first use of the decode kernel builds matvec.cpp, ~30 s; later runs load the cached build.)
SLOW_CHAPTERS = {"06_training", "05_generator", "07_weights", "09_instruction", "10_speed"}
RUN_CASES = [pytest.param(p, id=p.stem, marks=[pytest.mark.slow] if p.stem in SLOW_CHAPTERS else [])
             for p in CHAPTERS]


@pytest.mark.parametrize("path", RUN_CASES)
def test_chapter_runs(path, chapter_env):
    problems, _ = run_chapter_once(path, chapter_env)
    assert not problems, "\n\n".join(problems)


LINK_RE = re.compile(r"\]\(([^)\s]+)\)")


@pytest.mark.parametrize("path", CHAPTERS, ids=[p.stem for p in CHAPTERS])
def test_chapter_excerpts(path):
    """Source excerpts equal the current code; relative links point at files that exist."""
    name = _rel(path)
    text = path.read_text()
    problems = []
    blocks = build.parse_blocks(text, name)
    in_code = {n for b in blocks for n in range(b.fence_line, b.end_line + 1)}
    for lineno, line in enumerate(text.split("\n"), 1):
        for target in ([] if lineno in in_code else LINK_RE.findall(line)):
            if re.match(r"^[a-z]+:", target) or target.startswith("#"):
                continue  # a URL or an anchor in this page
            if not (path.parent / target.split("#")[0]).exists():
                problems.append(f"{name}:{lineno}: link to {target}, which does not exist")
    for block in blocks:
        if block.source_ref is None:
            continue
        try:
            current = build.extract_source(block.source_ref)
        except LookupError as e:
            problems.append(f"{name}:{block.marker_line}: {e}")
            continue
        if current != block.code:
            diff = "\n".join(difflib.unified_diff(block.code.split("\n"), current.split("\n"),
                                                  "excerpt in the chapter", "current source", lineterm=""))
            problems.append(f"{name}:{block.marker_line}: excerpt of {block.source_ref} is stale "
                            f"(run `python docs/build.py`):\n{diff}")
    assert not problems, "\n\n".join(problems)


def test_the_build_finds_every_chapter():
    # the parametrized tests above run over build.chapters(): it must see every NN_name.md chapter file
    for part in ("paper", "annotated"):  # both books, each with chapters
        on_disk = sorted(p.name for p in (DOCS / part).glob("[0-9][0-9]_*.md"))
        assert on_disk and [p.name for p in CHAPTERS if p.parent.name == part] == on_disk, part


def test_index_links_resolve():
    # Dead links fail. A chapter that is not listed yet only warns: chapters are written by several
    # people, and the list is refreshed by `python docs/build.py` (which the docs owner runs).
    index = DOCS / "index.md"
    text = index.read_text()
    for target in re.findall(r"\]\(([^)#]+\.md)\)", text):
        assert (index.parent / target).is_file(), f"{_rel(index)}: link to missing file {target}"
    unlisted = [p.name for p in CHAPTERS if f"]({p.relative_to(index.parent).as_posix()})" not in text]
    if unlisted:
        warnings.warn(f"{_rel(index)} does not list {unlisted} yet: run `python docs/build.py`")


def test_build_check_cli(tmp_path):
    # The command line CI and authors use; staleness of each chapter is test_chapter_excerpts' job.
    chapter = tmp_path / "01_x.md"
    chapter.write_text("# x\n\n<!-- source: annotated_llama/core/config.py::ModelArgs.head_dim -->\n```python source\n```\n")
    check = subprocess.run([sys.executable, str(DOCS / "build.py"), "--check", str(chapter)], capture_output=True,
                           text=True, timeout=120)
    assert check.returncode == 1 and "stale" in check.stderr, check.stdout + check.stderr
    subprocess.run([sys.executable, str(DOCS / "build.py"), str(chapter)], check=True, capture_output=True, timeout=120)
    assert "def head_dim(self) -> int:" in chapter.read_text()
    check = subprocess.run([sys.executable, str(DOCS / "build.py"), "--check", str(chapter)], capture_output=True,
                           text=True, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr


def test_build_refreshes_and_rejects(tmp_path):
    # The excerpt machinery itself: a stale block is refreshed, a vanished name is an error.
    (tmp_path / "m.py").write_text("X = 1\n\n\nclass A:\n    @staticmethod\n    def f(x):\n        return x\n")
    md = ("# t\n\n<!-- source: m.py::A.f -->\n```python source\nold\n```\n\n"
          "<!-- source: m.py::X -->\n```python source\n```\n")
    new, problems = build.refresh_text(md, "t.md", repo=tmp_path)
    assert problems == []
    blocks = build.parse_blocks(new, "t.md")
    assert blocks[0].code == "@staticmethod\ndef f(x):\n    return x\n"
    assert blocks[1].code == "X = 1\n"
    _, problems = build.refresh_text(md.replace("A.f", "A.g"), "t.md", repo=tmp_path)
    assert problems and "t.md:3" in problems[0] and "'g'" in problems[0]
    with pytest.raises(ValueError, match="t.md:3"):
        build.parse_blocks("x\n\n<!-- source: m.py::X -->\nsome prose\n", "t.md")


def test_runner_reports_mismatch_and_errors(tmp_path, chapter_env):
    # The runner must be able to fail: wrong output and a raising block are both reported with lines.
    md = tmp_path / "99_selftest.md"
    md.write_text("# t\n\n```python\nprint('a  ')\nx = 2\n```\n\n```text\na\n```\n\n"
                  "```python\nprint(x + 1)\n```\n```text\n4\n```\n\n"
                  "```python no-run\nraise SystemExit\n```\n\n```python\n1 / 0\n```\n")
    problems, outputs = run_chapter(md, tmp_path)
    assert [o for _, o in outputs] == ["a  \n", "3\n"]
    assert len(problems) == 2
    assert "99_selftest.md:15" in problems[0] and "+3" in problems[0]
    assert "99_selftest.md:23" in problems[1] and "ZeroDivisionError" in problems[1]
    assert "line 24" in problems[1]  # the traceback points into the chapter


# ---- the model chapter: parameter counts -------------------------------------------------------------

PAPER_SIZES = {"llama-7b": "6.7B", "llama-13b": "13.0B", "llama-33b": "32.5B", "llama-65b": "65.2B"}


def _count_on_meta_device(name: str) -> int:
    # Independent of ModelArgs.num_params(): build the real module without memory and count.
    from annotated_llama import ModelArgs, Transformer
    with torch.device("meta"):
        model = Transformer(ModelArgs.from_name(name))
    return sum(p.numel() for p in model.parameters())


def test_model_chapter_parameter_counts(chapter_env):
    path = next((p for p in CHAPTERS if p.stem == "05_model"), None)
    assert path is not None, "the model chapter (docs/paper/05_model.md) is missing"
    problems, outputs = run_chapter_once(path, chapter_env)
    assert not problems, "\n\n".join(problems)
    printed = "".join(out for _, out in outputs)
    for name, paper in PAPER_SIZES.items():
        rows = re.findall(rf"^{re.escape(name)}\s+([\d,]+)\s+(\S+)", printed, flags=re.M)
        assert rows, f"{_rel(path)}: no printed row '{name}  <count>  <paper size>' found"
        count, label = rows[0]
        assert int(count.replace(",", "")) == _count_on_meta_device(name), f"{_rel(path)}: {name} count {count}"
        assert label == paper, f"{_rel(path)}: {name} printed as {label}, the paper says {paper}"


# ---- figures -----------------------------------------------------------------------------------

# script -> the PNGs it must write into the directory given as its only argument.
FIGURE_SCRIPTS = {
    "make_speed_chart.py": ["speed.png"],  # from bench/results.json (bench/bench_engines.py)
    "make_roofline.py": ["roofline.png"],  # from bench/results.json and bench/gpu/*.json
    "make_rope.py": ["rope.png"],
    "make_lr_schedule.py": ["lr_schedule.png"],
    "make_loss_curve.py": ["loss_curve.png"],
    "make_attention.py": ["attention.png"],
    "make_architecture.py": ["architecture.png"],
    "make_kv_cache.py": ["kv_cache.png"],
    "make_ragged_batch.py": ["ragged_batch.png"],
    "make_gqa.py": ["gqa.png"],
    "make_megatron.py": ["megatron.png"],
    "make_decode_kernel.py": ["decode_kernel.png"],
    "make_alpaca_masking.py": ["alpaca_masking.png"],
    "make_chinchilla.py": ["chinchilla.png"],  # from docs/data/chinchilla.csv
    "make_results.py": ["results.png"],  # from docs/data/llama_paper_tables.json
    "make_sampling.py": ["sampling.png"],
    "make_tokenization.py": ["tokenization.png"],
    "make_chat_page.py": ["chat-page.png"],  # a real server and headless Chromium: slow
}
SLOW_FIGURES = {"make_chat_page.py"}


def _check_png(path: Path):
    from matplotlib import image
    assert path.is_file(), f"{path.name} was not written"
    assert path.stat().st_size > 10_000, f"{path.name}: only {path.stat().st_size} bytes, expected a real figure"
    pixels = image.imread(path)  # (H, W, 3|4) floats in [0, 1]
    assert pixels.shape[0] >= 200 and pixels.shape[1] >= 200, f"{path.name}: tiny image {pixels.shape}"
    rgb = pixels[..., :3].reshape(-1, 3)
    colours = len({tuple(c) for c in (rgb[:: max(1, len(rgb) // 20000)] * 255).round().astype(int).tolist()})
    assert rgb.std() > 0.05 and colours > 20, f"{path.name}: nearly uniform image ({colours} colours)"


def _run_script(path: Path, argv: list[str]) -> int:
    # In this process (torch and matplotlib are imported once), as `python path argv...` would run it.
    saved = sys.argv
    sys.argv = [str(path), *argv]
    try:
        runpy.run_path(str(path), run_name="__main__")
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = saved
    return 0


@pytest.mark.parametrize("script", [pytest.param(s, marks=[pytest.mark.slow] if s in SLOW_FIGURES else [])
                                    for s in sorted(FIGURE_SCRIPTS)])
def test_figure_script(script, chapter_env):
    out = chapter_env / "out"
    out.mkdir()
    rc = _run_script(FIGURES / script, [str(out)])
    assert rc == 0, f"docs/figures/{script} exited with status {rc} (its error is in the captured stderr)"
    for png in FIGURE_SCRIPTS[script]:
        _check_png(out / png)
        assert (FIGURES / png).is_file(), f"docs/figures/{png} is not committed (run docs/figures/{script})"


def test_every_figure_script_is_tested():
    scripts = {p.name for p in FIGURES.glob("make_*.py")}
    untested = scripts - set(FIGURE_SCRIPTS)
    assert not untested, f"figure scripts not in FIGURE_SCRIPTS: {sorted(untested)}"


def test_every_figure_is_made_by_a_script():
    made = {png for pngs in FIGURE_SCRIPTS.values() for png in pngs}
    orphans = sorted(p.name for p in FIGURES.glob("*.png") if p.name not in made)
    assert not orphans, f"docs/figures: PNGs no script makes (add the script or delete the file): {orphans}"


# ---- Part I's minimal implementations against the package ------------------------------------------
# Each chapter of Part I writes the smallest code for its idea and compares it with the package inside its
# own blocks. Here the same functions (taken from the chapter's namespace after it ran) are compared again,
# on other shapes and seeds, so a chapter cannot pass by printing True for one lucky input.

def _check_architecture(ns):
    from annotated_llama import ModelArgs
    from annotated_llama.core.model import (Attention, FeedForward, RMSNorm, TransformerBlock, apply_rope,
                                       precompute_rope, rope_frequencies, scale_rope_frequencies)
    import torch.nn.functional as F
    g = torch.Generator().manual_seed(123)
    for B, H, T, S, D in ((1, 2, 3, 3, 8), (2, 3, 5, 9, 16), (3, 1, 1, 7, 4)):
        q, k, v = (torch.randn(B, H, n, D, generator=g) for n in (T, S, S))
        visible = torch.ones(T, S, dtype=torch.bool).tril(S - T)
        assert torch.allclose(ns["attention"](q, k, v), F.scaled_dot_product_attention(q, k, v, attn_mask=visible),
                              atol=1e-5), (B, H, T, S, D)
    for dim, eps in ((5, 1e-5), (96, 1e-6)):
        norm = RMSNorm(dim, eps)
        with torch.no_grad():
            norm.weight.copy_(torch.rand(dim, generator=g) + 0.5)
        x = torch.randn(4, 3, dim, generator=g) * 7
        assert torch.allclose(ns["rms_norm"](x, norm.weight, eps), norm(x), atol=1e-5)
        x16 = x.to(torch.bfloat16)
        assert torch.equal(ns["rms_norm"](x16, norm.weight.to(torch.bfloat16), eps), norm.to(torch.bfloat16)(x16))
    ffn = FeedForward(24, 40)
    x = torch.randn(3, 24, generator=g)
    assert torch.allclose(ns["swiglu"](x, ffn.w1.weight, ffn.w2.weight, ffn.w3.weight), ffn(x), atol=1e-5)
    from annotated_llama.core.config import PRESETS
    for name in PRESETS:
        a = ModelArgs.from_name(name)
        if a.hidden_dim is None:
            assert ns["ffn_width"](a.dim, a.multiple_of, a.ffn_dim_multiplier) == a.ffn_hidden_dim, name
    for name in ("tiny-gqa", "tiny-llama3", "llama-3.1-8b"):
        a = ModelArgs.from_name(name)
        freqs = ns["rope_frequencies_"](a.head_dim, a.rope_theta)
        if a.use_scaled_rope:
            scaled = ns["scale_frequencies"](freqs, a.rope_scale_factor, a.rope_low_freq_factor,
                                             a.rope_high_freq_factor, a.rope_original_context)
            assert torch.allclose(scaled, scale_rope_frequencies(freqs, a)), name
            freqs = scaled
        assert torch.allclose(freqs, rope_frequencies(a), rtol=1e-6), name
    a = ModelArgs.from_name("tiny-llama3")
    cos, sin = precompute_rope(a, 600)
    pos = torch.tensor([0, 3, 4, 100, 511])  # not contiguous: each row's own positions
    x = torch.randn(2, 5, a.n_heads, a.head_dim, generator=g)
    freqs = torch.as_tensor(rope_frequencies(a))
    assert torch.allclose(ns["rope"](x, freqs, pos), apply_rope(x, cos[pos][None], sin[pos][None]), atol=1e-4)
    for name in ("tiny", "tiny-gqa", "tiny-llama3"):
        a = ModelArgs.from_name(name)
        torch.manual_seed(7)
        layer, attn = TransformerBlock(0, a), Attention(a)
        x, pos = torch.randn(1, 11, a.dim, generator=g), torch.arange(11)
        c, s = precompute_rope(a, 16)
        freqs = rope_frequencies(a)
        got = ns["self_attention"](x, attn.wq.weight, attn.wk.weight, attn.wv.weight, attn.wo.weight,
                                   a.n_heads, a.n_kv_heads, freqs, pos)
        assert torch.allclose(got, attn(x, c[pos][None], s[pos][None], None, None), atol=1e-5), name
        assert torch.allclose(ns["block"](x, layer, a, freqs, pos), layer(x, c[pos][None], s[pos][None], None, None),
                              atol=1e-5), name


def _check_model(ns):
    from annotated_llama import ModelArgs, Transformer
    for name, overrides in (("tiny", {}), ("tiny-gqa", {"n_layers": 3}), ("tiny-llama3", {"vocab_size": 300})):
        a = ModelArgs.from_name(name, **overrides)
        torch.manual_seed(11)
        model = Transformer(a).eval()
        tokens = torch.randint(0, a.vocab_size, (3, 21))
        with torch.no_grad():
            assert torch.allclose(ns["llama"](tokens, model.state_dict(), a), model(tokens, cache=False), atol=1e-4), name


def _check_training(ns):
    import math
    import torch.nn.functional as F
    from annotated_llama.train.loop import TrainConfig, lr_at
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 9, 30, generator=g) * 3
    tokens = torch.randint(0, 30, (2, 9), generator=g)
    tokens[0, 3:6] = -100  # ignored targets
    want = F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(), ignore_index=-100)
    assert torch.allclose(ns["next_token_loss"](logits, tokens), want, atol=1e-6)
    w = torch.randn(4, 4, generator=g, requires_grad=True)
    opt = torch.optim.AdamW([w], lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05)
    theta, m, v = w.detach().clone(), torch.zeros(4, 4), torch.zeros(4, 4)
    for t in range(1, 9):
        grad = torch.randn(4, 4, generator=g)
        w.grad = grad.clone()
        opt.step()
        theta, m, v = ns["adamw_step"](theta, grad, m, v, t, lr=3e-3, beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.05)
    assert torch.allclose(theta, w.detach(), atol=1e-6)
    for total, peak, warmup, floor in ((100, 1e-3, 10, 0.1), (57, 2e-4, 3, 0.0)):
        cfg = TrainConfig(out_dir="unused", max_steps=total, lr=peak, warmup_steps=warmup, min_lr_ratio=floor)
        for step in range(total + 1):
            assert math.isclose(ns["lr_schedule"](step, peak, total, warmup, floor), lr_at(step, cfg), rel_tol=1e-9)


def _check_efficiency(ns):
    import torch.nn.functional as F
    g = torch.Generator().manual_seed(9)
    for T, block in ((7, 3), (16, 4), (5, 8)):
        q, k, v = (torch.randn(1, 2, T, 8, generator=g) for _ in range(3))
        out, computed = ns["blockwise_causal_attention"](q, k, v, block=block)
        assert torch.allclose(out, F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=1e-5), (T, block)
        n = -(-T // block)
        assert computed == n * (n + 1) // 2
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    weights = [torch.randn(*s, dtype=torch.float64, generator=None, requires_grad=True) for s in ((7, 5), (5, 7), (7, 5))]
    assert torch.autograd.gradcheck(ns["SwiGLU"].apply, (x, *weights))


def _check_instruction(ns):
    from annotated_llama.data.alpaca import encode_record, render_prompt
    tok = ns["tok"]
    for record in ({"instruction": "Name the first book.", "input": "", "output": "Genesis"},
                   {"instruction": "Count the words.", "input": "In the beginning", "output": "3"}):
        ex = encode_record(tok, record)
        assert (ex.ids, ex.labels) == ns["masked_example"](tok, render_prompt(record), record["output"])


def _check_meta_code(ns):
    from annotated_llama.core.sampling import sample_top_p
    probs = torch.softmax(torch.randn(4, 50, generator=torch.Generator().manual_seed(2)) * 2, dim=-1)
    for p in (0.05, 0.5, 0.9, 1.0):
        g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        for _ in range(20):
            assert torch.equal(ns["top_p_sample"](probs, p, g1), sample_top_p(probs, p, g2)), p


def _check_introduction(ns):
    # The closed-form compute-optimal split against a numerical minimum of the same loss at fixed compute
    # (C = 6 N D): a dense grid over log N, refined once.
    import math
    for C in (3e20, 5e22, 2e25):
        n_opt, d_opt = ns["optimal"](C)
        assert math.isclose(6 * n_opt * d_opt, C, rel_tol=1e-9)
        lo, hi = math.log(1e6), math.log(1e14)
        for _ in range(2):
            grid = [lo + (hi - lo) * i / 4000 for i in range(4001)]
            best = min(grid, key=lambda ln: ns["loss"](math.exp(ln), C / (6 * math.exp(ln))))
            step = (hi - lo) / 4000
            lo, hi = best - 2 * step, best + 2 * step
        assert math.isclose(math.exp(best), n_opt, rel_tol=1e-3), (C, math.exp(best), n_opt)


def _check_tokenizer(ns):
    # BPE from scratch against SentencePiece on LLaMA's vocabulary, on texts the chapter never saw: random
    # strings over letters, digits, punctuation, whitespace runs, accents, CJK, Cyrillic and emoji.
    import random
    sp, vocab, encode = ns["sp"], ns["llama_vocab"], ns["bpe_scratch"].encode
    rng = random.Random(2024)
    alphabet = (list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:!?'\"()-\n\t")
                + list("éüñßçøåœ漢字かなабвгд") + ["🦙", "😁", "\u200b", "  ", "   ", " the", "ing", "tion"])
    for _ in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60)))
        assert encode(text, vocab) == sp.encode(text), repr(text)


def _check_speed(ns):
    # The decode kernel's loop order, written in Python, on shapes other than the chapter's, against F.linear
    # (and the kernel itself where it is built, which tests/inference/test_backends.py requires).
    import torch.nn.functional as F
    from annotated_llama.inference import matvec
    g = torch.Generator().manual_seed(4)
    for N, K, M, rows, chunk in ((7, 33, 2, 4, 16), (64, 1000, 5, 4, 256), (130, 300, 16, 3, 64)):
        w, x = torch.randn(N, K, generator=g), torch.randn(M, K, generator=g)
        want = F.linear(x, w)
        assert torch.allclose(ns["matvec_loop_order"](x, w, rows=rows, chunk=chunk), want, atol=1e-4), (N, K, M)
        if matvec.load():
            assert torch.allclose(matvec.matvec(x, w), want, atol=1e-4), (N, K, M)


MINIMAL_CHECKS = {"01_introduction": _check_introduction, "03_tokenizer": _check_tokenizer,
                  "10_speed": _check_speed, "04_architecture": _check_architecture, "05_model": _check_model, "06_training": _check_training,
                  "07_efficiency": _check_efficiency, "09_instruction": _check_instruction,
                  "11_meta_code": _check_meta_code}


@pytest.mark.parametrize("stem", [pytest.param(s, marks=[pytest.mark.slow] if s in SLOW_CHAPTERS else [])
                                  for s in sorted(MINIMAL_CHECKS)])
def test_minimal_implementation_equals_package(stem, chapter_env):
    path = next((p for p in CHAPTERS if p.stem == stem), None)
    assert path is not None, f"docs/paper/{stem}.md is missing"
    problems, _ = run_chapter_once(path, chapter_env)
    assert not problems, "\n\n".join(problems)
    ns = _NAMESPACES[path]
    try:
        MINIMAL_CHECKS[stem](ns)
    except KeyError as e:
        pytest.fail(f"{_rel(path)} no longer defines {e}: update MINIMAL_CHECKS in tests/test_docs.py")
