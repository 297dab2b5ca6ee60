"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arxiv/2106.09685).

A frozen projection W (out, in) gets a trainable low-rank update: y = W x + (alpha / r) * B A x,
with A (r, in) and B (out, r). B starts at zero, so a fresh adapter changes nothing (section 4.1);
only A and B train, a fraction r * (in + out) / (in * out) of each wrapped matrix.

Here LoRA is a module swap, not a model subclass: `apply_lora` replaces chosen `nn.Linear`s in
place by `LoRALinear`, which keeps the *same* weight Parameter under the same name, so the base
state dict (Meta's names) is untouched and only `lora_A` / `lora_B` entries are added.

Adapters are saved in PEFT's layout (peft's `save_pretrained`): `adapter_config.json` plus
`adapter_model.safetensors` with HF module names, so `peft.PeftModel.from_pretrained` loads them
onto our HF export. One subtlety: HF stores wq/wk rows in rotate-half order (weights/hf.py). The
update B A adds to W's rows, so B's rows must be permuted exactly as W's are; A is untouched.

The output head may carry an adapter too (target "output", PEFT's "lm_head"). In a model with tied
embeddings (Llama 3.2 1B/3B) that head *is* the input embedding: the adapter's B A is added to the
head's output only, so the embedding never changes; merging cannot add B A to a matrix both ends
share, so it unties them first (the merged model has its own output matrix, E + B A).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from ..core.layout import LINEARS, permute_to_hf, permute_to_meta
from ..core.tensor_files import load_pth, read_safetensors

# Our projection names -> HF's module names (the names PEFT's target_modules use) and the parent
# modules that hold them, from the one layout table (core/layout.py).
TARGET_TO_HF = {t: hf for t, (_, _, hf) in LINEARS.items()}
HF_TO_TARGET = {v: k for k, v in TARGET_TO_HF.items()}
HF_PARENT = {t: hf_parent for t, (_, hf_parent, _) in LINEARS.items()}
OUR_PARENT = {t: ours for t, (ours, _, _) in LINEARS.items()}
OUTPUT_TARGET, OUTPUT_HF = "output", "lm_head"  # the head: not in a layer, not part of "all"
CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if r < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {r}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # the same Parameter: the state-dict name stays `...wq.weight`
        self.weight.requires_grad_(False)
        self.r, self.alpha = r, alpha
        self.scaling = alpha / r  # PEFT's default scaling (use_rslora=False)
        kw = dict(dtype=base.weight.dtype, device=base.weight.device)
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **kw))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, **kw))  # (out, r): zero => no-op at init
        # A's init as PEFT's (and nn.Linear's): Kaiming-uniform with a = sqrt(5).
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling  # (out, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        if self.merged:
            return y
        # x (..., in) -> A -> (..., r) -> B -> (..., out): never builds the (out, in) product
        return y + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scaling

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            self.weight += self.delta_weight().to(self.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.weight -= self.delta_weight().to(self.weight.dtype)
            self.merged = False

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, alpha={self.alpha}, merged={self.merged}"


def parse_targets(targets) -> list[str]:
    """`"wq,wv"`, `"all"`, HF names (`"q_proj,v_proj"`) or a list -> our names, in a fixed order.
    "output" (HF "lm_head") adapts the output head; "all" is the seven layer projections."""
    names = targets.split(",") if isinstance(targets, str) else list(targets)
    names = [n.strip() for n in names if n.strip()]
    if names == ["all"]:
        return list(TARGET_TO_HF)
    known = {**TARGET_TO_HF, OUTPUT_TARGET: OUTPUT_HF}
    out = []
    for n in names:
        ours = {**HF_TO_TARGET, OUTPUT_HF: OUTPUT_TARGET}.get(n, n)
        if ours not in known:
            raise ValueError(f"unknown LoRA target {n!r}; choose from {', '.join(known)} (or HF names "
                             f"{', '.join(known.values())}), or 'all'")
        if ours not in out:
            out.append(ours)
    if not out:
        raise ValueError("no LoRA targets given")
    return [t for t in known if t in out]


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def apply_lora(model: nn.Module, targets="wq,wv", r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
               layers=None) -> nn.Module:
    """Swap the chosen projections of every layer (or of `layers`) for LoRALinear, in place, and
    freeze everything else. Defaults are alpaca-lora's (r 8, alpha 16, q and v: tloen/alpaca-lora
    finetune.py)."""
    if lora_modules(model):
        raise ValueError("the model already has LoRA adapters (merge_and_unload it first)")
    chosen = parse_targets(targets)
    if OUTPUT_TARGET in chosen:
        model.output = LoRALinear(model.output, r, alpha, dropout).train(model.training)
    for i, block in enumerate(model.layers):
        if layers is not None and i not in layers:
            continue
        for t in chosen:
            if t == OUTPUT_TARGET:
                continue
            parent = getattr(block, OUR_PARENT[t])
            # a new module starts in training mode: follow the model's mode (no dropout in eval)
            setattr(parent, t, LoRALinear(getattr(parent, t), r, alpha, dropout).train(model.training))
    mark_only_lora_trainable(model)
    return model


def is_lora_parameter(name: str, param=None) -> bool:
    """The trainable-parameter filter for the training loop: adapter tensors only."""
    return "lora_A" in name or "lora_B" in name


def mark_only_lora_trainable(model: nn.Module):
    for name, p in model.named_parameters():
        p.requires_grad_(is_lora_parameter(name))


def _untie_for_merge(model: nn.Module):
    # B A may go into the output head only: give it its own copy of the shared matrix first
    head = getattr(model, "output", None)
    if isinstance(head, LoRALinear) and not head.merged and head.weight is model.tok_embeddings.weight:
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
        model.params = replace(model.params, tie_word_embeddings=False)


def merge_lora(model: nn.Module):
    """Fold every adapter into its weight (a tied output head is untied first)."""
    _untie_for_merge(model)
    for m in lora_modules(model).values():
        m.merge()


def unmerge_lora(model: nn.Module):
    for m in lora_modules(model).values():
        m.unmerge()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put plain nn.Linears back (for export).
    A tied output head with an adapter comes back untied (ModelArgs.tie_word_embeddings False)."""
    _untie_for_merge(model)
    for name, m in lora_modules(model).items():
        m.merge()
        parent_name, _, child = name.rpartition(".")
        linear = nn.Linear(m.in_features, m.out_features, bias=False, device="meta")
        linear.weight = m.weight
        m.weight.requires_grad_(True)
        setattr(model.get_submodule(parent_name) if parent_name else model, child, linear)
    return model


# ---- PEFT's file layout -------------------------------------------------------------------

def _hf_module(layer: int, target: str) -> str:
    if target == OUTPUT_TARGET:
        return f"base_model.model.{OUTPUT_HF}"
    return f"base_model.model.model.layers.{layer}.{HF_PARENT[target]}.{TARGET_TO_HF[target]}"


def save_adapter(model: nn.Module, out_dir, base_model_name_or_path: str | None = None):
    """Write `adapter_config.json` + `adapter_model.safetensors` (PEFT's format) to out_dir."""
    mods = lora_modules(model)
    if not mods:
        raise ValueError("the model has no LoRA adapters to save")
    args = model.params
    tensors, targets, ranks, alphas = {}, set(), set(), set()
    for name, m in mods.items():
        parts = name.split(".")  # layers.{i}.attention.wq, or output
        layer, target = (int(parts[1]), parts[-1]) if name != OUTPUT_TARGET else (-1, OUTPUT_TARGET)
        B = m.lora_B.detach()
        if target in ("wq", "wk"):  # rows follow the base weight's rotary permutation
            B = permute_to_hf(B, args.n_heads if target == "wq" else args.n_kv_heads)
        prefix = _hf_module(layer, target)
        tensors[f"{prefix}.lora_A.weight"] = m.lora_A.detach().contiguous()
        tensors[f"{prefix}.lora_B.weight"] = B.contiguous()
        targets.add(TARGET_TO_HF.get(target, OUTPUT_HF))
        ranks.add(m.r)
        alphas.add(m.alpha)
        dropout = m.dropout.p if isinstance(m.dropout, nn.Dropout) else 0.0
        rslora = not math.isclose(m.scaling, m.alpha / m.r)
    if len(ranks) > 1 or len(alphas) > 1:
        raise ValueError("adapters with different ranks or alphas per module are not supported")
    n_layers = len(model.layers)
    layers = sorted({int(n.split(".")[1]) for n in mods if n != OUTPUT_TARGET})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "revision": None, "r": ranks.pop(), "lora_alpha": alphas.pop(), "lora_dropout": dropout,
        "target_modules": sorted(targets), "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "init_lora_weights": True, "modules_to_save": None,
        "layers_to_transform": None if len(layers) in (0, n_layers) else layers, "layers_pattern": None,
        "use_rslora": rslora, "use_dora": False, "rank_pattern": {}, "alpha_pattern": {},
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # temporary name, then rename: an interrupted save never leaves a half-written adapter
    tmp = out_dir / f".{WEIGHTS_NAME}.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out_dir / WEIGHTS_NAME)
    tmp = out_dir / f".{CONFIG_NAME}.tmp"
    tmp.write_text(json.dumps(config, indent=2) + "\n")
    os.replace(tmp, out_dir / CONFIG_NAME)


def read_adapter(adapter_dir) -> tuple[dict, dict[str, torch.Tensor]]:
    d = Path(adapter_dir)
    cfg_path, w_path = d / CONFIG_NAME, d / WEIGHTS_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{d}: not a PEFT adapter dir ({CONFIG_NAME} not found)")
    try:
        config = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{cfg_path}: expected a JSON object")
    if w_path.is_file():
        tensors = read_safetensors(w_path)  # a truncated file is a one-line error naming it
    elif (d / "adapter_model.bin").is_file():  # older PEFT: a plain tensor dict, never unpickled objects
        tensors = load_pth(d / "adapter_model.bin")
    else:
        raise FileNotFoundError(f"{d}: {WEIGHTS_NAME} not found")
    return config, tensors


def load_adapter(model: nn.Module, adapter_dir) -> nn.Module:
    """Apply a PEFT-format LoRA adapter (ours or trained with PEFT on the HF layout) to `model`.

    The wrapped modules are the ones the weights file holds; each must be listed in the
    config's target_modules and match the model's shapes and the config's rank."""
    config, tensors = read_adapter(adapter_dir)
    where = Path(adapter_dir) / CONFIG_NAME
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{where}: peft_type {config.get('peft_type')!r} is not LORA")
    for key, ok in (("use_dora", False), ("fan_in_fan_out", False), ("bias", "none")):
        if config.get(key, ok) != ok:
            raise ValueError(f"{where}: {key}={config[key]!r} is not supported (only {ok!r})")
    if config.get("rank_pattern") or config.get("alpha_pattern") or config.get("modules_to_save"):
        raise ValueError(f"{where}: rank_pattern, alpha_pattern and modules_to_save are not supported")
    r, alpha = int(config["r"]), float(config["lora_alpha"])
    declared = config.get("target_modules") or []
    # PEFT: a list names module suffixes; a string is a regular expression on the full name
    pattern = declared if isinstance(declared, str) else None
    declared = set() if pattern is not None else set(declared)
    found: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        # base_model.model.model.layers.{i}.self_attn.q_proj.lora_A[.default].weight
        parts = key.split(".")
        if "lora_A" in parts or "lora_B" in parts:
            ab = "lora_A" if "lora_A" in parts else "lora_B"
            hf_mod = parts[parts.index(ab) - 1]
            layer = int(parts[parts.index("layers") + 1]) if "layers" in parts else -1
            if hf_mod == OUTPUT_HF and layer < 0:  # base_model.model.lm_head
                module = ".".join(parts[:parts.index(ab)]).removeprefix("base_model.model.")
                if not (hf_mod in declared or (pattern is not None and re.fullmatch(pattern, module))):
                    raise ValueError(f"{where}: weights hold {hf_mod} but target_modules is "
                                     f"{pattern if pattern is not None else sorted(declared)}")
                found.setdefault((-1, OUTPUT_TARGET), {})[ab] = t
                continue
            if hf_mod not in HF_TO_TARGET or layer < 0:
                raise ValueError(f"{where}: adapter module {'.'.join(parts[:parts.index(ab)])} is not a LLaMA "
                                 "projection this model has")
            module = ".".join(parts[:parts.index(ab)]).removeprefix("base_model.model.")
            if not (hf_mod in declared or (pattern is not None and re.fullmatch(pattern, module))):
                raise ValueError(f"{where}: weights hold {hf_mod} but target_modules is "
                                 f"{pattern if pattern is not None else sorted(declared)}")
            found.setdefault((layer, HF_TO_TARGET[hf_mod]), {})[ab] = t
        elif key.endswith(f"{OUTPUT_HF}.base_layer.weight"):
            # PEFT saves the head it adapted when that head is tied to the embedding layer
            # (save_embedding_layers): only a copy of the base model's own matrix is accepted
            head = model.output.weight
            if t.shape != head.shape or not torch.equal(t.to(head.dtype), head.detach()):
                raise ValueError(f"{where}: the adapter stores an {OUTPUT_HF} matrix that differs from this "
                                 "model's output head (an adapter for another base model?)")
        else:
            raise ValueError(f"{where}: unexpected tensor {key} in the adapter (only lora_A/lora_B are supported)")
    if not found:
        raise ValueError(f"{where}: the adapter holds no lora_A/lora_B tensors")
    args, n_layers = model.params, len(model.layers)
    plan = []
    for (layer, target), ab in sorted(found.items()):
        name = OUTPUT_TARGET if target == OUTPUT_TARGET else f"layers.{layer}.{OUR_PARENT[target]}.{target}"
        if layer >= n_layers:
            raise ValueError(f"{where}: adapter targets layer {layer} but the model has {n_layers} layers")
        if set(ab) != {"lora_A", "lora_B"}:
            raise ValueError(f"{where}: {name} has only {sorted(ab)}")
        base = model.get_submodule(name)
        if isinstance(base, LoRALinear):
            raise ValueError("the model already has LoRA adapters (merge_and_unload it first)")
        A, B = ab["lora_A"], ab["lora_B"]
        hf_name = f"{TARGET_TO_HF[target]} in layer {layer}" if target != OUTPUT_TARGET else OUTPUT_HF
        if A.shape[0] != r or B.shape[1] != r:
            raise ValueError(f"{where}: {hf_name} has rank {A.shape[0]} but the config says r={r}")
        if A.shape[1] != base.in_features or B.shape[0] != base.out_features:
            raise ValueError(f"{where}: {hf_name} is {B.shape[0]}x{A.shape[1]} "
                             f"but the model's {target} is {base.out_features}x{base.in_features}")
        if target in ("wq", "wk"):
            B = permute_to_meta(B, args.n_heads if target == "wq" else args.n_kv_heads)
        plan.append((name, A, B))
    for name, A, B in plan:  # checked everything first: a bad adapter leaves the model unchanged
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        m = LoRALinear(getattr(parent, child), r, alpha, float(config.get("lora_dropout", 0.0)))
        if config.get("use_rslora"):
            m.scaling = alpha / math.sqrt(r)  # rank-stabilised LoRA (Kalajdzievski 2023)
        with torch.no_grad():
            m.lora_A.copy_(A)
            m.lora_B.copy_(B)
        setattr(parent, child, m.train(model.training))  # eval model: no adapter dropout
    mark_only_lora_trainable(model)
    return model


def trainable_fraction(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total
