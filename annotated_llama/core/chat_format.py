"""Prompt templates as plain functions: a dialog in, token ids out.

    alpaca   stanford_alpaca's PROMPT_DICT strings (tatsu-lab/stanford_alpaca train.py), with and
             without an input.
    llama-2  Meta's [INST] / <<SYS>> format (meta-llama/llama generation.py `chat_completion`):
             each finished (user, assistant) pair encoded on its own with BOS and EOS, the last
             user turn with BOS only. The tags are plain text, so user text containing them is
             rejected (it could forge turns).
    llama-3  Meta's `ChatFormat` (llama3/tokenizer.py): <|begin_of_text|>, then per message
             <|start_header_id|>role<|end_header_id|> "\\n\\n" content <|eot_id|>, then an open
             assistant header. Special tokens are inserted by id; text that spells them is
             encoded as plain text by our Tokenizer, so it cannot forge them.
    model    the model's own Jinja template (tokenizer.chat_template, rendered by chat_template.py
             as transformers' apply_chat_template renders it); its special-token text becomes
             special ids, while the same text inside a message stays text (see encode_model_dialog).

Public API (stable; the server and the fine-tuning code import it):
    Message, Dialog                           Meta's TypedDict / list of messages
    TEMPLATES                                 ("none", "alpaca", "llama-2", "llama-3", "model")
    TEMPLATE_STOPS[template]                  stop strings that mean "the model began a new turn"
    template_stops(tokenizer, template)       the same, for any template ("model": read from it)
    default_template(tokenizer)               "model" if the model has its own, else llama-3/llama-2
    format_alpaca(instruction, input="")      the exact Alpaca prompt string
    validate_dialog(dialog)                   ValueError unless [system] user (assistant user)*
    encode_dialog(tokenizer, dialog, template, tools=None) -> list[int]    the prompt ids
    render_dialog(tokenizer, dialog, tools=None) -> str       the model template's text
    encode_prompt(tokenizer, text, template)  -> list[int]    a single user turn (or raw text)
    encode_llama2_dialog / encode_llama3_dialog / encode_alpaca_dialog
"""

from __future__ import annotations

import re
from typing import List, Literal, TypedDict

from .chat_template import render_chat_template

Role = Literal["system", "user", "assistant"]


class Message(TypedDict):
    role: Role
    content: str
    # A model's own template may also read "tool_calls" (assistant) and roles "tool"/"ipython".


Dialog = List[Message]

TEMPLATES = ("none", "alpaca", "llama-2", "llama-3", "model")
# Text that means the model has started a new turn by itself: a chat ends its answer there
# (models fine-tuned without EOS in the targets run on into the next "### Instruction:",
# tloen/alpaca-lora #357, #404). Llama 3 needs none: <|eot_id|> is a stop id. A model's own
# template's stops depend on the template: template_stops(tokenizer, "model").
TEMPLATE_STOPS = {"none": (), "alpaca": ("### Instruction:",), "llama-2": ("[INST]",), "llama-3": (), "model": ()}

# ---- Alpaca (tatsu-lab/stanford_alpaca train.py PROMPT_DICT) -------------------------------------
# No trailing newline after "### Response:"; the training target is output + EOS.
ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)


def format_alpaca(instruction: str, input: str = "") -> str:
    """The Alpaca prompt for one example; the with-input template iff input != "" (SA's rule)."""
    # Split on the placeholders rather than str.format: braces in the user's text stay braces.
    if input:
        head, rest = ALPACA_PROMPT_INPUT.split("{instruction}")
        middle, tail = rest.split("{input}")
        return head + instruction + middle + input + tail
    head, tail = ALPACA_PROMPT_NO_INPUT.split("{instruction}")
    return head + instruction + tail


# ---- Llama 2 (meta-llama/llama generation.py) -------------------------------------------------------
B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
SPECIAL_TAGS = (B_INST, E_INST, "<<SYS>>", "<</SYS>>")


def validate_dialog(dialog: Dialog) -> None:
    """Roles must be: an optional system message, then user/assistant alternating, ending with
    user (Meta's assertion, as a ValueError that says where it breaks)."""
    if not isinstance(dialog, (list, tuple)) or not dialog:
        raise ValueError("dialog must be a non-empty list of {'role', 'content'} messages")
    for i, msg in enumerate(dialog):
        if not isinstance(msg, dict) or not isinstance(msg.get("content"), str):
            raise ValueError(f"dialog message {i} must be a dict with a string 'content'")
        if msg.get("role") not in ("system", "user", "assistant"):
            raise ValueError(f"dialog message {i}: role must be system, user or assistant, got {msg.get('role')!r}")
    turns = dialog[1:] if dialog[0]["role"] == "system" else dialog
    for i, msg in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if msg["role"] != expected:
            where = i + (len(dialog) - len(turns))
            raise ValueError(f"dialog roles must alternate user/assistant after an optional system message: "
                             f"message {where} is {msg['role']!r}, expected {expected!r}")
    if not turns or turns[-1]["role"] != "user":
        raise ValueError("the last message of a dialog must be from the user")


def encode_llama2_dialog(tokenizer, dialog: Dialog) -> list[int]:
    validate_dialog(dialog)
    if any(tag in msg["content"] for msg in dialog for tag in SPECIAL_TAGS):
        # Meta returns "Error: special tags are not allowed as part of the prompt." as the answer
        raise ValueError("special tags are not allowed as part of the prompt "
                         f"(a message contains one of {', '.join(SPECIAL_TAGS)})")
    if dialog[0]["role"] == "system":  # merged into the first user message
        first = {"role": "user", "content": B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"]}
        dialog = [first] + list(dialog[2:])
    ids: list[int] = []
    for user, answer in zip(dialog[::2], dialog[1::2]):
        # each finished turn: BOS ... EOS, with Meta's trailing space after the answer
        ids += tokenizer.encode(f"{B_INST} {user['content'].strip()} {E_INST} {answer['content'].strip()} ",
                                bos=True, eos=True)
    ids += tokenizer.encode(f"{B_INST} {dialog[-1]['content'].strip()} {E_INST}", bos=True, eos=False)
    return ids


# ---- Llama 3 (meta-llama/llama3 tokenizer.py ChatFormat) ---------------------------------------------

def _special(tokenizer, name: str) -> int:
    try:
        return tokenizer.special_id(name)
    except (KeyError, AttributeError):
        raise ValueError(f"template llama-3 needs a Llama 3 tokenizer (no {name} in this vocabulary)") from None


def encode_llama3_header(tokenizer, role: str) -> list[int]:
    return ([_special(tokenizer, "<|start_header_id|>")] + tokenizer.encode(role, bos=False, eos=False)
            + [_special(tokenizer, "<|end_header_id|>")] + tokenizer.encode("\n\n", bos=False, eos=False))


def encode_llama3_dialog(tokenizer, dialog: Dialog) -> list[int]:
    validate_dialog(dialog)
    ids = [_special(tokenizer, "<|begin_of_text|>")]
    for msg in dialog:
        ids += encode_llama3_header(tokenizer, msg["role"])
        ids += tokenizer.encode(msg["content"].strip(), bos=False, eos=False)
        ids.append(_special(tokenizer, "<|eot_id|>"))
    return ids + encode_llama3_header(tokenizer, "assistant")  # the model writes the answer next


# ---- Alpaca as a chat format ---------------------------------------------------------------------------

def encode_alpaca_dialog(tokenizer, dialog: Dialog) -> list[int]:
    """Each user message is an Alpaca instruction. Finished turns are encoded like SA's training
    examples (prompt + answer, with BOS and EOS); the last one as the open prompt. Alpaca has no
    system role: a system message becomes the first turn's Input (its "further context")."""
    validate_dialog(dialog)
    context = ""
    if dialog[0]["role"] == "system":
        context, dialog = dialog[0]["content"].strip(), dialog[1:]
    ids: list[int] = []
    for i, msg in enumerate(dialog):
        if msg["role"] == "user":
            prompt = format_alpaca(msg["content"].strip(), context if i == 0 else "")
            if i == len(dialog) - 1:
                ids += tokenizer.encode(prompt, bos=True, eos=False)
        else:  # the answer follows "### Response:" directly, as in SA's `source + target`
            ids += tokenizer.encode(prompt + msg["content"].strip(), bos=True, eos=True)
    return ids


def encode_dialog(tokenizer, dialog: Dialog, template: str = "llama-2", tools=None) -> list[int]:
    """Prompt ids for a dialog under `template` ("llama-2", "llama-3", "alpaca", or "model": the
    model's own). `tools` (JSON-schema dicts) go to the model's template; the built-ins have none."""
    if template == "model":
        return encode_model_dialog(tokenizer, dialog, tools)
    if tools:
        raise ValueError(f"tools need the model's own chat template (template 'model'), not {template!r}")
    if template == "llama-2":
        return encode_llama2_dialog(tokenizer, dialog)
    if template == "llama-3":
        return encode_llama3_dialog(tokenizer, dialog)
    if template == "alpaca":
        return encode_alpaca_dialog(tokenizer, dialog)
    raise ValueError(f"unknown chat template {template!r}; choose llama-2, llama-3, alpaca or model")


# ---- the model's own template (Jinja) -------------------------------------------------------------
# Text a template writes may spell special tokens ("<|eot_id|>", "<s>"): they become special ids,
# as transformers tokenizes apply_chat_template's output. The same text inside a message must not
# (a user could close a turn and forge the assistant's), so before rendering, every special token's
# text in the caller's strings is wrapped in two Unicode noncharacters (U+FDD0/U+FDD1, reserved for
# internal use), and the wrapped spans are encoded as plain text. transformers does the same when
# asked (apply_chat_template(..., sanitize_control_tokens=True)).
MARK_OPEN, MARK_CLOSE = "\ufdd0", "\ufdd1"
_MARKED = re.compile(f"{MARK_OPEN}(.*?){MARK_CLOSE}", re.S)


def default_template(tokenizer) -> str:
    """"model" when the tokenizer carries the model's own template, else the built-in for its
    vocabulary: llama-3 for Llama 3's (tiktoken or BPE with <|start_header_id|>), else llama-2."""
    if getattr(tokenizer, "chat_template", None):
        return "model"
    return "llama-3" if "<|start_header_id|>" in getattr(tokenizer, "special_tokens", {}) else "llama-2"


def _model_template(tokenizer, tools) -> str:
    templates = getattr(tokenizer, "chat_templates", {}) or {}
    if tools and "tool_use" in templates:  # transformers picks the tool template when there are tools
        return templates["tool_use"]
    if "default" not in templates:
        raise ValueError(f"template 'model': {getattr(tokenizer, 'path', 'the tokenizer')} has no chat template of "
                         "its own (tokenizer_config.json chat_template, chat_template.jinja or GGUF "
                         "tokenizer.chat_template); choose llama-2, llama-3 or alpaca")
    return templates["default"]


def validate_messages(dialog) -> None:
    """What any template needs: a non-empty list of {"role": str, "content": str} dicts (content may
    be absent or null beside "tool_calls"). Turn order is the template's to check."""
    if not isinstance(dialog, (list, tuple)) or not dialog:
        raise ValueError("dialog must be a non-empty list of {'role', 'content'} messages")
    for i, msg in enumerate(dialog):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
            raise ValueError(f"dialog message {i} must be a dict with a string 'role'")
        content = msg.get("content")
        if not isinstance(content, str) and not (content is None and msg.get("tool_calls")):
            raise ValueError(f"dialog message {i} ({msg['role']}) must have a string 'content'")


def _special_texts(tokenizer) -> dict:
    # transformers passes its special_tokens_map: the text of each special token the tokenizer has
    out = {}
    for name, i in (("bos_token", tokenizer.bos_id), ("eos_token", tokenizer.eos_id), ("pad_token", tokenizer.pad_id)):
        if i is not None and i >= 0:
            out[name] = tokenizer.id_to_piece(i)
    unk = tokenizer.sp.unk_id() if tokenizer.sp is not None else tokenizer.template_tokens().get("<unk>", -1)
    if unk >= 0:
        out["unk_token"] = tokenizer.id_to_piece(unk)
    return out


def _mark(value, pattern):
    if isinstance(value, str):
        value = value.replace(MARK_OPEN, "").replace(MARK_CLOSE, "")  # markers cannot be typed in
        return pattern.sub(lambda m: MARK_OPEN + m.group(0) + MARK_CLOSE, value)
    if isinstance(value, dict):
        return {k: _mark(v, pattern) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_mark(v, pattern) for v in value]
    return value


def render_dialog(tokenizer, dialog, tools=None, add_generation_prompt: bool = True) -> str:
    """The text the model's own template writes for `dialog` (what apply_chat_template(...,
    tokenize=False) returns)."""
    validate_messages(dialog)
    return render_chat_template(_model_template(tokenizer, tools), dialog, tools=tools,
                                add_generation_prompt=add_generation_prompt, **_special_texts(tokenizer))


def _continue(encode, piece: str) -> list[int]:
    # Ids of `piece` in the middle of a text: SentencePiece-style tokenizers would prefix a
    # lone piece with "▁" (its dummy space). Encoded after a newline, whose ids are then
    # dropped, it comes out as it does mid-text; otherwise encoded alone.
    newline = encode("\n")
    ids = encode("\n" + piece)
    return ids[len(newline):] if ids[:len(newline)] == newline else encode(piece)


def encode_model_dialog(tokenizer, dialog, tools=None, add_generation_prompt: bool = True) -> list[int]:
    """Prompt ids from the model's own template: equal to transformers' apply_chat_template(...,
    tokenize=True) for messages that spell no special token, and its sanitize_control_tokens=True
    result for those that do."""
    validate_messages(dialog)
    pattern = tokenizer.specials_pattern()
    text = render_chat_template(_model_template(tokenizer, tools), _mark(list(dialog), pattern),
                                tools=_mark(tools, pattern), add_generation_prompt=add_generation_prompt,
                                **_special_texts(tokenizer))
    if MARK_OPEN not in text and MARK_CLOSE not in text:
        return tokenizer.encode_template(text)
    # [template, marked, template, marked, ..., template]; a marker the template cut from its
    # pair (content[:5], split()) is dropped but still separates the text on its two sides
    pieces = []
    for i, part in enumerate(_MARKED.split(text)):
        pieces += [(part, True)] if i % 2 else [(bit, False) for bit in re.split(f"[{MARK_OPEN}{MARK_CLOSE}]", part)]
    ids: list[int] = []
    for piece, plain in pieces:
        if piece:
            encode = (lambda s: tokenizer.encode(s, bos=False, eos=False)) if plain else tokenizer.encode_template
            ids += _continue(encode, piece) if ids else encode(piece)
    return ids


# Markers after which a model is starting a turn nobody asked it for (cf. TEMPLATE_STOPS). The
# model template's stops are those its text contains, and the text of the tokenizer's stop ids.
TURN_MARKERS = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|im_start|>", "<|end|>", "<|endoftext|>",
                "<end_of_turn>", "</s>", "[INST]", "<|user|>", "### Instruction:")


def template_stops(tokenizer, template: str) -> tuple[str, ...]:
    """Stop strings for `template`: TEMPLATE_STOPS for the built-ins; for "model", the turn
    markers its Jinja source writes plus the eos token's text."""
    if template != "model":
        if template not in TEMPLATE_STOPS:
            raise ValueError(f"unknown chat template {template!r}; choose one of {', '.join(TEMPLATES)}")
        return TEMPLATE_STOPS[template]
    source = _model_template(tokenizer, None)
    stops = [m for m in TURN_MARKERS if m in source]
    if "eos_token" in source and tokenizer.eos_id >= 0:
        stops.append(tokenizer.id_to_piece(tokenizer.eos_id))
    return tuple(dict.fromkeys(stops))


def encode_prompt(tokenizer, text: str, template: str = "none", system: str | None = None) -> list[int]:
    """One prompt: raw text with BOS (template "none", as Meta's text_completion), or a single
    user turn (with an optional system message) under a chat template."""
    if template in (None, "none"):
        if system:
            raise ValueError("a system message needs a chat template (llama-2, llama-3, alpaca or model)")
        return tokenizer.encode(text, bos=True, eos=False)
    dialog: Dialog = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    return encode_dialog(tokenizer, dialog, template)


__all__ = ["Message", "Dialog", "Role", "TEMPLATES", "TEMPLATE_STOPS", "ALPACA_PROMPT_INPUT",
           "ALPACA_PROMPT_NO_INPUT", "format_alpaca", "B_INST", "E_INST", "B_SYS", "E_SYS", "SPECIAL_TAGS",
           "validate_dialog", "validate_messages", "encode_llama2_dialog", "encode_llama3_header",
           "encode_llama3_dialog", "encode_alpaca_dialog", "encode_dialog", "encode_prompt", "encode_model_dialog",
           "render_dialog", "default_template", "template_stops", "TURN_MARKERS"]
