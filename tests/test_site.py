"""The documentation site and the notebooks.

- The site (mkdocs with the Material theme, mkdocs.yml) builds with --strict: every link resolves (repository
  files outside docs/ included, through docs/site_hooks.py), every chapter is in the navigation, every formula
  became MathML.
- Every chapter converts to a notebook whose code cells are exactly the blocks the docs tests run, and two
  notebooks (the architecture chapter of Part I, the speed chapter of Part II) are executed by a real Jupyter
  kernel (nbclient, ipykernel), their outputs compared with the chapters' ```text blocks.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"


def _load_build():
    spec = importlib.util.spec_from_file_location("annotated_llama_docs_build_site", DOCS / "build.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


build = _load_build()
CHAPTERS = build.chapters()


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env={**__import__("os").environ,
                                                                              "NO_MKDOCS_2_WARNING": "1"})
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    return out


def test_site_builds_strictly_with_every_chapter(site):
    for path in CHAPTERS:
        rel = path.relative_to(DOCS).with_suffix("")
        page = site / rel / "index.html"
        assert page.is_file(), f"{rel}.md has no page in the built site"
    for name in ("references", "seed/the-annotated-llama", "seed", "WRITING"):
        assert (site / name / "index.html").is_file(), name
    # repository files the chapters link to are part of the site
    assert (site / "repo" / "annotated_llama" / "core" / "model.py").read_text() == (REPO / "annotated_llama" / "core" / "model.py").read_text()
    assert (site / "figures" / "architecture.png").is_file()


def test_math_is_mathml(site):
    html = (site / "paper" / "04_architecture" / "index.html").read_text()
    assert 'class="arithmatex"' not in html, "a formula was left for JavaScript to render"
    formulas = re.findall(r"<math\b", html)
    assert len(formulas) > 50, f"only {len(formulas)} MathML formulas in the architecture chapter"
    assert 'display="block"' in html and "<msqrt>" in html  # display equations; the 1/sqrt(D) scaling
    md = (DOCS / "paper" / "04_architecture.md").read_text()
    # no `$` of a formula survives as text (prose dollars are escaped or absent in this chapter)
    text = re.sub(r"<(script|style|code|pre)\b.*?</\1>", "", html, flags=re.S)
    assert "$" not in re.sub(r"<[^>]+>", "", text), "a $ delimiter was not converted"
    assert md.count("$$") % 2 == 0


def test_navigation_lists_every_chapter():
    import yaml

    config = yaml.safe_load((REPO / "mkdocs.yml").read_text().replace("!!python", "#"))
    listed = set()

    def walk(node):
        if isinstance(node, str):
            listed.add(node)
        elif isinstance(node, list):
            for item in node:
                walk(item)
        elif isinstance(node, dict):
            for value in node.values():
                walk(value)

    walk(config["nav"])
    missing = [str(p.relative_to(DOCS)) for p in CHAPTERS if str(p.relative_to(DOCS)) not in listed]
    assert not missing, f"mkdocs.yml's nav does not list {missing}"
    for entry in listed:
        assert (DOCS / entry).is_file(), f"mkdocs.yml's nav lists {entry}, which does not exist"


@pytest.mark.parametrize("path", CHAPTERS, ids=[p.stem for p in CHAPTERS])
def test_chapter_converts_to_a_notebook(path):
    nb = build.notebook(path)
    runs = [b for b in build.parse_blocks(path.read_text(), str(path)) if b.runs]
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.source.strip() for c in code] == [b.code.strip() for b in runs]
    markdown = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    assert "<!-- #region -->" not in markdown  # jupytext consumed its markers
    assert nb.metadata["kernelspec"]["name"] == "python3"


def test_build_writes_a_notebook_and_refuses_a_missing_chapter(tmp_path):
    out = tmp_path / "intro.ipynb"
    ok = subprocess.run([sys.executable, str(DOCS / "build.py"), "--notebook", str(DOCS / "paper" / "01_introduction.md"),
                         "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    import nbformat
    nbformat.validate(nbformat.read(out, as_version=4))
    bad = subprocess.run([sys.executable, str(DOCS / "build.py"), "--notebook", str(tmp_path / "nope.md")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "nope.md: no such chapter" in bad.stderr and "Traceback" not in bad.stderr


def test_build_executes_a_notebook_and_reports_a_failing_cell(tmp_path):
    # `--execute`: the reader's way to run a chapter as a notebook without Jupyter's front end.
    out = tmp_path / "intro.ipynb"
    run = [sys.executable, str(DOCS / "build.py"), "--notebook", str(DOCS / "paper" / "01_introduction.md"),
           "--out", str(out), "--execute"]
    ok = subprocess.run(run, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    n = sum(b.runs for b in build.parse_blocks((DOCS / "paper" / "01_introduction.md").read_text()))
    assert f"{n} cells ran; " in ok.stdout and re.search(r"; (\d+) of \1 printed what the chapter shows", ok.stdout)
    import nbformat
    nb = nbformat.read(out, as_version=4)
    assert all(c.outputs for c in nb.cells if c.cell_type == "code" and c.metadata.get("expected_output"))
    again = subprocess.run(run, capture_output=True, text=True, timeout=120)  # an existing notebook is kept
    assert again.returncode == 2 and "already exists (--force overwrites it)" in again.stderr
    bad = tmp_path / "99_bad.md"
    bad.write_text("# t\n\n```python\nprint(1)\n```\n\n```python\n1 / 0\n```\n")
    fail = subprocess.run([sys.executable, str(DOCS / "build.py"), "--notebook", str(bad), "--execute"],
                          capture_output=True, text=True, timeout=300)
    assert fail.returncode == 1 and "a cell raised ZeroDivisionError: division by zero" in fail.stderr
    assert "Traceback" not in fail.stderr and not bad.with_suffix(".ipynb").exists()


def _normalize(out: str) -> list[str]:
    lines = [ln.rstrip() for ln in out.split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    return lines


# (chapter, the fewest cells whose output is compared): one chapter of each part
EXECUTED = [("paper/04_architecture.md", 8), ("annotated/10_speed.md", 5)]


@pytest.mark.parametrize("chapter, at_least", EXECUTED, ids=[Path(c).stem for c, _ in EXECUTED])
def test_notebook_executes(chapter, at_least, tmp_path):
    """A chapter, as a notebook, in a real Jupyter kernel: every cell runs, and each cell's printed output
    equals the chapter's expected output."""
    from nbclient import NotebookClient

    nb = build.notebook(DOCS / chapter)
    # the timeout only guards against a hung cell: the speed chapter's kernel cell may build matvec.cpp (tens of
    # seconds alone, minutes on a loaded 2-core box)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    checked = 0
    for cell in (c for c in nb.cells if c.cell_type == "code"):
        errors = [o for o in cell.outputs if o.output_type == "error"]
        assert not errors, f"cell failed: {cell.source[:80]!r}: {errors[0].ename}: {errors[0].evalue}"
        want = cell.metadata.get("expected_output")
        if want is not None:
            got = "".join(o.text for o in cell.outputs if o.output_type == "stream" and o.name == "stdout")
            assert _normalize(got) == _normalize(want), f"cell {cell.source[:60]!r} printed something else"
            checked += 1
    assert checked >= at_least, f"only {checked} cells of {chapter} had their output compared"
