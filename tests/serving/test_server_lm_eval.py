"""EleutherAI's lm-evaluation-harness against the server: its `local-completions` model on a small
local loglikelihood task (tests/assets/lm_eval: which ending completes a King James Bible verse)
must give, item by item, the loglikelihoods that lm-eval's own `hf` model computes with
transformers on our HF export of the same weights (within 1e-4).

`local-completions` scores a continuation by sending context + continuation as token ids with
echo=True, logprobs=1 and max_tokens=1, and summing the continuation's `token_logprobs` (the
engine's prompt logprobs, from the same forward pass that prefills the cache)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from annotated_llama import Tokenizer
from annotated_llama.cli.serve import run_in_thread
from annotated_llama.serving.server import create_app
from annotated_llama.weights import save_model

from fixtures import DATA, tiny_model

TASK_DIR = DATA / "lm_eval"


@pytest.fixture(scope="module")
def setup(tmp_path_factory, spm_path):
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    root = tmp_path_factory.mktemp("lm_eval")
    model = tiny_model()
    tokenizer = Tokenizer(spm_path)
    hf_dir = save_model(model, tokenizer, root / "hf", format="hf")
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "bible_endings.yaml").write_text((TASK_DIR / "bible_endings.yaml").read_text().replace(
        "DATA_FILE", str(TASK_DIR / "bible_endings.jsonl")))
    with run_in_thread(create_app(model, tokenizer, model_name="tiny")) as url:
        yield url, hf_dir, tasks


def loglikelihoods(model: str, model_args: str, tasks: Path) -> list[list[float]]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=["bible_endings"], log_samples=True,
                                  task_manager=TaskManager(include_path=str(tasks)), random_seed=0, batch_size=1)
    samples = sorted(out["samples"]["bible_endings"], key=lambda s: s["doc_id"])
    return [[float(r[0][0]) for r in s["resps"]] for s in samples]


def test_task_file_is_well_formed():
    import json
    items = [json.loads(line) for line in (TASK_DIR / "bible_endings.jsonl").read_text().splitlines()]
    assert len(items) >= 10 and all(len(i["choices"]) == 3 and i["gold"] == 0 for i in items)


@pytest.mark.slow
def test_local_completions_equals_hf_loglikelihoods(setup):
    url, hf_dir, tasks = setup
    # lm-eval's API models add no BOS unless told (OpenAI's tokenizers have none); a Llama wants it,
    # and both models must score the same token ids
    ours = loglikelihoods("local-completions", f"model=tiny,base_url={url}/v1/completions,num_concurrent=1,"
                                               f"max_retries=1,tokenizer_backend=huggingface,tokenizer={hf_dir},"
                                               "add_bos_token=True", tasks)
    ref = loglikelihoods("hf", f"pretrained={hf_dir},dtype=float32,device=cpu,add_bos_token=True", tasks)
    assert len(ours) == len(ref) >= 10
    worst = max(abs(g - w) for got, want in zip(ours, ref) for g, w in zip(got, want))
    print(f"lm-eval: {sum(map(len, ours))} loglikelihoods, largest difference from hf {worst:.2e}")
    for got, want in zip(ours, ref):
        assert got == pytest.approx(want, abs=1e-4)
