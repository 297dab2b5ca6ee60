"""Alpaca data: exact templates, the prompt mask, EOS on every target, truncation, shuffling, bad input."""

import json

import pytest
import torch

from annotated_llama import Tokenizer
from annotated_llama.data.alpaca import (IGNORE_INDEX, Batches, build_dataset, collate, encode_record, load_records,
                                    render_prompt)

# stanford_alpaca train.py PROMPT_DICT, typed out by hand: no newline after "### Response:".
EXPECTED_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n"
    "\n"
    "### Instruction:\n"
    "Translate to French.\n"
    "\n"
    "### Input:\n"
    "Good morning\n"
    "\n"
    "### Response:"
)
EXPECTED_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n"
    "\n"
    "### Instruction:\n"
    "Name a prime number.\n"
    "\n"
    "### Response:"
)

RECORDS = [
    {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"},
    {"instruction": "Name a prime number.", "input": "", "output": "Seven is prime."},
    {"instruction": "Name a prime number.", "output": "Two."},  # input absent: the no-input template
]


@pytest.fixture(scope="module")
def tok(spm_path):
    return Tokenizer(spm_path)


def test_templates_are_stanford_alpacas_exact_strings():
    assert render_prompt(RECORDS[0]) == EXPECTED_WITH_INPUT
    assert render_prompt(RECORDS[1]) == EXPECTED_NO_INPUT
    assert render_prompt({"instruction": "Name a prime number.", "output": "x"}) == EXPECTED_NO_INPUT
    # braces in user text stay braces (no str.format surprises)
    assert "{input}" in render_prompt({"instruction": "Say {input}", "input": "", "output": ""})


def test_mask_covers_exactly_the_prompt_and_targets_end_with_eos(tok):
    for record in RECORDS:
        ex = encode_record(tok, record)
        prompt_ids = tok.encode(render_prompt(record), bos=True, eos=False)
        output_ids = tok.encode(record["output"], bos=False, eos=False)
        n = len(prompt_ids)
        assert ex.ids[:n] == prompt_ids
        assert ex.labels[:n] == [IGNORE_INDEX] * n  # every prompt token masked...
        assert IGNORE_INDEX not in ex.labels[n:]  # ...and nothing else
        assert ex.labels[n:] == output_ids + [tok.eos_id]
        assert ex.ids[-1] == ex.labels[-1] == tok.eos_id
        assert tok.decode(ex.ids[n:-1]) == record["output"]


def test_collate_shifts_and_pads(tok):
    examples = [encode_record(tok, r) for r in RECORDS]
    inputs, targets = collate(examples, pad_id=tok.eos_id)
    T = max(len(e.ids) for e in examples) - 1
    assert inputs.shape == targets.shape == (3, T)
    for b, e in enumerate(examples):
        n = len(e.ids) - 1
        assert inputs[b, :n].tolist() == e.ids[:-1]
        assert targets[b, :n].tolist() == e.labels[1:]  # target t is the token after input t
        assert (targets[b, n:] == IGNORE_INDEX).all()
        # the last counted target of each row is EOS
        counted = targets[b][targets[b] != IGNORE_INDEX]
        assert counted[-1].item() == tok.eos_id


def test_truncation_is_counted(tok):
    lengths = [(len(tok.encode(render_prompt(r), bos=True, eos=False)), len(encode_record(tok, r).ids))
               for r in RECORDS]
    max_len = lengths[1][0] + 2  # record 1 keeps 2 output tokens; record 0's longer prompt leaves none
    assert lengths[0][0] >= max_len - 1 and lengths[1][1] > max_len and lengths[2][1] > max_len
    ds = build_dataset(tok, RECORDS, max_len)
    assert ds.n_dropped == 1 and len(ds.examples) == 2
    assert ds.n_truncated == 2
    assert ds.n_cut_tokens == (lengths[1][1] - max_len) + (lengths[2][1] - max_len)
    assert all(len(e.ids) == max_len for e in ds.examples)
    assert all(e.ids[-1] != tok.eos_id for e in ds.examples)  # a cut target does not pretend to end
    assert "2 truncated" in ds.summary() and "1 dropped" in ds.summary()


def test_batches_are_reproducible_and_cover_each_epoch(tok):
    records = [{"instruction": f"Say {i}.", "output": str(i)} for i in range(10)]
    ds = build_dataset(tok, records, 64)
    a, b = Batches(ds, 2, seed=7, pad_id=0), Batches(ds, 2, seed=7, pad_id=0)
    for i in (0, 3, 4, 7, 12):
        assert all(torch.equal(x, y) for x, y in zip(a(i), b(i)))

    def epoch_rows(batches, epoch):
        return [tuple(row.tolist()) for i in range(5 * epoch, 5 * epoch + 5) for row in batches(i)[0]]

    assert len(set(epoch_rows(a, 0))) == 10  # each example once per epoch
    assert epoch_rows(a, 0) != epoch_rows(a, 1)  # reshuffled each epoch
    assert sorted(epoch_rows(a, 0)) == sorted(epoch_rows(a, 1))
    assert epoch_rows(a, 0) != epoch_rows(Batches(ds, 2, seed=8, pad_id=0), 0)


def test_load_json_list_and_jsonl(tmp_path):
    p = tmp_path / "data.json"
    p.write_text(json.dumps(RECORDS, indent=2))
    assert [r["input"] for r in load_records(p)] == ["Good morning", "", ""]
    q = tmp_path / "data.jsonl"
    q.write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n\n")
    assert load_records(q) == load_records(p)


def test_malformed_json_reports_line_and_column(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c" "output": "d"}\n]\n')
    with pytest.raises(ValueError, match=r"bad\.json: malformed JSON at line 3 column 23"):
        load_records(p)
    q = tmp_path / "bad.jsonl"
    line2 = '{"instruction": "a", "output": }'
    q.write_text('{"instruction": "a", "output": "b"}\n' + line2 + "\n")
    with pytest.raises(ValueError, match=rf"bad\.jsonl: malformed JSON at line 2 column {line2.index('}') + 1}"):
        load_records(q)


def test_bad_records_are_named_by_index(tmp_path):
    p = tmp_path / "d.json"
    p.write_text(json.dumps([RECORDS[0], {"instruction": "no output here"}]))
    with pytest.raises(ValueError, match=r"d\.json: record 1: field 'output' is missing"):
        load_records(p)
    p.write_text(json.dumps([RECORDS[0], RECORDS[1], {"instruction": "x", "output": 3}]))
    with pytest.raises(ValueError, match=r"record 2: field 'output' must be a string, got int"):
        load_records(p)
    q = tmp_path / "d.jsonl"
    q.write_text(json.dumps(RECORDS[0]) + "\n" + json.dumps({"instruction": ["x"], "output": "y"}) + "\n")
    with pytest.raises(ValueError, match=r"record 1 \(line 2\): field 'instruction' must be a string"):
        load_records(q)
    with pytest.raises(FileNotFoundError, match="no such data file"):
        load_records(tmp_path / "missing.json")
