"""The rule of every command that writes: nothing of the user's is overwritten or lost.

  - an output that exists (a file, or a directory with anything in it) is refused unless --force;
  - an output is never one of the command's own inputs, nor a directory holding one, even with
    --force (`finetune --model DIR --out DIR` once replaced the base model's weights);
  - outputs are written under a temporary name beside their place and renamed into it, so an
    interrupted command leaves the old output or the new one, never half of either (`replacing`).

Each writing command calls `check_output` before it loads or computes anything.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path


def exists(path: Path) -> bool:
    """A file, or a directory that is not empty (an empty one is there to be filled)."""
    path = Path(path)
    if path.is_symlink() or path.is_file():
        return True
    return path.is_dir() and any(path.iterdir())


def _same_or_inside(inner: Path, outer: Path) -> bool:
    # resolve(): symlinks and `..` point where they lead; samefile: hard links of one file
    a, b = inner.resolve(), outer.resolve()
    if a == b or b in a.parents:
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_output(out, *, force: bool = False, inputs=(), flag: str = "--out", resume: bool | None = None) -> Path:
    """Refuse `out` if it is (or holds) one of `inputs`, or if it exists and neither `force` nor
    `resume` is set (resume=None: the command cannot resume). Returns out as a Path. Raises
    FileExistsError/ValueError with one line."""
    out = Path(out)
    for inp in inputs:
        if inp is None:
            continue
        if _same_or_inside(Path(inp), out):
            what = "is" if Path(inp).resolve() == out.resolve() else "holds"
            raise ValueError(f"{flag} {out}: {what} this command's input {inp}; an input is never written over "
                             "(not even with --force): choose another output")
    if exists(out) and not force and not resume:
        how = "pass --resume to continue the run in it, or --force" if resume is not None else "pass --force"
        raise FileExistsError(f"{flag} {out}: already exists; {how} to replace it")
    return out


@contextlib.contextmanager
def replacing(out, *, directory: bool):
    """`with replacing(OUT, directory=True) as tmp:` write into tmp; on success tmp takes OUT's
    place (an old OUT is moved aside first and deleted only once the new one is there); on an
    error OUT is untouched and tmp removed."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    _remove(tmp)
    if directory:
        tmp.mkdir()
    try:
        yield tmp
        if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
            out.rmdir()
        if os.path.lexists(out):
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            _remove(old)
            os.replace(out, old)
            os.replace(tmp, out)
            _remove(old)
        else:
            os.replace(tmp, out)
    finally:
        _remove(tmp)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        path.unlink()
