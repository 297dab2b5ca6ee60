"""Keep the Annotated LLaMA chapters in step with the code, and turn them into notebooks.

    python docs/build.py           refresh every source excerpt (and the index's chapter list) in place
    python docs/build.py FILE...   only these chapters;  --index: only the index
    python docs/build.py --check   change nothing; exit 1 and list stale or broken excerpts (CI);
                                   an out-of-date index is only noted
    python docs/build.py --notebook CHAPTER [--out FILE.ipynb] [--execute] [--force]
                                   the chapter as a Jupyter notebook (jupytext reads the Markdown;
                                   only the blocks the tests run become code cells); --execute runs
                                   it in a Jupyter kernel first and saves the outputs; an existing
                                   FILE.ipynb is refused without --force

Chapters are docs/paper/NN_*.md (Part I, the annotated paper) and docs/annotated/NN_*.md
(Part II, running LLaMA).

A source excerpt is a marker line followed by a ```python source block:

    <!-- source: annotated_llama/core/model.py::RMSNorm -->
    ```python source
    ...filled in from the code...
    ```

The reference is a file path relative to the repository root, `::`, and the name of a top-level
function, class or assignment (`PRESETS`), or `Class.method`. Excerpts are found with `ast`, so a
renamed or deleted object is an error, never a stale copy. tests/test_docs.py imports this module:
the parser here is the one the tests use.
"""

from __future__ import annotations

import argparse
import ast
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PARTS = {  # directory -> the part of the site it is
    REPO / "docs" / "paper": "Part I: the annotated paper",
    REPO / "docs" / "annotated": "Part II: running LLaMA",
}
CHAPTER_DIRS = list(PARTS)
INDEX = REPO / "docs" / "index.md"
CHAPTER_RE = re.compile(r"^\d\d_[a-z0-9_]+\.md$")
MARKER_RE = re.compile(r"^<!--\s*source:\s*(\S+?)::(\S+?)\s*-->\s*$")
FENCE_RE = re.compile(r"^(`{3,})(.*)$")

INDEX_BEGIN, INDEX_END = "<!-- chapters: filled by docs/build.py -->", "<!-- /chapters -->"


@dataclass
class Block:
    """One fenced block of a chapter. Line numbers are 1-based lines of the Markdown file."""
    lang: str  # "python", "text", "bash", ... ("" for a bare fence)
    flags: tuple  # the words after the language: ("no-run",), ("source",)
    fence_line: int  # the opening ``` line
    code_line: int  # the first line of the content
    end_line: int  # the closing ``` line
    code: str  # the content, with a final newline when not empty
    source_ref: str | None = None  # "path::Name" when a source marker precedes the block
    marker_line: int | None = None
    follows_prev: bool = False  # only blank lines separate it from the previous block

    @property
    def runs(self) -> bool:
        return self.lang == "python" and not self.flags


def chapters(directories=None) -> list[Path]:
    """Every chapter, part by part, in reading order."""
    dirs = CHAPTER_DIRS if directories is None else ([directories] if isinstance(directories, Path) else directories)
    return [p for d in dirs for p in sorted(d.glob("*.md")) if CHAPTER_RE.match(p.name)]


def parse_blocks(text: str, name: str = "<chapter>") -> list[Block]:
    """The fenced blocks of a Markdown text, with their source markers. Raises ValueError
    (naming the file and line) on an unclosed fence or a marker without its block."""
    lines = text.split("\n")
    blocks: list[Block] = []
    pending_marker: tuple[str, int] | None = None  # (ref, line) waiting for its ```python source
    last_end = None  # index of the previous block's closing line
    i = 0
    while i < len(lines):
        line = lines[i]
        m = MARKER_RE.match(line.strip())
        if m:
            if pending_marker:
                raise ValueError(f"{name}:{pending_marker[1]}: source marker without a ```python source block")
            pending_marker = (f"{m.group(1)}::{m.group(2)}", i + 1)
            i += 1
            continue
        f = FENCE_RE.match(line)
        if not f:
            if line.strip() and pending_marker and i + 1 > pending_marker[1]:
                raise ValueError(f"{name}:{pending_marker[1]}: source marker must be followed by a "
                                 f"```python source block (found text on line {i + 1})")
            i += 1
            continue
        ticks, words = f.group(1), f.group(2).split()
        lang, flags = (words[0], tuple(words[1:])) if words else ("", ())
        j = i + 1
        while j < len(lines) and lines[j].rstrip() != ticks:
            j += 1
        if j == len(lines):
            raise ValueError(f"{name}:{i + 1}: code fence {ticks}{f.group(2)} is never closed")
        body = lines[i + 1:j]
        follows = last_end is not None and all(not s.strip() for s in lines[last_end + 1:i])
        block = Block(lang, flags, i + 1, i + 2, j + 1, "".join(s + "\n" for s in body), follows_prev=follows)
        if pending_marker:
            if (lang, flags) != ("python", ("source",)):
                raise ValueError(f"{name}:{pending_marker[1]}: source marker must be followed by a "
                                 f"```python source block, found ```{f.group(2)} on line {i + 1}")
            block.source_ref, block.marker_line = pending_marker
            pending_marker = None
        elif (lang, flags) == ("python", ("source",)):
            raise ValueError(f"{name}:{i + 1}: ```python source block without a <!-- source: path::Name --> marker")
        blocks.append(block)
        last_end = j
        i = j + 1
    if pending_marker:
        raise ValueError(f"{name}:{pending_marker[1]}: source marker without a ```python source block")
    return blocks


def extract_source(ref: str, repo: Path = REPO) -> str:
    """The current source text of `path::Name` (decorators included; methods dedented).
    Raises LookupError naming the reference when the file or the object is missing."""
    path_s, _, qualname = ref.partition("::")
    path = repo / path_s
    if not path.is_file():
        raise LookupError(f"{ref}: file {path_s} does not exist")
    src = path.read_text()
    tree = ast.parse(src, filename=str(path))
    scope, node = tree.body, None
    parts = qualname.split(".")
    for k, part in enumerate(parts):
        node = next((n for n in scope if _defines(n, part)), None)
        if node is None:
            where = path_s if k == 0 else f"{path_s}::{'.'.join(parts[:k])}"
            raise LookupError(f"{ref}: {part!r} is not defined at the top level of {where}")
        scope = getattr(node, "body", [])
    first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
    lines = src.split("\n")[first - 1:node.end_lineno]
    return textwrap.dedent("\n".join(lines)).rstrip() + "\n"


def _defines(node: ast.AST, name: str) -> bool:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return node.name == name
    if isinstance(node, ast.Assign):
        return any(isinstance(t, ast.Name) and t.id == name for t in node.targets)
    if isinstance(node, ast.AnnAssign):
        return isinstance(node.target, ast.Name) and node.target.id == name
    return False


def refresh_text(text: str, name: str, repo: Path = REPO) -> tuple[str, list[str]]:
    """(text with every excerpt replaced by the current source, problems found)."""
    problems: list[str] = []
    lines = text.split("\n")
    # Replace from the bottom up so earlier line numbers stay valid.
    for block in reversed(parse_blocks(text, name)):
        if block.source_ref is None:
            continue
        try:
            new = extract_source(block.source_ref, repo)
        except (LookupError, SyntaxError) as e:
            problems.append(f"{name}:{block.marker_line}: {e}")
            continue
        if new != block.code:
            lines[block.code_line - 1:block.end_line - 1] = new.rstrip("\n").split("\n")
    return "\n".join(lines), problems


def committed(paths: list[Path]) -> list[Path]:
    """The paths git tracks (the index is committed, so it links only committed chapters);
    all of them outside a git checkout."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--", *map(str, paths)], cwd=REPO, capture_output=True,
                             check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return paths
    tracked = {(REPO / name).resolve() for name in out.decode().split("\0") if name}
    return [p for p in paths if p.resolve() in tracked]


def title_of(path: Path) -> str:
    return next((ln[2:].strip() for ln in path.read_text().split("\n") if ln.startswith("# ")), path.stem)


def index_listing(directories=None) -> str:
    """The chapter list of index.md: each part's committed chapters, linked, in order."""
    dirs = CHAPTER_DIRS if directories is None else directories
    out = []
    for d in dirs:
        written = committed(chapters([d]))
        if not written:
            continue
        out.append(f"**{PARTS.get(d, d.name)}**\n")
        for k, p in enumerate(written, 1):  # numbered within the part (file numbers may have gaps)
            rel = p.relative_to(INDEX.parent) if p.is_relative_to(INDEX.parent) else p
            out.append(f"{k}. [{title_of(p)}]({rel.as_posix()})")
        out.append("")
    return "\n".join(out).rstrip("\n")


def refresh_index(text: str, directories=None) -> str:
    if INDEX_BEGIN not in text or INDEX_END not in text:
        raise ValueError(f"index.md: the markers {INDEX_BEGIN} and {INDEX_END} are missing")
    head, rest = text.split(INDEX_BEGIN, 1)
    _, tail = rest.split(INDEX_END, 1)
    return f"{head}{INDEX_BEGIN}\n{index_listing(directories)}\n{INDEX_END}{tail}"


# ---- notebooks ---------------------------------------------------------------------------------

def notebook_markdown(text: str, name: str = "<chapter>") -> str:
    """The chapter's Markdown with every fenced block that the tests do not run (excerpts, no-run
    blocks, shell commands, expected output) wrapped in jupytext's region markers, so that jupytext
    makes code cells of exactly the blocks that run."""
    lines = text.split("\n")
    for block in reversed(parse_blocks(text, name)):
        if block.runs:
            continue
        first = (block.marker_line or block.fence_line) - 1  # keep a source marker with its excerpt
        lines[block.end_line:block.end_line] = ["<!-- #endregion -->"]
        lines[first:first] = ["<!-- #region -->"]
    return "\n".join(lines)


def notebook(path: Path):
    """The chapter as an nbformat notebook. Each code cell carries the chapter's expected output
    (the ```text block after it, if any) in its metadata as `expected_output`."""
    import jupytext  # the docs/dev extra

    text = path.read_text()
    name = _display(path)
    nb = jupytext.reads(notebook_markdown(text, name), fmt="md")
    blocks = parse_blocks(text, name)
    expected = []
    for i, b in enumerate(blocks):
        if b.runs:
            nxt = blocks[i + 1] if i + 1 < len(blocks) else None
            expected.append(nxt.code if nxt is not None and nxt.lang == "text" and nxt.follows_prev else None)
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    if len(code_cells) != len(expected):
        raise ValueError(f"{name}: jupytext made {len(code_cells)} code cells from {len(expected)} python blocks")
    for cell, want in zip(code_cells, expected):
        cell.metadata = {"expected_output": want} if want is not None else {}
    nb.metadata = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
                   "language_info": {"name": "python"}}
    return nb


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 when anything is stale")
    ap.add_argument("--index", action="store_true", help="refresh only index.md's chapter list")
    ap.add_argument("--notebook", type=Path, metavar="CHAPTER", help="write CHAPTER as a Jupyter notebook")
    ap.add_argument("--out", type=Path, help="with --notebook: the .ipynb to write (default: beside the chapter)")
    ap.add_argument("--execute", action="store_true",
                    help="with --notebook: run it in a Jupyter kernel (nbclient) and save its outputs")
    ap.add_argument("--force", action="store_true", help="with --notebook: overwrite an existing .ipynb")
    ap.add_argument("files", nargs="*", type=Path, help="chapters to process (default: every chapter)")
    args = ap.parse_args(argv)
    if args.notebook is not None:
        return write_notebook(args.notebook, args.out, execute=args.execute, force=args.force)
    if args.execute or args.force or args.out:
        ap.error("--out, --execute and --force go with --notebook")
    files = [] if args.index else (args.files or chapters())
    stale, problems = [], []
    for path in files:
        name = _display(path)
        try:
            text = path.read_text()
            new, found = refresh_text(text, name)
        except (OSError, ValueError) as e:
            problems.append(str(e) if isinstance(e, ValueError) else f"{name}: {e}")
            continue
        problems += found
        if new != text:
            stale.append(f"{name}: source excerpts differ from the code")
            if not args.check:
                _write(path, new)
    index = INDEX
    if not args.files and index.is_file():
        text = index.read_text()
        try:
            new = refresh_index(text)
        except ValueError as e:
            problems.append(str(e))
            new = text
        if new != text:
            if args.check:  # not an error: a new chapter by anyone makes the list stale
                print(f"note: {_display(index)}: the chapter list is out of date", file=sys.stderr)
            else:
                _write(index, new)
                print(f"refreshed: {_display(index)}")
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    for s in stale:
        print(("stale: " if args.check else "refreshed: ") + s, file=sys.stderr if args.check else sys.stdout)
    if args.check and stale:
        print("run `python docs/build.py` to refresh", file=sys.stderr)
    return 1 if problems or (args.check and stale) else 0


def write_notebook(chapter: Path, out: Path | None, execute: bool = False, force: bool = False) -> int:
    if not chapter.is_file():
        print(f"error: {chapter}: no such chapter", file=sys.stderr)
        return 2
    out = out or chapter.with_suffix(".ipynb")
    if out.exists() and not force:
        print(f"error: {out}: already exists (--force overwrites it)", file=sys.stderr)
        return 2
    try:
        import nbformat
        nb = notebook(chapter)
    except ImportError as e:
        print(f"error: --notebook needs jupytext and nbformat (pip install -e .[docs]): {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if execute:
        summary = execute_notebook(nb, out.resolve().parent)
        if summary.startswith("error: "):
            print(f"{summary} (nothing written)", file=sys.stderr)
            return 1
        print(f"{_display(chapter)}: {summary}")
    _write(out, nbformat.writes(nb))
    print(f"wrote {_display(out)}")
    return 0


def execute_notebook(nb, workdir: Path) -> str:
    """Run `nb` in a python3 Jupyter kernel with `workdir` as its working directory, keeping the outputs.
    Returns a one-line summary, starting with "error: " when a cell raised or nbclient is missing."""
    try:
        from nbclient import NotebookClient
        from nbclient.exceptions import CellExecutionError
    except ImportError as e:
        return f"error: --execute needs nbclient and ipykernel (pip install -e .[docs]): {e}"
    try:
        NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}).execute()
    except CellExecutionError as e:
        return f"error: a cell raised {e.ename}: {e.evalue}"
    cells = [c for c in nb.cells if c.cell_type == "code"]
    compared = [c for c in cells if c.metadata.get("expected_output") is not None]
    same = sum(_stdout(c) == _lines(c.metadata["expected_output"]) for c in compared)
    return f"{len(cells)} cells ran; {same} of {len(compared)} printed what the chapter shows"


def _stdout(cell) -> list[str]:
    return _lines("".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream" and o.name == "stdout"))


def _lines(text: str) -> list[str]:
    lines = [ln.rstrip() for ln in text.split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def _write(path: Path, text: str):
    tmp = path.with_name(path.name + ".tmp")  # never leave a half-written chapter
    tmp.write_text(text)
    tmp.replace(path)


if __name__ == "__main__":
    sys.exit(main())
