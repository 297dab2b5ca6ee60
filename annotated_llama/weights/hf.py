"""HF transformers layout <-> Meta's: the rename table and the rotary permutation of wq/wk
(core/layout.py), and the files: config.json + model.safetensors (or shards + index).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import (AddedToken, Regex, Tokenizer as FastTokenizer, decoders, models, normalizers, pre_tokenizers,
                        processors)

from ..core.config import ModelArgs
from ..core.layout import HF_TO_META, META_TO_HF, permute_to_hf, permute_to_meta, rename
from ..core.tensor_files import load_pth, read_safetensors
from ..core.tokenizer import LLAMA3_PAT, _gpt2_bytes_to_unicode


def meta_to_hf_state_dict(sd: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    out = {}
    for name, w in sd.items():
        if name.endswith("attention.wq.weight"):
            w = permute_to_hf(w, args.n_heads)
        elif name.endswith("attention.wk.weight"):
            w = permute_to_hf(w, args.n_kv_heads)  # GQA: per kv head
        out[rename(name, META_TO_HF)] = w
    return out


def hf_to_meta_state_dict(sd: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    out = {}
    for name, w in sd.items():
        if name.endswith("rotary_emb.inv_freq"):  # a buffer old transformers versions saved
            continue
        meta = rename(name, HF_TO_META)
        if meta.endswith("attention.wq.weight"):
            w = permute_to_meta(w, args.n_heads)
        elif meta.endswith("attention.wk.weight"):
            w = permute_to_meta(w, args.n_kv_heads)
        out[meta] = w
    return out


# ---- files: config.json + model.safetensors (or shards + index) <-> our state dict --------

HF_WEIGHTS = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"


def read_hf_weights(model_dir) -> dict[str, torch.Tensor]:
    """HF's tensors from model.safetensors, or the shards an index names; older exports'
    pytorch_model.bin (+ index) go through torch.load(weights_only=True)."""
    model_dir = Path(model_dir)
    for weights, index, read in ((HF_WEIGHTS, HF_INDEX, read_safetensors),
                                 ("pytorch_model.bin", "pytorch_model.bin.index.json", load_pth)):
        if (model_dir / weights).is_file():
            return read(model_dir / weights)
        if (model_dir / index).is_file():
            break
    else:
        raise ValueError(f"{model_dir}: config.json but no weights (expected {HF_WEIGHTS} or {HF_INDEX})")
    index = model_dir / index
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{index}: not a weights index (expected a 'weight_map' object)") from None
    sd = {}
    for file in sorted(set(weight_map.values())):
        part = read(model_dir / file)
        for name in part:
            if weight_map.get(name) == file:
                sd[name] = part[name]
    missing = set(weight_map) - set(sd)
    if missing:
        raise ValueError(f"{index}: {len(missing)} tensors are missing from their files, e.g. {sorted(missing)[0]}")
    return sd


def load_hf(model_dir) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    """(args, Meta-named state dict) from an HF LlamaForCausalLM directory."""
    config_path = Path(model_dir) / "config.json"
    try:
        config = json.loads(config_path.read_text())
        args = ModelArgs.from_hf_config(config)
    except (KeyError, TypeError) as e:
        raise ValueError(f"{config_path}: missing or invalid field {e}") from None
    except ValueError as e:
        raise ValueError(f"{config_path}: {e}") from None
    sd = read_hf_weights(model_dir)
    try:
        return args, hf_to_meta_state_dict(sd, args)
    except KeyError as e:
        raise ValueError(f"{model_dir}: {e.args[0]} (not a LlamaForCausalLM checkpoint?)") from None


def tiktoken_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """BPE merge rules equivalent to tiktoken's ranks: every split of a piece into two pieces,
    ordered by the rank of the piece they make (tiktoken merges the lowest rank first)."""
    merges = []
    for piece, rank in ranks.items():
        merges += [(rank, piece[:k], piece[k:]) for k in range(1, len(piece))
                   if piece[:k] in ranks and piece[k:] in ranks]
    merges.sort()
    return [(a, b) for _, a, b in merges]


def tokenizer_json(tokenizer) -> str:
    """HF's fast-tokenizer file (tokenizer.json) equivalent to our tokenizer. transformers can
    derive one from tokenizer.model itself, but its SentencePiece -> BPE conversion orders merges
    by id, not by score, and so splits runs of spaces differently from SentencePiece ("  lead" ->
    "▁▁" "le" "ad" instead of "▁" "▁lead"). Here the merges are ranked as SentencePiece's BPE
    applies them: by the score of the merged piece (Llama 3's tiktoken: by rank)."""
    vocab, merges = {}, []
    if tokenizer.kind == "sentencepiece":
        sp = tokenizer.sp
        vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
        for i in range(sp.get_piece_size()):
            if sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i):
                continue
            piece = sp.id_to_piece(i)
            merges += [(-sp.get_score(i), i, piece[:k], piece[k:]) for k in range(1, len(piece))
                       if piece[:k] in vocab and piece[k:] in vocab]
        merges.sort()
        fast = FastTokenizer(models.BPE(vocab=vocab, merges=[(m[2], m[3]) for m in merges], fuse_unk=True,
                                        unk_token=sp.id_to_piece(sp.unk_id()), byte_fallback=True))
        # SentencePiece's dummy prefix and whitespace escaping, as normalizer steps
        fast.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        fast.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                          decoders.Strip(" ", 1, 0)])
        specials = [(sp.id_to_piece(i), i) for i in range(sp.get_piece_size()) if sp.is_control(i) or sp.is_unknown(i)]
    else:
        byte_char = _gpt2_bytes_to_unicode()
        ranks = tokenizer.tt._mergeable_ranks
        vocab = {"".join(byte_char[b] for b in piece): rank for piece, rank in ranks.items()}
        text = [("".join(byte_char[b] for b in a), "".join(byte_char[b] for b in b_)) for a, b_ in tiktoken_merges(ranks)]
        fast = FastTokenizer(models.BPE(vocab=vocab, merges=text, ignore_merges=True))
        fast.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_PAT), behavior="isolated"),  # a str would be literal
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        fast.decoder = decoders.ByteLevel()
        specials = sorted(tokenizer.special_tokens.items(), key=lambda kv: kv[1])
    fast.add_special_tokens([AddedToken(name, special=True, normalized=False) for name, _ in specials])
    bos = tokenizer.id_to_piece(tokenizer.bos_id) if tokenizer.kind == "sentencepiece" else "<|begin_of_text|>"
    fast.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.bos_id)])
    return fast.to_str()


def tokenizer_files(tokenizer, max_len: int) -> dict[str, dict]:
    """tokenizer_config.json and special_tokens_map.json: add BOS, not EOS; no pad token (LLaMA
    has none: early conversions that set bos 0 / eos 1 or pad 0 made fine-tunes that never stop,
    transformers #22239, #22520, tloen/alpaca-lora #279)."""
    piece = tokenizer.id_to_piece
    special = {k: piece(i) for k, i in (("bos_token", tokenizer.bos_id), ("eos_token", tokenizer.eos_id)) if i >= 0}
    if tokenizer.kind == "sentencepiece" and tokenizer.sp.unk_id() >= 0:
        special["unk_token"] = piece(tokenizer.sp.unk_id())
    # With our tokenizer.json, the generic fast class uses it as is; LlamaTokenizer would
    # rebuild the normalizer and pre-tokenizer around it.
    config = {"tokenizer_class": "PreTrainedTokenizerFast",
              "add_bos_token": True, "add_eos_token": False, **special, "pad_token": None,
              "legacy": True, "model_max_length": max_len, "clean_up_tokenization_spaces": False}
    if tokenizer.kind == "tokenizers" and tokenizer.hf_config is not None:
        config = dict(tokenizer.hf_config)  # a Hub tokenizer.json travels with the config it came with
    if tokenizer.chat_template is not None:
        config["chat_template"] = tokenizer.chat_template
    return {"tokenizer_config.json": config, "special_tokens_map.json": special}


def save_hf(out_dir, args: ModelArgs, sd: dict[str, torch.Tensor], tokenizer) -> None:
    """Write an HF LlamaForCausalLM dir (config.json, model.safetensors, generation_config.json,
    and the tokenizer files) into out_dir, which must exist."""
    out_dir = Path(out_dir)
    dtype = next(iter(sd.values())).dtype
    bos, eos = (tokenizer.bos_id, tokenizer.eos_id) if tokenizer is not None else (1, 2)
    config = args.to_hf_config(bos_token_id=bos, eos_token_id=eos, torch_dtype=str(dtype).removeprefix("torch."))
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    hf = {k: v.contiguous() for k, v in meta_to_hf_state_dict(sd, args).items()}
    save_file(hf, out_dir / HF_WEIGHTS, metadata={"format": "pt"})  # transformers wants format=pt
    # Meta's sampling defaults (llama generation.py), unless the model came with its own file
    generation = {"bos_token_id": bos, "eos_token_id": eos, "do_sample": True, "temperature": 0.6, "top_p": 0.9}
    if tokenizer is not None and tokenizer.kind != "sentencepiece":
        generation["eos_token_id"] = sorted(tokenizer.stop_ids)  # Llama 3 stops on eot and end_of_text
    if tokenizer is not None and tokenizer.generation_config is not None:
        generation = tokenizer.generation_config
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2))
    if tokenizer is None:
        return
    if tokenizer.kind == "tokenizers":  # read from a tokenizer.json: written back as it was
        fast = tokenizer.files()["tokenizer.json"].decode("utf-8")
    else:
        (out_dir / "tokenizer.model").write_bytes(tokenizer.model_bytes())
        fast = tokenizer_json(tokenizer)
    (out_dir / "tokenizer.json").write_text(fast)
    for name, content in tokenizer_files(tokenizer, args.max_seq_len).items():
        (out_dir / name).write_text(json.dumps(content, indent=2))
