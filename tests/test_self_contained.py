"""The repository speaks only of itself.

Docs, source, tests, scripts and benchmarks may cite public sources (a paper and section, a repository file, an
issue number) or pages of this repository, never documents a reader does not have: the project's internal notes
(the reference, machine, contract and style notes of its workplace), work sessions, or rounds of work used as
dates. A mention of the seed article must come with a link to its copy (docs/seed/). And every arXiv paper the
documentation links is listed in docs/references.md.

Every area must pass: the documentation, the package, its tests, benchmarks, scripts and CI.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TEXT_SUFFIXES = {".md", ".py", ".sh", ".txt", ".json", ".csv", ".yml", ".yaml", ".toml", ".html", ".js", ".css"}
SKIP_DIRS = {".git", ".venv", "venv", ".ci-venv", "__pycache__", "site", "node_modules", "build", "dist", "runs"}

# Each pattern: (regex, what it is). Written so that this file's own text does not match them.
PATTERNS = [
    (re.compile(r"REFERENCE ?(?:b[0-9]|section|\.md)"), "a section of the workplace's reference notes"),
    (re.compile(r"\.\./shared/"), "a path into the workplace's shared folder"),
    (re.compile(r"shared/(?:REFERENCE|MACHINE|CONTRACT|STYLE)"), "a workplace note"),
    (re.compile(r"MACHINE\.md"), "the workplace's machine notes"),
    (re.compile(r"CONTRACT\.md"), "the workplace's contract notes"),
    (re.compile(r"[Ss]ession [0-9]"), "a work session"),
    (re.compile(r"\b(?:[Bb]efore|[Ii]n|[Ss]ince|[Aa]fter|[Uu]ntil|[Dd]uring) (?:this|the last|the previous|an earlier) "
                r"round\b|\b(?:this|last|previous) round of work\b"), "a round of work used as a date"),
]
SEED_RE = re.compile(r"seed" r" article", re.I)  # (split so that this line does not match itself)
SEED_LINK_RE = re.compile(r"\bseed/(?:index|the-annotated-llama)\.md\b|docs/seed/")  # a link, or the path itself


def _files(root: Path) -> list[Path]:
    out = []
    for p in sorted(root.rglob("*") if root.is_dir() else [root]):
        if p.is_file() and p.suffix in TEXT_SUFFIXES and not (set(p.relative_to(REPO).parts) & SKIP_DIRS):
            out.append(p)
    return out


def problems_in(paths: list[Path]) -> list[str]:
    found = []
    for path in paths:
        rel = path.relative_to(REPO).as_posix()
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for lineno, line in enumerate(text.split("\n"), 1):
            for regex, what in PATTERNS:
                if regex.search(line):
                    found.append(f"{rel}:{lineno}: {what}: {line.strip()[:120]}")
        if rel.startswith("docs/seed/"):
            continue  # the pages of the seed itself (docs/seed/)
        # a mention of the seed must come with a link to docs/seed/: per paragraph in Markdown, per line elsewhere
        units = re.split(r"\n\s*\n", text) if path.suffix == ".md" else text.split("\n")
        offset = 1
        for unit in units:
            if SEED_RE.search(unit) and not SEED_LINK_RE.search(unit):
                line = next(i for i, ln in enumerate(unit.split("\n")) if SEED_RE.search(ln))
                found.append(f"{rel}:{offset + line}: the seed " f"article mentioned without a link to docs/seed/")
            offset += unit.count("\n") + (2 if path.suffix == ".md" else 1)
    return found


def test_the_checker_finds_what_it_should(tmp_path, monkeypatch):
    # The test must be able to fail: each kind of reference is caught, a linked mention of the seed is not.
    monkeypatch.setattr(__import__(__name__), "REPO", tmp_path)
    bad = tmp_path / "bad.md"
    lines = ["See REFERENCE" + " b6.", "path ../" + "shared/x", "shared/" + "MACHINE" + ".md", "the CONTRACT" + ".md",
             "in Session" + " 2 we", "Before this " + "round the table read", "", "the seed " + "article says",
             "", "[the seed " + "article](seed/index.md) says"]
    bad.write_text("\n".join(lines) + "\n")
    found = problems_in([bad])
    kinds = [f.split(": ")[1] for f in found]
    assert len(found) == 8, found  # 7 pattern hits (two patterns on line 3) + 1 unlinked seed mention
    assert sum(SEED_RE.search(k) is not None for k in kinds) == 1 and "bad.md:8:" in found[-1]


DOC_AREAS = {
    "paper": ["docs/paper"],  # Part I
    "part-2": ["docs/annotated"],  # Part II
    "site": ["docs/index.md", "docs/references.md", "docs/WRITING.md", "docs/seed", "docs/figures", "docs/data",
             "docs/build.py", "docs/site_hooks.py", "docs/stylesheets", "mkdocs.yml", "README.md"],
}


@pytest.mark.parametrize("area", sorted(DOC_AREAS))
def test_docs_are_self_contained(area):
    paths = [p for rel in DOC_AREAS[area] for p in _files(REPO / rel)]
    assert paths, f"{area}: no files found"
    found = problems_in(paths)
    assert not found, "references to material outside the repository:\n" + "\n".join(found)


def test_every_docs_file_is_in_an_area():
    covered = {p for rels in DOC_AREAS.values() for rel in rels for p in _files(REPO / rel)}
    missing = [p.relative_to(REPO).as_posix() for p in _files(REPO / "docs") if p not in covered]
    assert not missing, f"docs files no self-containment check covers (add them to DOC_AREAS): {missing}"


@pytest.mark.parametrize("area", ["annotated_llama", "tests", "bench", "scripts", ".ci"])
def test_source_is_self_contained(area):
    found = problems_in(_files(REPO / area))
    assert not found, "references to material outside the repository:\n" + "\n".join(found)


def test_every_arxiv_paper_is_in_the_references():
    references = (REPO / "docs" / "references.md").read_text()
    listed = set(re.findall(r"arxiv\.org/abs/(\d{4}\.\d{4,5})", references))
    missing = {}
    for path in _files(REPO / "docs"):
        if path.suffix != ".md" or path.parts[-2] == "seed":
            continue
        for paper in re.findall(r"arxiv\.org/abs/(\d{4}\.\d{4,5})", path.read_text()):
            if paper not in listed:
                missing.setdefault(paper, path.relative_to(REPO).as_posix())
    assert not missing, f"arXiv papers cited but not in docs/references.md: {missing}"
