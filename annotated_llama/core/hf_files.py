"""The small files a Hugging Face model directory keeps beside its weights and tokenizer.

    tokenizer_config.json     special tokens (bos/eos/pad, as strings or transformers' AddedToken
                              dicts), add_bos_token, and the chat template (a Jinja string, or a
                              list of named ones: "default", "tool_use", ...)
    chat_template.jinja       newer transformers save the template here instead (it then wins over
    additional_chat_templates/NAME.jinja      the config's, as in transformers' from_pretrained)
    generation_config.json    the ids that end a generation (Llama 3.1 Instruct: 128001, 128008,
                              128009) and the sampling values the model's authors chose

Read once, next to the tokenizer file, by `Tokenizer`; the front ends get them from there
(`tokenizer.chat_template`, `tokenizer.stop_ids`, `tokenizer.generation_defaults`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

TOKENIZER_CONFIG = "tokenizer_config.json"
GENERATION_CONFIG = "generation_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATE_DIR = "additional_chat_templates"


@dataclass
class ModelFiles:
    tokenizer_config: dict | None = None
    generation_config: dict | None = None
    chat_templates: dict[str, str] = field(default_factory=dict)  # name -> Jinja source; "default" first


def read_json(path: Path) -> dict | None:
    """A JSON object from `path`, None when the file is absent; one-line errors naming it."""
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return value


def read_model_files(directory) -> ModelFiles:
    directory = Path(directory)
    config = read_json(directory / TOKENIZER_CONFIG)
    templates: dict[str, str] = {}
    stored = (config or {}).get("chat_template")
    if isinstance(stored, str):
        templates["default"] = stored
    elif isinstance(stored, list):  # [{"name": "default", "template": "..."}, {"name": "tool_use", ...}]
        for entry in stored:
            if not isinstance(entry, dict) or not isinstance(entry.get("template"), str):
                raise ValueError(f"{directory / TOKENIZER_CONFIG}: chat_template entries must be "
                                 "{'name': ..., 'template': ...} objects")
            templates[str(entry.get("name", "default"))] = entry["template"]
    elif stored is not None:
        raise ValueError(f"{directory / TOKENIZER_CONFIG}: chat_template must be a string or a list of templates")
    if (directory / CHAT_TEMPLATE_FILE).is_file():
        templates["default"] = (directory / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    if (directory / CHAT_TEMPLATE_DIR).is_dir():
        for f in sorted((directory / CHAT_TEMPLATE_DIR).glob("*.jinja")):
            templates[f.stem] = f.read_text(encoding="utf-8")
    if "default" in templates:
        templates = {"default": templates.pop("default"), **templates}
    return ModelFiles(config, read_json(directory / GENERATION_CONFIG), templates)


def token_text(value) -> str | None:
    """The text of a special token as tokenizer_config.json stores it: "<s>", or an AddedToken
    dict {"__type": "AddedToken", "content": "<s>", ...}; None for null."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"unexpected special token entry {value!r} (expected a string or an AddedToken object)")


def eos_ids(generation_config: dict | None) -> list[int]:
    """generation_config.json's eos_token_id: one id or a list of them (any of which ends a generation)."""
    eos = (generation_config or {}).get("eos_token_id")
    if eos is None:
        return []
    eos = eos if isinstance(eos, list) else [eos]
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in eos):
        raise ValueError(f"{GENERATION_CONFIG}: eos_token_id must be an id or a list of ids, got {eos!r}")
    return eos


# generation_config.json field -> our sampling argument (generation.py / sampling.py names)
SAMPLING_FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
                   "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_new_tokens"}


def sampling_defaults(generation_config: dict | None) -> dict:
    """The sampling values generation_config.json states, under our argument names. Only what the
    file says: transformers' own fallbacks (top_k 50, temperature 1.0) are not the model's choice.
    do_sample false means greedy: temperature 0. top_k 0 means no top-k: left out."""
    cfg = generation_config or {}
    out = {ours: cfg[theirs] for theirs, ours in SAMPLING_FIELDS.items() if cfg.get(theirs) is not None}
    if out.get("top_k") == 0:
        del out["top_k"]
    if cfg.get("do_sample") is False:
        out["temperature"] = 0.0
        for key in ("top_p", "top_k"):
            out.pop(key, None)
    return out


__all__ = ["ModelFiles", "read_model_files", "read_json", "token_text", "eos_ids", "sampling_defaults"]
