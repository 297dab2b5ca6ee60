"""THE training loop: pretraining and instruction fine-tuning (full or LoRA) both run through `train`.

Meta released LLaMA's inference code only; this is the recipe of the paper's section 2.3
("Optimizer") written out: AdamW (Loshchilov & Hutter 2017) with beta1 0.9, beta2 0.95, a cosine
learning-rate schedule decaying to 10% of the peak, weight decay 0.1, gradient clipping 1.0 and
2,000 warm-up steps (scaled down here for small runs); eps 1e-5 is Llama 2's (paper section 2.2).

API (kept stable; other modules call it):

    from annotated_llama.train.loop import TrainConfig, train
    result = train(model, batches, TrainConfig(out_dir="runs/x", max_steps=1000, lr=1e-3),
                   trainable=None, evaluate=None, write_files=None)

- `model`: an nn.Module whose `model(inputs, cache=False)` returns logits [B, T, V] (our
  Transformer), already on its device, and already wrapped for DDP/FSDP if running under torchrun
  (see annotated_llama.parallel.distributed). Rank 0 alone writes logs and checkpoints.
- `batches`: where micro-batches come from, each `(inputs[B,T], targets[B,T])` LongTensors with
  -100 marking target positions that carry no loss (prompt tokens, padding). Either a callable
  `batches(i)` for micro-batch number i = step * grad_accum + k (a pure function of i makes resume
  exact at no cost), or an iterable (on resume the consumed micro-batches are drawn and skipped).
- `cfg`: a `TrainConfig` (below); `cfg.out_dir` receives log.jsonl and ckpt-NNNNNNN dirs.
- `trainable(name, param) -> bool`: which parameters train (LoRA: only the adapters); the rest
  get requires_grad=False and no optimizer state. None: all parameters.
- `evaluate(model) -> dict`: called in eval mode under no_grad and the training autocast, every
  `eval_every` steps and at the end; must return {"val_loss": float, ...}; `val_ppl` is added
  as exp(val_loss) if missing. `token_loss_eval(batches)` builds one from fixed batches.
- `write_files(dir)`: writes model-specific files into each checkpoint dir before it is renamed
  into place (params.json and tokenizer.model for pretraining, an adapter for LoRA).
With `trainable`, a checkpoint holds only the trained tensors and their optimizer state (LoRA: the
adapters; the frozen base comes from where the caller loaded it). On resume (`cfg.resume`) the
newest checkpoint that reads back whole is used (damaged newer ones are named on stderr), and
`cfg.run` (the caller's run-defining flags; else RUN_FIELDS) must equal the checkpoint's unless
`cfg.allow_changed`. `cfg.overwrite` lets a new run replace another one's checkpoints in out_dir.
Returns {"step", "loss" (last training loss), "val_loss"?, "tokens", "elapsed_s", "checkpoint"}.

Loss: mean cross-entropy over non-ignored targets per micro-batch, divided by grad_accum.
Logged per `log_every` steps to OUT/log.jsonl: step (1-based count of optimizer steps done),
loss (mean over the interval's last step's micro-batches, averaged over ranks), lr, tokens_per_s,
mfu (model FLOPs, estimate_flops_per_token, over the peak of `cfg.peak_flops`), and per
evaluation val_loss and val_ppl.
Determinism: RNG (dropout) is reseeded from (seed, step, rank) before every step, so the RNG
state is a function of the schedule position and a resumed run repeats an uninterrupted one
exactly (bitwise on CPU).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from ..parallel import distributed as dist_utils
from .checkpoint import list_checkpoints, newest_intact_checkpoint, remove_stale_temporaries, save_checkpoint

# Matmul peaks measured on the 2-core Zen 4 CPU box this project is developed on (a 2048^3 square
# matmul on 2 threads); MFU is reported against these. On CUDA, H100 SXM dense peaks (NVIDIA datasheet).
PEAK_FLOPS = {("cpu", "bfloat16"): 410e9, ("cpu", "float32"): 170e9,
              ("cuda", "bfloat16"): 989e12, ("cuda", "float32"): 67e12}


@dataclass
class TrainConfig:
    out_dir: str  # run dir: log.jsonl and ckpt-NNNNNNN checkpoints
    max_steps: int = 1000  # optimizer steps (each of `grad_accum` micro-batches)
    lr: float = 3e-4  # peak learning rate (LLaMA 7B/13B: 3e-4, 33B/65B: 1.5e-4)
    min_lr_ratio: float = 0.1  # cosine decays to 10% of the peak (paper 2.3)
    warmup_steps: Optional[int] = None  # None: 5% of `max_steps`, at most the paper's 2,000
    weight_decay: float = 0.1  # AdamW's, on the weight matrices only (param_groups)
    beta1: float = 0.9  # AdamW's first-moment decay (paper 2.3)
    beta2: float = 0.95  # AdamW's second-moment decay (paper 2.3)
    eps: float = 1e-5  # AdamW's epsilon (Llama 2, paper 2.2)
    grad_clip: float = 1.0  # max global gradient norm (paper 2.3); 0 disables
    grad_accum: int = 1  # micro-batches per optimizer step
    dtype: str = "bfloat16"  # autocast dtype for matmuls ("float32": no autocast); weights stay float32
    device: str = "cpu"  # cpu, cuda or cuda:N
    seed: int = 0  # model init, data order and dropout all follow from it
    log_every: int = 10  # steps between log.jsonl records
    eval_every: int = 0  # steps between evaluations; 0: only at the end (if an evaluate function is given)
    ckpt_every: int = 0  # steps between checkpoints; 0: only at the end
    keep_checkpoints: int = 2  # newest checkpoints kept; older ones are removed
    resume: bool = False  # continue from the newest intact checkpoint in `out_dir`
    activation_checkpointing: bool = False  # recompute each block's activations in backward: less memory
    progress: bool = True  # a tqdm bar on rank 0 when stderr is a terminal
    flops_per_token: Optional[float] = None  # for MFU; None: not reported
    peak_flops: Optional[float] = None  # the hardware's peak FLOP/s, for MFU; None: PEAK_FLOPS for (device, dtype)
    # What defines the run, as {flag: value} (the caller's command-line flags: data, model,
    # batch size...); saved in each checkpoint and compared on resume. None: the schedule and
    # optimizer fields below (RUN_FIELDS) are compared instead.
    run: Optional[dict] = None
    allow_changed: bool = False  # resume even if `run` differs from the checkpoint's
    overwrite: bool = False  # start a new run in an out_dir holding another one (its checkpoints go)

    def __post_init__(self):
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"TrainConfig.dtype must be float32 or bfloat16, got {self.dtype!r}")
        for name in ("max_steps", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be at least 1, got {getattr(self, name)}")
        if self.warmup_steps is None:
            self.warmup_steps = max(1, min(2000, self.max_steps // 20))


# Fields that change what a run computes (its schedule, optimizer, data order): a resumed run must
# keep them, or it silently becomes another run (a changed --lr once diverged on resume).
RUN_FIELDS = ("max_steps", "lr", "min_lr_ratio", "warmup_steps", "weight_decay", "beta1", "beta2", "eps",
              "grad_clip", "grad_accum", "dtype", "seed")


# ---- schedule and optimizer ------------------------------------------------------------------

def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warm-up to the peak over
    warmup_steps (reaching it at step warmup-1), then cosine decay from the peak at step
    `warmup_steps` to min_lr_ratio * peak at step `max_steps`."""
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay the weight matrices of linear layers (>= 2-D) only. Not decayed: RMSNorm gains (1-D;
    pulling a gain to 0 switches a channel off) and the token embedding table (2-D, but a lookup:
    decay would shrink the rows of rare tokens each step whether or not they were seen)."""
    no_decay = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    decay, keep = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 and id(p) not in no_decay else keep).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]


def checkpoint_activations(model: nn.Module):
    """Recompute each transformer block's activations in the backward pass instead of storing
    them (Chen et al. 2016): memory per layer drops to its input, for ~1/3 more compute. The state
    dict is unchanged (the block's forward is wrapped in place, no wrapper module)."""
    for layer in dist_utils.unwrap(model).layers:
        inner = layer.forward
        layer.forward = lambda *a, _f=inner: checkpoint(_f, *a, use_reentrant=False)


# ---- evaluation ----------------------------------------------------------------------------

def token_loss(model, inputs, targets) -> tuple[torch.Tensor, int]:
    """(sum of token losses, number of counted tokens) for one batch."""
    logits = model(inputs, cache=False)  # (B, T, V) float32
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
    return loss, int((targets != -100).sum())


def token_loss_eval(batches) -> Callable[[nn.Module], dict]:
    """An `evaluate` for `train`: mean token loss over the fixed `batches` (a list, or a
    callable returning an iterable), and perplexity = exp(mean token loss)."""
    def evaluate(model):
        total, count = 0.0, 0
        for inputs, targets in (batches() if callable(batches) else batches):
            loss, n = token_loss(model, inputs.to(_device_of(model)), targets.to(_device_of(model)))
            total, count = total + float(loss.detach()), count + n
        val_loss = total / max(count, 1)
        return {"val_loss": val_loss, "val_ppl": math.exp(val_loss), "val_tokens": count}
    return evaluate


def _device_of(model):
    return next(model.parameters()).device


# ---- the loop ------------------------------------------------------------------------------

def train(model: nn.Module, batches, cfg: TrainConfig, *, trainable=None, evaluate=None, write_files=None) -> dict:
    rank, world = dist_utils.rank(), dist_utils.world_size()
    out = Path(cfg.out_dir)
    log_path = out / "log.jsonl"
    if rank == 0:
        _claim_out_dir(out, cfg)
    dist_utils.barrier()

    # -- parameters that train, optimizer --
    if trainable is not None:
        for name, p in dist_utils.unwrap(model).named_parameters():
            p.requires_grad_(bool(trainable(name, p)))
    if cfg.activation_checkpointing:
        checkpoint_activations(model)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                  eps=cfg.eps, foreach=False)  # one code path on every device: bitwise resume

    # -- resume: model, optimizer, schedule position --
    start_step, tokens_seen, elapsed = 0, 0, 0.0
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    trained = _trainable_names(model)
    ckpt = None
    if cfg.resume:
        ckpt, model_state, state, problems = newest_intact_checkpoint(out)
        if ckpt is None and problems:
            raise ValueError(f"--resume: no checkpoint in {out} loads ({problems[0]}); remove them to start over")
        if rank == 0:
            for problem in problems:
                print(f"skipping a damaged checkpoint: {problem}", file=sys.stderr)
    if cfg.resume and ckpt is None and rank == 0:
        _truncate_log(log_path, 0)  # killed before its first checkpoint: start over
    if ckpt is not None:
        _check_same_run(ckpt, state, cfg, rank)
        partial = bool(state.get("trainable_only"))
        if partial and set(model_state) != trained:
            raise ValueError(f"{ckpt}: holds {len(model_state)} trained tensors, but this run trains "
                             f"{len(trained)} (another LoRA configuration?)")
        set_model_state_dict(model, model_state, options=StateDictOptions(full_state_dict=True, strict=not partial))
        set_optimizer_state_dict(model, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
        start_step, tokens_seen, elapsed = state["step"], state["tokens"], state["elapsed_s"]
        if rank == 0:
            _truncate_log(log_path, start_step)
            print(f"resuming from {ckpt} at step {start_step}", file=sys.stderr)
    dist_utils.barrier()

    # -- data position --
    if callable(batches):
        draw = batches
    else:
        iterator = iter(batches)
        for _ in range(start_step * cfg.grad_accum):
            next(iterator)
        draw = lambda i: next(iterator)  # noqa: E731

    device_type = torch.device(cfg.device).type
    autocast = (torch.autocast(device_type, dtype=torch.bfloat16) if cfg.dtype == "bfloat16"
                else contextlib.nullcontext())
    peak = cfg.peak_flops or PEAK_FLOPS.get((device_type, cfg.dtype))
    show_bar = cfg.progress and rank == 0 and sys.stderr.isatty()
    bar = tqdm(total=cfg.max_steps, initial=start_step, disable=not show_bar, unit="step", dynamic_ncols=True)

    def run_eval(step: int) -> dict:
        model.eval()
        with torch.no_grad(), autocast:
            metrics = evaluate(model)
        model.train()
        metrics.setdefault("val_ppl", math.exp(metrics["val_loss"]))
        return {"step": step, **metrics}

    def save(step: int):
        model_state = get_model_state_dict(model, options=full)
        if trainable is not None:  # LoRA: the adapters; the frozen base is the --model it started from
            model_state = {k: v for k, v in model_state.items() if k in trained}
        optim_state = get_optimizer_state_dict(model, optimizer, options=full)
        if rank == 0:
            state = {"step": step, "tokens": tokens_seen, "elapsed_s": elapsed + time.perf_counter() - t_start,
                     "optimizer": optim_state, "config": dataclasses.asdict(cfg), "world_size": world,
                     "trainable_only": trainable is not None}
            save_checkpoint(out, step, model_state, state, write_files, keep=cfg.keep_checkpoints)
        dist_utils.barrier()

    model.train()
    loss_value, last_eval, record = float("nan"), None, None
    t_start = t_interval = time.perf_counter()
    tokens_interval = 0
    for step in range(start_step, cfg.max_steps):
        torch.manual_seed(cfg.seed * 1_000_003 + step * 1009 + rank)  # dropout et al.: a function of the step
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros(())
        for k in range(cfg.grad_accum):
            inputs, targets = draw(step * cfg.grad_accum + k)
            inputs, targets = inputs.to(cfg.device), targets.to(cfg.device)
            sync = k == cfg.grad_accum - 1
            with dist_utils.no_sync(model, sync):  # forward and backward both inside
                with autocast:
                    logits = model(inputs, cache=False)  # (B, T, V) float32
                loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
                (loss / cfg.grad_accum).backward()
            loss_sum += loss.detach().cpu() / cfg.grad_accum
            tokens_interval += inputs.numel() * world
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = dist_utils.mean_over_ranks(loss_sum)
        tokens_seen += cfg.grad_accum * inputs.numel() * world
        done = step + 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")

        if done % cfg.log_every == 0 or done == cfg.max_steps:
            now = time.perf_counter()
            tps = tokens_interval / max(now - t_interval, 1e-9)
            record = {"step": done, "loss": loss_value, "lr": lr, "tokens": tokens_seen, "tokens_per_s": round(tps, 1)}
            if cfg.flops_per_token and peak:
                record["mfu"] = round(cfg.flops_per_token * tps / peak, 5)
            _log(log_path, record, rank)
            t_interval, tokens_interval = time.perf_counter(), 0
        if evaluate is not None and ((cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.max_steps):
            last_eval = run_eval(done)
            _log(log_path, last_eval, rank)
            t_interval = time.perf_counter()  # evaluation time is not training throughput
        if (cfg.ckpt_every and done % cfg.ckpt_every == 0) or done == cfg.max_steps:
            save(done)
            t_interval = time.perf_counter()
    bar.close()
    result = {"step": cfg.max_steps, "loss": loss_value, "tokens": tokens_seen,
              "elapsed_s": elapsed + time.perf_counter() - t_start, "checkpoint": str(out / f"ckpt-{cfg.max_steps:07d}")}
    if last_eval is not None:
        result.update({k: v for k, v in last_eval.items() if k != "step"})
    return result


# ---- run directory and log -------------------------------------------------------------------

def _claim_out_dir(out: Path, cfg: TrainConfig):
    """Refuse to train into a dir that holds another run unless resuming it (or, with
    cfg.overwrite, replacing it: its checkpoints and log are removed); never overwrite."""
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    has_run = bool(list_checkpoints(out)) or (out / "log.jsonl").exists()
    if has_run and not cfg.resume:
        if not cfg.overwrite:
            raise FileExistsError(f"{out}: holds another run's checkpoints/log.jsonl; pass --resume to continue it, "
                                  "--force to replace it, or choose another --out")
        for _, ckpt in list_checkpoints(out):
            shutil.rmtree(ckpt)
        (out / "log.jsonl").unlink(missing_ok=True)


def _trainable_names(model: nn.Module) -> set[str]:
    return {name for name, p in dist_utils.unwrap(model).named_parameters() if p.requires_grad}


def _check_same_run(ckpt: Path, state: dict, cfg: TrainConfig, rank: int) -> None:
    """Refuse a resume whose run-defining flags differ from the checkpoint's, naming them."""
    config = state.get("config") or {}
    if cfg.run is not None and config.get("run") is not None:
        saved, now = config["run"], cfg.run
        keys = [k for k in now if k in saved]
    else:  # no flags recorded: the loop's own fields
        saved, now = config, dataclasses.asdict(cfg)
        keys = [k for k in RUN_FIELDS if k in saved]
    changed = [k for k in keys if saved[k] != now[k]]
    if not changed:
        return

    def show(values):
        return " ".join(f"{k} {_short(values[k])}" for k in changed)
    if not cfg.allow_changed:
        raise ValueError(f"--resume: {ckpt.name} was trained with {show(saved)}, but this run has {show(now)}; "
                         "resume with the same flags, or pass --allow-changed-flags to continue with the new ones")
    if rank == 0:
        print(f"resuming with changed flags: {show(saved)} -> {show(now)}", file=sys.stderr)


def _short(value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "..."


def _truncate_log(path: Path, step: int):
    # lines logged after the checkpoint we resume from would be repeated: drop them
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


def _log(path: Path, record: dict, rank: int):
    if rank != 0:
        return
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
    tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()),
               file=sys.stderr)
