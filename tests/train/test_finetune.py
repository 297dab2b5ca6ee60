"""Fine-tuning end to end on a tiny model: the CLI writes a PEFT adapter or a checkpoint through the shared
loop, a fine-tuned model stops at EOS on its training prompts, merge-lora equals the adapter, bad input fails
in one line before anything is written."""

import json

import pytest
import torch

from annotated_llama import ModelArgs, Transformer
from annotated_llama.__main__ import main
from annotated_llama.data.alpaca import render_prompt
from annotated_llama.data.instruct_tasks import evaluate
from annotated_llama.transforms.lora import lora_modules

from fixtures import RECORDS, REPO, greedy_reference



@pytest.fixture
def data_file(tmp_path):
    p = tmp_path / "train.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return p


def test_lora_finetune_writes_a_peft_adapter_and_log(base_dir, data_file, tmp_path, capsys):
    from annotated_llama import load_model

    out = tmp_path / "adapter"
    rc = main(["finetune", "--model", str(base_dir), "--data", str(data_file), "--out", str(out), "--lora",
               "--max-steps", "4", "--batch-size", "2", "--lr", "1e-2", "--lora-targets", "wq,wk,wv",
               "--lora-r", "4", "--log-every", "1", "--seed", "3"])
    assert rc == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["step"] == 4 and 0 < result["trainable_params"] < result["total_params"]
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["target_modules"] == ["k_proj", "q_proj", "v_proj"]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4]
    # the adapter loads through load_model(lora=...) and differs from the base only by the adapters
    base, _ = load_model(base_dir)
    tuned, _ = load_model(base_dir, lora=out)
    assert len(lora_modules(tuned)) == 3 * 2
    assert any(m.lora_B.abs().sum() > 0 for m in lora_modules(tuned).values())
    tokens = torch.tensor([[1, 5, 9, 20, 33]])
    assert not torch.allclose(base(tokens, cache=False), tuned(tokens, cache=False))


def test_merge_lora_cli_equals_the_adapter(base_dir, data_file, tmp_path):
    from annotated_llama import load_model

    adapter = tmp_path / "adapter"
    assert main(["finetune", "--model", str(base_dir), "--data", str(data_file), "--out", str(adapter), "--lora",
                 "--max-steps", "3", "--batch-size", "3", "--lr", "2e-2", "--lora-targets", "all"]) == 0
    merged_dir = tmp_path / "merged"
    assert main(["merge-lora", str(base_dir), str(adapter), str(merged_dir)]) == 0
    tokens = torch.tensor([[1, 5, 9, 20, 33, 7]])
    with_adapter, _ = load_model(base_dir, lora=adapter)
    merged, _ = load_model(merged_dir)
    assert not lora_modules(merged)
    assert torch.allclose(merged(tokens, cache=False), with_adapter(tokens, cache=False), atol=1e-5, rtol=0)
    base, _ = load_model(base_dir)
    assert not torch.allclose(merged(tokens, cache=False), base(tokens, cache=False), atol=1e-4)
    # OUT is never overwritten
    assert main(["merge-lora", str(base_dir), str(adapter), str(merged_dir)]) == 2


@pytest.mark.slow
def test_finetuned_model_stops_at_eos_on_training_prompts(base_dir, data_file, tmp_path):
    from annotated_llama import load_model

    base, tok = load_model(base_dir)
    prompts = [tok.encode(render_prompt(r), bos=True, eos=False) for r in RECORDS]
    before = evaluate(base, tok, RECORDS, max_new_tokens=20)
    assert before["stopped_at_eos"] == 0  # random weights: run to the length limit
    out = tmp_path / "full"
    assert main(["finetune", "--model", str(base_dir), "--data", str(data_file), "--out", str(out),
                 "--max-steps", "60", "--batch-size", "6", "--lr", "3e-3", "--log-every", "20"]) == 0
    tuned, tok = load_model(out)
    for r, prompt in zip(RECORDS, prompts):
        ids = greedy_reference(tuned, prompt, 20, tok.stop_ids)
        assert len(ids) < 20, f"no EOS after {tok.decode(ids)!r}"
        assert tok.decode(ids) == r["output"]
    report = evaluate(tuned, tok, RECORDS)
    assert report["accuracy"] == 1.0 and report["stopped_at_eos"] == 1.0


def test_bad_record_stops_before_training(base_dir, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([RECORDS[0], {"instruction": "no output"}]))
    out = tmp_path / "never"
    rc = main(["finetune", "--model", str(base_dir), "--data", str(bad), "--out", str(out), "--lora"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err
    assert err.endswith("bad.json: record 1: field 'output' is missing")
    assert not out.exists()


def test_bad_lora_targets_and_adapter(base_dir, data_file, tmp_path, capsys):
    rc = main(["finetune", "--model", str(base_dir), "--data", str(data_file), "--out", str(tmp_path / "x"),
               "--lora", "--lora-targets", "wq,attn"])
    assert rc == 2 and "unknown LoRA target 'attn'" in capsys.readouterr().err
    rc = main(["merge-lora", str(base_dir), str(tmp_path / "no-adapter"), str(tmp_path / "m")])
    assert rc == 2 and "not a PEFT adapter dir" in capsys.readouterr().err
    # an adapter made for another shape: one line naming the module and both shapes
    from annotated_llama.transforms.lora import apply_lora, save_adapter
    other = apply_lora(Transformer(ModelArgs.from_name("tiny", dim=32, vocab_size=400)), "wv", r=2, alpha=4)
    save_adapter(other, tmp_path / "other")
    rc = main(["eval-instruct", "--model", str(base_dir), "--lora", str(tmp_path / "other"), "--data",
               str(data_file)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "v_proj in layer 0 is 32x32 but the model's wv is 64x64" in err


def test_eval_instruct_cli_reports_per_task(base_dir, tmp_path, capsys):
    data = tmp_path / "heldout.jsonl"
    data.write_text("".join(json.dumps({**r, "task": t}) + "\n" for r, t in zip(RECORDS, "aabbcc")))
    assert main(["eval-instruct", "--model", str(base_dir), "--data", str(data), "--max-new-tokens", "4",
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n"] == 6 and set(report["per_task"]) == {"a", "b", "c"}
    assert report["accuracy"] == 0.0  # random weights


def _corpus():
    """A corpus in the Bible's layout: the four books of the book task plus one more, each chapter a
    line of distinct quote-free sentences of 6 to 12 words; a few sentences repeat across books."""
    import random

    rng = random.Random(5)
    vocab = ["bread", "water", "king", "land", "city", "sons", "field", "gold", "house", "tent", "river", "gate"]
    lines, repeated = [], "The king went out to the field of gold."
    for book in ("Genesis", "Leviticus", "Judges", "Job", "Exodus"):
        for ch in range(1, 4):
            lines.append(f"{book} {ch}")
            sentences = [repeated] + [
                " ".join(["The"] + [rng.choice(vocab) for _ in range(rng.randint(5, 11))]) + "." for _ in range(30)]
            lines.append(" ".join(sentences))
    return "\n".join(lines) + "\n"


def test_more_train_leaves_the_heldout_split_and_never_leaks():
    from annotated_llama.data.instruct_tasks import _pools, leaks, make_records, read_bible
    import random

    text = _corpus()
    train0, held0 = make_records(text, 20, 5, seed=3)
    train1, held1 = make_records(text, 20, 5, seed=3, more_train={"first_word": 60, "arithmetic": 40})
    assert held1 == held0  # the extra draws come after the split, from their own stream
    assert make_records(text, 20, 5, seed=3, more_train={"first_word": 60, "arithmetic": 40}) == (train1, held1)
    count = lambda rs, t: sum(r["task"] == t for r in rs)  # noqa: E731
    assert count(train1, "first_word") > count(train0, "first_word") + 30
    assert count(train1, "arithmetic") > count(train0, "arithmetic") + 30
    assert count(train1, "book") <= count(train0, "book")  # no extra book records asked for
    # no held-out question, held-out sentence or held-out input reappears in training
    held_pool, _ = _pools(read_bible(text), random.Random(3), heldout_fraction=0.15)
    held_inputs = set(held_pool["plain"]) | {r["input"] for r in held1 if r["input"]}
    pairs = {(r["instruction"], r["input"]) for r in held1}
    assert not any(leaks(r, held_inputs, pairs) for r in train1)
    assert not any((r["instruction"], r["input"]) in pairs for r in train1)
    # the wider arithmetic of the extra draws: operands up to 20, answers right
    for r in train1:
        if r["task"] == "arithmetic":
            a, op, b = r["instruction"].removeprefix("What is ").rstrip("?").split()
            assert int(r["output"]) == (int(a) + int(b) if op == "plus" else int(a) - int(b)) >= 0


def test_committed_training_split_shows_no_heldout_question():

    from annotated_llama.data.alpaca import load_records

    root = REPO / "data" / "instruct"
    train, held = load_records(root / "train.jsonl"), load_records(root / "heldout.jsonl")
    assert len(held) == 210 and len(train) > 10_000
    pairs = {(r["instruction"], r["input"]) for r in held}
    inputs = {r["input"] for r in held if r["input"]}
    sentences = {r["input"] for r in held if r["task"] in ("book", "first_word", "last_word")}
    for r in train:
        assert (r["instruction"], r["input"]) not in pairs and r["input"] not in inputs
        if r["task"] == "continue":
            assert not any(s.startswith(r["input"] + " ") for s in sentences)
