"""A model's own chat template: the Jinja program stored with the weights (tokenizer_config.json's
chat_template, chat_template.jinja, or a GGUF file's tokenizer.chat_template), rendered the way
transformers' `apply_chat_template` renders it (transformers/utils/chat_template_utils.py), so a
fine-tune's prompt format is the one it was trained with:

  - a sandboxed environment (jinja2.sandbox.ImmutableSandboxedEnvironment): a template from the Hub
    is untrusted code, and the sandbox refuses attribute tricks (`__class__`, ...) and mutation of
    the values passed in;
  - trim_blocks and lstrip_blocks (a block tag's own line leaves no newline or indent behind) and
    the loopcontrols extension ({% break %}, {% continue %}), as transformers sets them;
  - the variables `messages`, `tools`, `documents`, `add_generation_prompt` and the special tokens'
    text (`bos_token`, `eos_token`, ...), and the helpers `raise_exception(msg)`,
    `strftime_now(fmt)` and a `tojson` filter that, unlike Jinja's own, does not escape HTML
    characters and takes json.dumps's indent/separators/sort_keys;
  - `{% generation %}...{% endgeneration %}` (transformers marks assistant text with it for
    training masks) renders its body.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache

import jinja2
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment


class _GenerationBlock(Extension):
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


class _TemplateRaised(Exception):
    pass


def _raise_exception(message):
    raise _TemplateRaised(str(message))


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=32)
def compile_template(source: str) -> jinja2.Template:
    """The template compiled once per source string; a syntax error is a one-line ValueError."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationBlock, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"chat template: syntax error on line {e.lineno}: {e.message}") from None


def _plain(value, where: str):
    # Only JSON data reaches the template (the sandbox guards attributes; this keeps objects with
    # side-effecting methods out altogether). None-valued keys are dropped, as transformers does,
    # so `'tool_calls' in message` is false for an OpenAI message with tool_calls: null.
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v, where) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_plain(v, where) for v in value]
    raise ValueError(f"{where}: {type(value).__name__} values cannot be passed to a chat template (JSON data only)")


def render_chat_template(source: str, messages, *, add_generation_prompt: bool = True, tools=None,
                         documents=None, **variables) -> str:
    """The text `source` renders for `messages` (a list of dicts: role, content, and maybe
    tool_calls, name, tool_call_id ...), with `tools` (JSON-schema dicts) and `variables`
    (bos_token, eos_token, date_string ...). Errors are one-line ValueErrors."""
    template = compile_template(source)
    if tools is not None and not all(isinstance(t, dict) for t in tools):
        raise ValueError("tools: each tool must be a JSON-schema dict ({'type': 'function', 'function': {...}})")
    try:
        return template.render(messages=_plain(list(messages), "messages"), tools=_plain(tools, "tools"),
                               documents=_plain(documents, "documents"),
                               add_generation_prompt=add_generation_prompt, **_plain(variables, "variables"))
    except _TemplateRaised as e:  # the template's own raise_exception("...")
        raise ValueError(f"chat template: {e}") from None
    except jinja2.TemplateError as e:  # undefined names, sandbox refusals, filter errors
        raise ValueError(f"chat template: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    except (TypeError, KeyError, IndexError, AttributeError) as e:  # e.g. messages[0] of an empty list
        raise ValueError(f"chat template: {type(e).__name__}: {e}") from None


__all__ = ["compile_template", "render_chat_template"]
