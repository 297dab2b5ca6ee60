"""The grammar side of structured output (structured_output.py), standalone: a random-weight tiny
model's logits, masked by the constraint and sampled at temperature 1.0, give replies that all
parse as JSON and validate against their schema (checked by `jsonschema`, an independent
validator), for several schemas and for a forced tool call; the vocabulary is built from each of
our tokenizer backends; OpenAI's strict rules are enforced."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from annotated_llama import ModelArgs, Tokenizer, Transformer
from annotated_llama.inference.structured_output import (Constraint, check_strict_schema, response_format_grammar,
                                               token_bytes, tool_call_grammar, vocabulary)

from fixtures import DATA, SCHEMAS, obj

ROWS = 100


@pytest.fixture(scope="module")
def spm():
    return Tokenizer(DATA / "llama-spm.model")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    # vocab_size 32016 > the tokenizer's 32000: a padded embedding, whose extra ids must never win
    return Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=32016, multiple_of=32,
                                 max_seq_len=160)).eval()


def sample_rows(model, tokenizer, grammar, rows=ROWS, steps=150, seed=0):
    """`rows` replies decoded together, each row masked by its own constraint, temperature 1.0."""
    gen = torch.Generator().manual_seed(seed)
    constraints: list[Constraint] = [grammar.constraint() for _ in range(rows)]
    prompt = tokenizer.encode("Answer in JSON:", bos=True, eos=False)
    out = [[] for _ in range(rows)]
    done = [False] * rows
    with torch.inference_mode():
        logits = model(torch.tensor([prompt] * rows), 0)[:, -1].float()  # (rows, V)
        pos = len(prompt)
        for _ in range(steps):
            logits = logits.clone()
            for r in range(rows):  # each row masked by its own grammar state
                if not done[r]:
                    constraints[r].apply(logits[r])
            live = [r for r in range(rows) if not done[r]]
            assert torch.isinf(logits[live, tokenizer.n_words:]).all()  # padded ids: never allowed
            picked = torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)[:, 0].tolist()  # temperature 1
            nxt = []
            for r, t in enumerate(picked):
                if done[r]:
                    t = tokenizer.eos_id
                elif t in tokenizer.stop_ids:
                    done[r] = True
                else:
                    constraints[r].advance(t)
                    out[r].append(t)
                    done[r] = constraints[r].is_finished()
                nxt.append(t)
            if all(done):
                break
            logits = model(torch.tensor(nxt)[:, None], pos)[:, -1].float()
            pos += 1
    assert all(done), f"{done.count(False)} rows did not finish in {steps} steps"
    return [tokenizer.decode(ids) for ids in out]


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_random_model_replies_always_validate(model, spm, name):
    schema = SCHEMAS[name]
    jsonschema.Draft202012Validator.check_schema(schema)
    grammar = response_format_grammar({"type": "json_schema",
                                       "json_schema": {"name": name, "schema": schema, "strict": True}}, spm)
    replies = sample_rows(model, spm, grammar)
    values = [json.loads(r) for r in replies]  # every one parses...
    for v in values:
        jsonschema.validate(v, schema)  # ...and validates
    assert len({json.dumps(v) for v in values}) > 10  # really sampled: not one reply a hundred times


def test_json_object_mode(model, spm):
    grammar = response_format_grammar({"type": "json_object"}, spm)
    c = grammar.constraint()
    for t in spm.encode('{"a": [1, 2], "b": {"c": null}}', bos=False, eos=False):
        row = torch.zeros(32016)
        c.apply(row)
        assert row[t] == 0, spm.id_to_piece(t)  # every token of a valid object is allowed...
        c.advance(t)
    assert c.is_finished()
    bad = grammar.constraint()
    with pytest.raises(ValueError, match="breaks the grammar"):
        bad.advance(spm.encode("[", bos=False, eos=False)[-1])  # ...and an array at the top is not


def test_forced_tool_call_arguments_validate(model, spm):
    weather = {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]},
                                                "days": {"type": "integer", "minimum": 1, "maximum": 7}},
               "required": ["city", "days"], "additionalProperties": False}
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": weather, "strict": True}},
             {"type": "function", "function": {"name": "get_time", "parameters": obj({"tz": {"enum": ["UTC"]}})}}]
    named = [json.loads(r) for r in sample_rows(model, spm, tool_call_grammar(tools, "get_weather", spm), rows=40)]
    for call in named:
        assert set(call) == {"name", "parameters"} and call["name"] == "get_weather"
        jsonschema.validate(call["parameters"], weather)
    anyone = [json.loads(r) for r in sample_rows(model, spm, tool_call_grammar(tools, None, spm), rows=40, seed=1)]
    assert {c["name"] for c in anyone} == {"get_weather", "get_time"}
    for call in anyone:
        jsonschema.validate(call["parameters"], tools[call["name"] == "get_time"]["function"]["parameters"])
    with pytest.raises(ValueError, match="not one of the tools"):
        tool_call_grammar(tools, "nope", spm)


BACKENDS = ["sentencepiece", "gguf-sentencepiece", "gguf-tiktoken", "json-byte-level", "json-sentencepiece"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_vocabulary_for_each_backend(backend, spm, llama3_tokenizer, request):
    tok = {"sentencepiece": lambda: spm, "gguf-tiktoken": lambda: llama3_tokenizer,
           "gguf-sentencepiece": lambda: Tokenizer(DATA / "llama-spm.gguf"),
           "json-byte-level": lambda: Tokenizer(request.getfixturevalue("llama3_tokenizer_json")),
           "json-sentencepiece": lambda: Tokenizer(request.getfixturevalue("llama2_tokenizer_json"))}[backend]()
    vocab = vocabulary(tok)
    assert vocabulary(tok) is vocab and vocab.vocab_size == tok.n_words  # built once
    assert set(vocab.eos_tokens) == tok.stop_ids
    text = 'Hello, world! {"x": 1}\n  tabs\tand ünïcödé'
    assert vocab.decode_str(vocab.tokenize_str(text)) == text  # the tokenize callback adds no "▁"
    if tok.sp is None and (tok.tt is not None or tok._byte_level):
        assert vocab.tokenize_str(text) == tok.encode(text, bos=False, eos=False)
    raw = token_bytes(tok)  # each id's bytes, against the tokenizer's own decoding of a run of ids
    ids = tok.encode(text, bos=False, eos=False)
    joined = b"".join(raw[i] for i in ids).decode()
    assert joined == text or (tok.sp is not None or not tok._byte_level) and joined == " " + text
    schema = obj({"n": {"type": "integer", "minimum": 0, "maximum": 9}, "w": {"enum": ["yes", "no"]}})
    grammar = response_format_grammar({"type": "json_schema", "json_schema": {"name": "t", "schema": schema}}, tok)
    gen = torch.Generator().manual_seed(3)
    for _ in range(20):  # random logits over the whole vocabulary, no model
        c, ids = grammar.constraint(), []
        while not c.is_finished():
            row = torch.randn(tok.n_words, generator=gen)
            c.apply(row)
            t = int(torch.multinomial(torch.softmax(row, -1), 1, generator=gen))
            assert t not in tok.stop_ids or c.matcher.is_accepting()
            if t in tok.stop_ids:
                break
            c.advance(t)
            ids.append(t)
        jsonschema.validate(json.loads(tok.decode(ids)), schema)


@pytest.mark.parametrize("schema,message", [
    ({"type": "array"}, "root must be an object"),
    ({"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}, "additionalProperties"),
    ({"type": "object", "properties": {"a": {"type": "string"}}, "additionalProperties": False}, "missing: a"),
    (obj({"a": obj({"b": {"type": "string"}}) | {"additionalProperties": True}}), "properties.a"),
    (obj({"a": {"allOf": [{"type": "string"}]}}), "'allOf' is not supported"),
    (obj({"a": {"type": "array", "items": {"type": "object", "properties": {"x": {"type": "string"}}}}}),
     "properties.a.items"),
])
def test_strict_rules(schema, message):
    with pytest.raises(ValueError, match=message):
        check_strict_schema(schema, "response_format.json_schema.schema")


def test_strict_accepts_openai_examples():
    # the shapes of OpenAI's guide: nested objects, nullable via a type list, $defs with recursion
    check_strict_schema(SCHEMAS["defs-anyof-nullable"], "s")
    recursive = {**obj({"root": {"$ref": "#/$defs/node"}}),
                 "$defs": {"node": obj({"value": {"type": "string"},
                                        "children": {"type": "array", "items": {"$ref": "#/$defs/node"}}})}}
    check_strict_schema(recursive, "s")


def test_unenforceable_schema_is_a_value_error(spm):
    with pytest.raises(ValueError):
        response_format_grammar({"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "string", "pattern": "("}}}}}, spm)
