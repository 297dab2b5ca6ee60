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
a temporary dir that resume ignores (and removes), never a half-written `ckpt-*`.
"""

from __future__ import annotations

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


def save_checkpoint(out_dir, step: int, model_state: dict, train_state: dict, write_files=None,
                    keep: int = 2) -> Path:
    """Write OUT/ckpt-{step} atomically; `write_files(tmp_dir)` adds model-specific files
    (params.json, tokenizer.model, an adapter...). Keeps the newest `keep` checkpoints."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    final = out / ckpt_name(step)
    tmp = out / f".tmp-{ckpt_name(step)}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model_state.items()}
    save_file(tensors, tmp / "model.safetensors")
    torch.save(train_state, tmp / "train_state.pt")
    if write_files is not None:
        write_files(tmp)
    for f in tmp.iterdir():
        _fsync(f)
    _fsync(tmp)
    if final.exists():  # the same step saved again (a resumed run): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync(out)
    for _, old in list_checkpoints(out)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path) -> tuple[dict, dict]:
    """(model state dict, train state) of a checkpoint dir."""
    path = Path(path)
    model_state = load_file(path / "model.safetensors")
    train_state = torch.load(path / "train_state.pt", map_location="cpu", weights_only=True)
    return model_state, train_state
