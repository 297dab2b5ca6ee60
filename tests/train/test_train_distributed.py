"""`torchrun --standalone --nproc_per_node 2` on CPU/gloo: DDP and FSDP2 runs with the same global batch
give the losses of one process, step for step, within float tolerance; rank 0 alone writes."""

import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from fixtures import cli, pretrain_args, read_log


pytestmark = pytest.mark.slow


def torchrun(*args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "annotated_llama", *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def single(shards, params_json, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("single")
    cli(*pretrain_args(shards, params_json, out, 6), "--batch-size", 4, "--eval-every", 3)
    return out


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_match_one_process(parallel, single, shards, params_json, tmp_path):  # noqa: F811
    out = tmp_path / parallel
    # 2 ranks x 2 rows = the single process's 4 rows (WindowSampler gives rank r rows [2r, 2r+2))
    torchrun(*pretrain_args(shards, params_json, out, 6), "--batch-size", 2, "--eval-every", 3,
             "--parallel", parallel)
    one, two = read_log(single / "log.jsonl"), read_log(out / "log.jsonl")
    assert [r["step"] for r in one] == [r["step"] for r in two]  # one writer: no line twice
    for a, b in zip(one, two):
        for key in ("loss", "val_loss", "lr", "tokens"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=2e-5), (a, b)
    wa = load_file(single / "ckpt-0000006/model.safetensors")
    wb = load_file(out / "ckpt-0000006/model.safetensors")  # FSDP: gathered to full tensors on rank 0
    assert wa.keys() == wb.keys()
    for k in wa:
        assert wa[k].shape == wb[k].shape
        assert (wa[k] - wb[k]).abs().max() < 1e-4, k
    assert json.loads((out / "ckpt-0000006/params.json").read_text())["n_layers"] == 2
