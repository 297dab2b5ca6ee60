"""Instruction fine-tuning (Alpaca), full or LoRA, through THE training loop (train/loop.py).

Nothing here trains: this file wires Alpaca data (alpaca.py) and, for LoRA, a module swap plus a
trainable-parameter filter (lora.py) into `train.loop.train`, the same loop pretraining uses.
Full fine-tuning writes a checkpoint in our dir format; LoRA writes a PEFT-format adapter.

Defaults follow the published recipes: stanford_alpaca's train.py and README (weight decay 0,
cosine schedule, 3% warm-up, max length 512) and alpaca-lora for LoRA (r 8, alpha 16, dropout 0.05, q and v).
The learning rate has no single right default across sizes: 2e-5 is stanford_alpaca's for full
7B fine-tuning, 3e-4 alpaca-lora's for LoRA; small models want more.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.outputs import check_output
from ..data.alpaca import Batches, build_dataset, load_records
from ..transforms.lora import apply_lora, is_lora_parameter, save_adapter, trainable_fraction
from ..weights import load_model, save_model
from .loop import TrainConfig, train


@dataclass
class FinetuneConfig:
    model: str  # base model: any checkpoint load_model reads
    data: str  # Alpaca records: a JSON list or JSON Lines file
    out: str  # output dir (an adapter with `lora`, else a checkpoint); never `model` itself
    lora: bool = False  # train a LoRA adapter instead of all weights
    lora_r: int = 8  # rank of each adapter (alpaca-lora: 8)
    lora_alpha: float = 16.0  # adapter scale alpha / r (alpaca-lora: 16)
    lora_dropout: float = 0.05  # dropout on the adapter's input (alpaca-lora: 0.05)
    lora_targets: str = "wq,wv"  # comma-separated wq,wk,wv,wo,w1,w2,w3 (or HF names), or 'all'
    max_steps: int | None = None  # optimizer steps; None: `epochs` passes over the data
    epochs: float = 3.0  # passes over the data, when `max_steps` is not given (stanford_alpaca: 3)
    batch_size: int = 4  # records per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float | None = None  # peak learning rate; None: 3e-4 with LoRA, 2e-5 without
    warmup_ratio: float = 0.03  # linear warm-up over this fraction of the steps, then cosine to 0
    weight_decay: float = 0.0  # AdamW's (stanford_alpaca: 0)
    max_len: int = 512  # tokens per record (prompt + output + EOS); longer ones are truncated
    seed: int = 0  # data order and the adapters' initialisation follow from it
    dtype: str = "bfloat16"  # the loop's autocast dtype; weights stay as loaded
    device: str = "cpu"  # cpu, cuda or cuda:N
    log_every: int = 10  # steps between log.jsonl records
    template: str = "alpaca"  # prompt template
    progress: bool = True  # a tqdm bar when stderr is a terminal
    # steps between checkpoints (with LoRA, each holds the adapter and its optimizer state only);
    # 0: only at the end
    ckpt_every: int = 0
    resume: bool = False  # continue from the newest checkpoint in `out` (the loop's exact resume)
    allow_changed: bool = False  # resume even if run-defining settings changed (they are named otherwise)
    force: bool = False  # replace a run or model already in `out` (never `model` itself: refused)


def run_flags(cfg: FinetuneConfig, max_steps: int, lr: float) -> dict:
    """What defines a fine-tuning run, as its flags (the loop compares them on --resume): the base
    model's path, the data's content (sha256), and every setting that changes the updates."""
    flags = {"--model": str(Path(cfg.model).resolve()),
             "--data": hashlib.sha256(Path(cfg.data).read_bytes()).hexdigest(), "--lora": cfg.lora,
             "--max-steps": max_steps, "--lr": lr}
    names = ["batch_size", "grad_accum", "warmup_ratio", "weight_decay", "max_len", "seed", "dtype", "template"]
    if cfg.lora:
        names += ["lora_r", "lora_alpha", "lora_dropout", "lora_targets"]
    return {**flags, **{"--" + n.replace("_", "-"): getattr(cfg, n) for n in names}}


def train_config(cfg: FinetuneConfig, max_steps: int, lr: float) -> TrainConfig:
    """The loop's config: every field the two configs share by name passes through; written out
    are only those that differ (steps from epochs, warm-up from a ratio, out -> out_dir...)."""
    shared = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(cfg, f.name)}
    return TrainConfig(**{
        **shared, "out_dir": str(cfg.out), "max_steps": max_steps, "lr": lr,
        "min_lr_ratio": 0.0,  # stanford_alpaca: cosine to 0
        "warmup_steps": max(1, round(cfg.warmup_ratio * max_steps)), "keep_checkpoints": 1,
        "overwrite": cfg.force, "run": run_flags(cfg, max_steps, lr)})


def own_weights(model):
    """Copy parameters that may still be memory-mapped from the checkpoint file (load_model maps
    them lazily), so in-place updates can never reach the user's weights on disk."""
    for p in model.parameters():
        p.data = p.data.clone()
    return model


def finetune(cfg: FinetuneConfig) -> dict:
    """Fine-tune; returns the loop's result plus the data and parameter counts."""

    if cfg.template != "alpaca":
        raise ValueError(f"--template {cfg.template!r}: only 'alpaca' is supported for fine-tuning")
    if cfg.batch_size < 1 or cfg.grad_accum < 1:
        raise ValueError("--batch-size and --grad-accum must be at least 1")
    out = Path(cfg.out)
    if out.is_file():
        raise NotADirectoryError(f"--out {out}: is a file; the output is a directory")
    check_output(out, force=cfg.force, resume=cfg.resume, inputs=[cfg.model, cfg.data])
    # Check the data before loading the model: a bad record stops the run before any training.
    records = load_records(cfg.data)
    model, tokenizer = load_model(cfg.model)
    if tokenizer is None:
        raise FileNotFoundError(f"--model {cfg.model}: no tokenizer.model beside the weights")
    model = own_weights(model.float().to(cfg.device))  # train in float32 (autocast does the bf16 matmuls)
    max_len = min(cfg.max_len, model.params.max_seq_len)
    dataset = build_dataset(tokenizer, records, max_len)
    print(f"data: {len(records)} records -> {dataset.summary()} (max length {max_len})", file=sys.stderr)
    pad_id = tokenizer.pad_id if tokenizer.pad_id >= 0 else tokenizer.eos_id
    batches = Batches(dataset, cfg.batch_size, cfg.seed, pad_id)

    if cfg.lora:
        # seeded here, right before the adapters are made: lora_A's random init is then a function
        # of --seed alone, so two runs with one seed write byte-identical adapters
        torch.manual_seed(cfg.seed)
        apply_lora(model, cfg.lora_targets, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout)
        trainable = is_lora_parameter
    else:
        trainable = None
    n_train, n_total = trainable_fraction(model) if cfg.lora else (sum(p.numel() for p in model.parameters()),) * 2
    print(f"trainable parameters: {n_train:,} of {n_total:,} ({100 * n_train / n_total:.3f}%)", file=sys.stderr)

    steps_per_epoch = max(1, batches.per_epoch // cfg.grad_accum)
    max_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    lr = cfg.lr if cfg.lr is not None else (3e-4 if cfg.lora else 2e-5)
    train_cfg = train_config(cfg, max_steps, lr)

    def write_files(d: Path):  # into each checkpoint: an adapter, or what load_model needs
        if cfg.lora:
            save_adapter(model, d, base_model_name_or_path=str(cfg.model))
        else:
            (d / "params.json").write_text(json.dumps(model.params.to_params_json(), indent=2))
            (d / "tokenizer.model").write_bytes(tokenizer.model_bytes())

    t0 = time.perf_counter()
    result = train(model, batches, train_cfg, trainable=trainable, write_files=write_files)
    elapsed = time.perf_counter() - t0
    if cfg.lora:
        save_adapter(model, out, base_model_name_or_path=str(cfg.model))
    else:
        save_model(model, tokenizer, out, format="ours")
    return {**result, "finetune_s": elapsed, "trainable_params": n_train, "total_params": n_total,
            "examples": len(dataset.examples), "truncated": dataset.n_truncated, "dropped": dataset.n_dropped,
            "epochs": max_steps * cfg.grad_accum / batches.per_epoch}
