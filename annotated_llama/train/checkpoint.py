"""Training checkpoints: written atomically, the last k kept, the newest complete one found on resume.

A checkpoint is a directory OUT/ckpt-0000NNN holding
  model.safetensors   every tensor of the model's state dict, float32, at their state-dict names
                      (for a plain Transformer these are Meta's names, so with params.json and
                      tokenizer.model written by the caller's hook the dir loads in `load_model`);
  train_state.pt      optimizer state, the step to run next, tokens seen, elapsed time and the
                      run's config: plain tensors, numbers and strings, read back with
                      torch.load(weights_only=True), never an arbitrary pickle.
It is first written under a temporary name (OUT/.tmp-ckpt-NNN-PID), each file fsync'ed, and only
then renamed into place: a process killed at any moment leaves either a complete checkpoint or
a temporary dir that resume ignores (and removes), never a half-written `ckpt-*`. A full disk
while writing is one line of error, the temporary dir removed, the previous checkpoint kept.
On resume, each checkpoint is read back whole, newest first: a truncated or corrupt one (a
disk that failed, a copy cut short) is named and skipped for the newest one that loads.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

CKPT_RE = re.compile(r"^ckpt-(\d{7})$")


def ckpt_name(step: int) -> str:
    return f"ckpt-{step:07d}"


def list_checkpoints(out_dir) -> list[tuple[int, Path]]:
    """Complete checkpoints in OUT, oldest first."""
    out = Path(out_dir)
    if not out.is_dir():
        return []
    found = []
    for p in out.iterdir():
        m = CKPT_RE.match(p.name)
        if m and p.is_dir() and (p / "train_state.pt").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(out_dir) -> Path | None:
    found = list_checkpoints(out_dir)
    return found[-1][1] if found else None


def remove_stale_temporaries(out_dir):
    for p in Path(out_dir).glob(".tmp-ckpt-*"):
        shutil.rmtree(p, ignore_errors=True)


def _fsync(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _free_bytes(path: Path) -> int | None:
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def _is_disk_full(e: BaseException, out: Path) -> bool:
    # The writers report a full disk each in their own way: OSError ENOSPC/EDQUOT from Python,
    # "No space left on device" inside safetensors' SafetensorError, and torch.save's
    # "PytorchStreamWriter failed writing file", which names no cause (then: is the disk full?)
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e)
    if "No space left" in text or "os error 28" in text or "code: 28" in text or "StorageFull" in text:
        return True
    free = _free_bytes(out)
    return "failed writing" in text and free is not None and free < (1 << 20)


def _oserror(code, message: str) -> OSError:
    e = OSError(message)  # str(e) is the message alone, not "[Errno 28] ..."
    e.errno = code
    return e


def save_checkpoint(out_dir, step: int, model_state: dict, train_state: dict, write_files=None,
                    keep: int = 2) -> Path:
    """Write OUT/ckpt-{step} atomically; `write_files(tmp_dir)` adds model-specific files
    (params.json, tokenizer.model, an adapter...). Keeps the newest `keep` checkpoints.

    A write that fails (a full disk above all) removes its temporary dir and raises OSError in
    one line; the checkpoints already there are untouched."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    final = out / ckpt_name(step)
    tmp = out / f".tmp-{ckpt_name(step)}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model_state.items()}
        save_file(tensors, tmp / "model.safetensors")
        torch.save(train_state, tmp / "train_state.pt")
        if write_files is not None:
            write_files(tmp)
        for f in tmp.iterdir():
            _fsync(f)
        _fsync(tmp)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(out)
        kept = f"; {previous.name} is kept" if previous is not None else ""
        if _is_disk_full(e, out):
            raise _oserror(errno.ENOSPC, f"disk full writing {final}{kept}") from None
        if isinstance(e, OSError):
            raise _oserror(e.errno, f"cannot write {final} ({e.strerror or e}){kept}") from None
        raise
    if final.exists():  # the same step saved again (a resumed run): replace it, old one aside first
        old = out / f".tmp-old-{ckpt_name(step)}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync(out)
    for _, old in list_checkpoints(out)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_train_checkpoint(path) -> tuple[dict, dict]:
    """(model state dict, train state) of a checkpoint dir; ValueError in one line, naming the
    file, if it is truncated or corrupt."""
    path = Path(path)
    try:
        model_state = load_file(path / "model.safetensors")
    except Exception as e:  # SafetensorError: a truncated or overwritten file
        raise ValueError(f"{path / 'model.safetensors'}: unreadable ({_first_line(e)})") from None
    try:
        train_state = torch.load(path / "train_state.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickled objects (refused by weights_only)
        raise ValueError(f"{path / 'train_state.pt'}: unreadable ({_first_line(e)})") from None
    if not isinstance(train_state, dict) or not {"step", "tokens", "elapsed_s", "optimizer"} <= set(train_state):
        raise ValueError(f"{path / 'train_state.pt'}: not a training state (step, tokens, optimizer missing)")
    match = CKPT_RE.match(path.name)
    if match and int(match.group(1)) != train_state["step"]:
        raise ValueError(f"{path / 'train_state.pt'}: holds step {train_state['step']}, not {int(match.group(1))}")
    return model_state, train_state


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:120]


def newest_intact_checkpoint(out_dir) -> tuple[Path | None, dict, dict, list[str]]:
    """(path, model state, train state, problems) of the newest checkpoint in OUT that loads;
    `problems` names each newer one that did not, and why. (None, {}, {}, problems) if none loads."""
    problems = []
    for _, path in reversed(list_checkpoints(out_dir)):
        try:
            model_state, train_state = load_train_checkpoint(path)
        except ValueError as e:
            problems.append(str(e))
            continue
        return path, model_state, train_state, problems
    return None, {}, {}, problems
