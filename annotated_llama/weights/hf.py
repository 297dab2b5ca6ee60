"""HF transformers layout <-> Meta's: one rename table plus the rotary permutation of wq/wk.

Meta rotates interleaved pairs (x[2i], x[2i+1]); HF's `rotate_half` pairs x[i] with
x[i + D/2]. HF's converter (convert_llama_weights_to_hf.py) therefore reorders the output
rows of wq and wk within each head, so the same weights give the same attention scores.
Forgetting it still runs, but the text turns to gibberish after ~20 tokens (transformers #25199,
llama.cpp #2376, llama2.c PR #286).
"""

from __future__ import annotations

import torch

from ..config import ModelArgs

# Meta name -> HF name; "{}" is the layer index. Data, not code (STYLE 7).
META_TO_HF = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "layers.{}.attention.wq.weight": "model.layers.{}.self_attn.q_proj.weight",
    "layers.{}.attention.wk.weight": "model.layers.{}.self_attn.k_proj.weight",
    "layers.{}.attention.wv.weight": "model.layers.{}.self_attn.v_proj.weight",
    "layers.{}.attention.wo.weight": "model.layers.{}.self_attn.o_proj.weight",
    "layers.{}.feed_forward.w1.weight": "model.layers.{}.mlp.gate_proj.weight",
    "layers.{}.feed_forward.w3.weight": "model.layers.{}.mlp.up_proj.weight",
    "layers.{}.feed_forward.w2.weight": "model.layers.{}.mlp.down_proj.weight",
    "layers.{}.attention_norm.weight": "model.layers.{}.input_layernorm.weight",
    "layers.{}.ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
}
HF_TO_META = {v: k for k, v in META_TO_HF.items()}


def _template(name: str) -> tuple[str, str | None]:
    # "layers.3.attention.wq.weight" -> ("layers.{}.attention.wq.weight", "3")
    parts = name.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[:i] + ["{}"] + parts[i + 1:]), p
    return name, None


def rename(name: str, table: dict[str, str]) -> str:
    template, layer = _template(name)
    if template not in table:
        raise KeyError(f"unexpected tensor name {name!r}")
    return table[template].format(layer) if layer is not None else table[template]


def permute_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    # Within each head, rows (0,1),(2,3),... (Meta's pairs) become rows (i, i + D/2) (HF's).
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)  # (H*D, C)


def permute_to_meta(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)  # (H*D, C)


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


def read_safetensors(path) -> dict[str, torch.Tensor]:
    """Every tensor of a .safetensors file, memory-mapped (read lazily, copy-on-write)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: f.get_tensor(name) for name in f.keys()}
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such safetensors file") from None
    except Exception as e:  # SafetensorError: truncated or malformed header/data
        raise ValueError(f"{path}: not a valid safetensors file ({str(e).splitlines()[0][:160]})") from None


def read_hf_weights(model_dir) -> dict[str, torch.Tensor]:
    """HF's tensors from model.safetensors, or the shards an index names; older exports'
    pytorch_model.bin (+ index) go through torch.load(weights_only=True)."""
    import json
    from pathlib import Path

    from .meta import load_pth

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
    import json
    from pathlib import Path

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


def tokenizer_json(tokenizer) -> str | None:
    """HF's fast-tokenizer file (tokenizer.json) equivalent to our tokenizer, or None when the
    `tokenizers` package is absent. transformers can derive one from tokenizer.model itself,
    but its SentencePiece -> BPE conversion orders merges by id, not by score, and so splits
    runs of spaces differently from SentencePiece ("  lead" -> "▁▁" "le" "ad" instead of
    "▁" "▁lead"). Here the merges are ranked as SentencePiece's BPE applies them: by the
    score of the merged piece (Llama 3's tiktoken: by rank)."""
    try:
        from tokenizers import Regex, Tokenizer as FastTokenizer, decoders, models, normalizers, pre_tokenizers, processors
    except ImportError:
        return None
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
        from ..tokenizer import LLAMA3_PAT, _gpt2_bytes_to_unicode

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
    from tokenizers import AddedToken

    fast.add_special_tokens([AddedToken(name, special=True, normalized=False) for name, _ in specials])
    bos = tokenizer.id_to_piece(tokenizer.bos_id) if tokenizer.kind == "sentencepiece" else "<|begin_of_text|>"
    fast.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.bos_id)])
    return fast.to_str()


def tokenizer_files(tokenizer, max_len: int, fast: bool) -> dict[str, dict]:
    """tokenizer_config.json and special_tokens_map.json: add BOS, not EOS; no pad token (LLaMA
    has none: early conversions that set bos 0 / eos 1 or pad 0 made fine-tunes that never stop,
    transformers #22239, #22520, tloen/alpaca-lora #279)."""
    piece = tokenizer.id_to_piece
    special = {k: piece(i) for k, i in (("bos_token", tokenizer.bos_id), ("eos_token", tokenizer.eos_id)) if i >= 0}
    if tokenizer.kind == "sentencepiece" and tokenizer.sp.unk_id() >= 0:
        special["unk_token"] = piece(tokenizer.sp.unk_id())
    # With our tokenizer.json, the generic fast class uses it as is; LlamaTokenizer would
    # rebuild the normalizer and pre-tokenizer around it.
    config = {"tokenizer_class": "PreTrainedTokenizerFast" if fast else "LlamaTokenizer",
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
    import json
    from pathlib import Path

    from safetensors.torch import save_file

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
    if fast is not None:
        (out_dir / "tokenizer.json").write_text(fast)
    for name, content in tokenizer_files(tokenizer, args.max_seq_len, fast is not None).items():
        (out_dir / name).write_text(json.dumps(content, indent=2))
