"""Prompt templates as plain functions: a dialog in, token ids out.

    alpaca   stanford_alpaca's PROMPT_DICT strings (REFERENCE b9), with and without an input.
    llama-2  Meta's [INST] / <<SYS>> format (llama/generation.py `chat_completion`, REFERENCE b8):
             each finished (user, assistant) pair encoded on its own with BOS and EOS, the last
             user turn with BOS only. The tags are plain text, so user text containing them is
             rejected (it could forge turns).
    llama-3  Meta's `ChatFormat` (llama3/tokenizer.py): <|begin_of_text|>, then per message
             <|start_header_id|>role<|end_header_id|> "\\n\\n" content <|eot_id|>, then an open
             assistant header. Special tokens are inserted by id; text that spells them is
             encoded as plain text by our Tokenizer, so it cannot forge them.

Public API (stable; the server and the fine-tuning code import it):
    Message, Dialog                           Meta's TypedDict / list of messages
    TEMPLATES                                 ("none", "alpaca", "llama-2", "llama-3")
    TEMPLATE_STOPS[template]                  stop strings that mean "the model began a new turn"
    format_alpaca(instruction, input="")      the exact Alpaca prompt string
    validate_dialog(dialog)                   ValueError unless [system] user (assistant user)*
    encode_dialog(tokenizer, dialog, template) -> list[int]    the prompt ids for generation
    encode_prompt(tokenizer, text, template)  -> list[int]    a single user turn (or raw text)
    encode_llama2_dialog / encode_llama3_dialog / encode_alpaca_dialog
"""

from __future__ import annotations

from typing import List, Literal, TypedDict

Role = Literal["system", "user", "assistant"]


class Message(TypedDict):
    role: Role
    content: str


Dialog = List[Message]

TEMPLATES = ("none", "alpaca", "llama-2", "llama-3")
# Text that means the model has started a new turn by itself: a chat ends its answer there
# (models fine-tuned without EOS in the targets run on into the next "### Instruction:",
# REFERENCE section 3 item 7). Llama 3 needs none: <|eot_id|> is a stop id.
TEMPLATE_STOPS = {"none": (), "alpaca": ("### Instruction:",), "llama-2": ("[INST]",), "llama-3": ()}

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


def encode_dialog(tokenizer, dialog: Dialog, template: str = "llama-2") -> list[int]:
    """Prompt ids for a dialog under `template` ("llama-2", "llama-3" or "alpaca")."""
    if template == "llama-2":
        return encode_llama2_dialog(tokenizer, dialog)
    if template == "llama-3":
        return encode_llama3_dialog(tokenizer, dialog)
    if template == "alpaca":
        return encode_alpaca_dialog(tokenizer, dialog)
    raise ValueError(f"unknown chat template {template!r}; choose llama-2, llama-3 or alpaca")


def encode_prompt(tokenizer, text: str, template: str = "none", system: str | None = None) -> list[int]:
    """One prompt: raw text with BOS (template "none", as Meta's text_completion), or a single
    user turn (with an optional system message) under a chat template."""
    if template in (None, "none"):
        if system:
            raise ValueError("a system message needs a chat template (llama-2, llama-3 or alpaca)")
        return tokenizer.encode(text, bos=True, eos=False)
    dialog: Dialog = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    return encode_dialog(tokenizer, dialog, template)


__all__ = ["Message", "Dialog", "Role", "TEMPLATES", "TEMPLATE_STOPS", "ALPACA_PROMPT_INPUT", "ALPACA_PROMPT_NO_INPUT", "format_alpaca",
           "B_INST", "E_INST", "B_SYS", "E_SYS", "SPECIAL_TAGS", "validate_dialog", "encode_llama2_dialog",
           "encode_llama3_header", "encode_llama3_dialog", "encode_alpaca_dialog", "encode_dialog", "encode_prompt"]
