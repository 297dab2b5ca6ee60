"""mkdocs hooks for the documentation site (mkdocs.yml names this file).

1. Repository files. Chapters link to the code they explain (`../../annotated_llama/core/model.py`),
   which lies outside docs/. Each such file (or directory) is added to the site under `repo/`,
   and the link is rewritten to point there, so the built site is self-contained and
   `mkdocs build --strict` still checks every link. A linked directory gets a generated page
   listing its files. Markdown files reached this way (bench/RESULTS.md) are pages themselves,
   and their links are followed too.
2. Fences. The chapters' test flags after a fence's language (```python source, ```python no-run) are not
   Markdown; they are dropped before rendering (superfences would not read such a fence as code).
3. Math. pymdownx.arithmatex (generic mode) marks `$...$` and `$$...$$`; here each formula is
   converted to MathML with latex2mathml, so the pages need no JavaScript and no network to show
   their equations (MathML is rendered natively by current browsers).
"""

from __future__ import annotations

import html
import posixpath
import re
import subprocess
from pathlib import Path

import latex2mathml.converter
from mkdocs.structure.files import File, InclusionLevel

REPO = Path(__file__).resolve().parent.parent
LINK_RE = re.compile(r"(\]\()([^)\s]+)(\))")
FENCE_RE = re.compile(r"^(`{3,}).*?^\1\s*$", re.M | re.S)
FLAGGED_FENCE_RE = re.compile(r"^(`{3,}[\w+-]+)[ \t]+(?:source|no-run)[ \t]*$", re.M)
PREFIX = "repo"  # where repository files live in the site

_targets: dict[str, Path] = {}  # site path ("repo/annotated_llama/core/model.py") -> file on disk


def _outside_links(md_path: Path, text: str, docs_dir: Path):
    """(link, resolved path) for each relative link of `text` that leaves docs/ for the repository."""
    prose = FENCE_RE.sub("", text)  # links inside code blocks are code, not links
    for m in LINK_RE.finditer(prose):
        target = m.group(2)
        if re.match(r"^[a-z]+:", target) or target.startswith(("#", "/")):
            continue
        resolved = (md_path.parent / target.split("#")[0]).resolve()
        if resolved.is_relative_to(REPO) and not resolved.is_relative_to(docs_dir) and resolved.exists():
            yield target, resolved


def _site_path(path: Path) -> str:
    rel = path.relative_to(REPO).as_posix()
    return f"{PREFIX}/{rel}/index.md" if path.is_dir() else f"{PREFIX}/{rel}"


def _tracked(directory: Path) -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--", str(directory)], cwd=REPO, capture_output=True,
                             check=True).stdout.decode()
        files = [REPO / name for name in out.split("\0") if name]
    except (OSError, subprocess.CalledProcessError):
        files = [p for p in directory.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    return sorted(p for p in files if p.is_file())


def on_files(files, config):
    docs_dir = Path(config["docs_dir"]).resolve()
    _targets.clear()
    todo = [Path(f.abs_src_path) for f in files if f.src_uri.endswith(".md") and f.abs_src_path]
    seen = set()
    while todo:
        page = todo.pop()
        if page in seen:
            continue
        seen.add(page)
        for _, resolved in _outside_links(page, page.read_text(encoding="utf-8"), docs_dir):
            members = _tracked(resolved) if resolved.is_dir() else [resolved]
            if resolved.is_dir():
                _targets[_site_path(resolved)] = resolved
            for member in members:
                site = _site_path(member)
                if site not in _targets:
                    _targets[site] = member
                    if member.suffix == ".md":
                        todo.append(member)
    for site, path in sorted(_targets.items()):
        if path.is_dir():
            listing = "\n".join(f"- [{p.relative_to(path).as_posix()}]({p.relative_to(path).as_posix()})"
                                for p in _tracked(path))
            content = f"# {path.relative_to(REPO).as_posix()}/\n\nFiles of the repository in this directory:\n\n{listing}\n"
            generated = File.generated(config, site, content=content, inclusion=InclusionLevel.NOT_IN_NAV)
        else:
            generated = File.generated(config, site, abs_src_path=str(path), inclusion=InclusionLevel.NOT_IN_NAV)
        files.append(generated)
    return files


def on_page_markdown(markdown, page, config, files):
    markdown = FLAGGED_FENCE_RE.sub(r"\1", markdown)
    if not page.file.abs_src_path:
        return markdown
    docs_dir = Path(config["docs_dir"]).resolve()
    src = Path(page.file.abs_src_path)
    here = posixpath.dirname(page.file.src_uri)
    replace = {}
    for target, resolved in _outside_links(src, markdown, docs_dir):
        anchor = "#" + target.split("#", 1)[1] if "#" in target else ""
        replace[target] = posixpath.relpath(_site_path(resolved), here or ".") + anchor
    if not replace:
        return markdown
    # rewrite outside code blocks only
    parts, last = [], 0
    for m in FENCE_RE.finditer(markdown):
        parts.append(_rewrite(markdown[last:m.start()], replace))
        parts.append(m.group(0))
        last = m.end()
    parts.append(_rewrite(markdown[last:], replace))
    return "".join(parts)


def _rewrite(text: str, replace: dict) -> str:
    return LINK_RE.sub(lambda m: m.group(1) + replace.get(m.group(2), m.group(2)) + m.group(3), text)


# ---- math -----------------------------------------------------------------------------------

MATH_RE = re.compile(r'<(span|div) class="arithmatex">(.*?)</\1>', re.S)


def _to_mathml(m: re.Match) -> str:
    tag, body = m.group(1), html.unescape(m.group(2)).strip()
    display = tag == "div"
    for opening, closing in ((r"\[", r"\]"), (r"\(", r"\)"), ("$$", "$$"), ("$", "$")):
        if body.startswith(opening) and body.endswith(closing):
            body = body[len(opening):len(body) - len(closing)]
            break
    mathml = latex2mathml.converter.convert(body.strip(), display="block" if display else "inline")
    return f'<div class="math">{mathml}</div>' if display else mathml


def on_page_content(content, page, config, files):
    return MATH_RE.sub(_to_mathml, content)

