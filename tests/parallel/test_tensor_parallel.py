"""Tensor parallelism (annotated_llama/parallel/tensor_parallel.py, tp_checkpoint.py, tp_launch.py) on 2 and 4
CPU processes under torchrun (gloo), against the single-process model. This file is also the worker script torchrun runs:
`python tests/parallel/test_tensor_parallel.py MODE DIR`.

The checkpoints are written here from one random tiny model, split by Meta's rules as this file
states them (meta-llama/llama model.py's fairscale layers; HF convert_llama_weights_to_hf.py), independently of the module under test.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from annotated_llama import ModelArgs, Transformer

# tests/assets (not fixtures.DATA: torchrun runs this file as a script, without tests/ on the path)
ASSETS = Path(__file__).resolve().parents[1] / "assets"


# GQA with H/K = 2, and everything divisible by 4 so a 4-shard checkpoint exists.
TINY = dict(dim=64, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=512, multiple_of=32, max_seq_len=64)
# Big enough that per-rank memory dominates the noise, small enough to write and read in a second.
MEMORY = dict(dim=512, n_layers=4, n_heads=8, n_kv_heads=4, vocab_size=2048, multiple_of=256, max_seq_len=64)
VARIANTS = ["meta-1", "meta-2", "meta-4", "meta-2-vocab", "safetensors", "hf"]
DEADLINE = 150  # seconds for one launch: a hang fails the test instead of the CI job


# ---- checkpoints, split by Meta's rules -------------------------------------------------

def meta_split_dim(name: str, vocab_parallel: bool):
    if name.endswith(("norm.weight",)):
        return None  # replicated
    if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
        return 1  # row-parallel: input columns
    if name == "tok_embeddings.weight":
        return 0 if vocab_parallel else 1  # Llama 3's VocabParallelEmbedding vs LLaMA 1/2's ParallelEmbedding
    return 0  # wq, wk, wv, w1, w3, output: output rows (whole heads, since heads divide by n)


def save_meta(sd, args: ModelArgs, out: Path, n: int, vocab_parallel=False):
    out.mkdir(parents=True)
    params = args.to_params_json()
    params["vocab_size"] = -1  # as Meta ships it
    (out / "params.json").write_text(json.dumps(params))
    for s in range(n):
        shard = {}
        for name, t in sd.items():
            d = meta_split_dim(name, vocab_parallel)
            shard[name] = (t if d is None else t.chunk(n, d)[s]).clone()
        shard["rope.freqs"] = torch.zeros(args.head_dim // 2)  # LLaMA 1 ships it; loaders ignore it
        torch.save(shard, out / f"consolidated.{s:02d}.pth")


def random_model(preset: dict, seed: int) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(ModelArgs(**preset))
    with torch.no_grad():
        for p in model.parameters():  # bigger than the default init, so logits differ by more than noise
            p.normal_(0, 0.5 if p.ndim == 1 else 0.2).add_(1.0 if p.ndim == 1 else 0.0)
    return model.eval()


def exercise(model) -> dict:
    """Every kind of forward call, then greedy decoding; same calls on one process or on rank 0."""
    from annotated_llama.core.kv_cache import KVCache

    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, model.params.vocab_size, (2, 10), generator=g)  # (B, T)
    out = {}
    with torch.inference_mode():
        model.clear_cache()
        out["prefill"] = model(tokens[:, :7])  # Meta's contract: the model's own cache
        out["decode"] = torch.cat([model(tokens[:, 7 + i:8 + i], 7 + i) for i in range(3)], dim=1)
        # the engine's contract: ragged rows in one call (row 1 padded), then rows at their own positions
        cache = KVCache.for_model(model, max_tokens=64, block_size=4)
        out["ragged"] = model.step(tokens, torch.arange(10).expand(2, 10), cache.plan(["a", "b"], [0, 0], [10, 6], 10))
        out["per_row"] = model.step(tokens[:, :1], torch.tensor([[10], [6]]), cache.plan(["a", "b"], [10, 6], [1, 1], 1),
                                    logits_at=torch.tensor([0, 0]))
        cache.fork("b", "c")  # n samples of one prompt: shared blocks, copied on write
        out["forked"] = model.step(tokens[:, 1:2], torch.tensor([[7], [7]]), cache.plan(["b", "c"], [7, 7], [1, 1], 1))
        out["no_cache"] = model(tokens, cache=False)
        model.clear_cache()
        seq = tokens[:1, :4]
        logits = model(seq)
        for _ in range(16):
            nxt = logits[:, -1].argmax(-1, keepdim=True)  # (1, 1)
            seq = torch.cat([seq, nxt], dim=1)
            logits = model(nxt, seq.shape[1] - 1)
        out["greedy"] = seq[0].tolist()
        out["cache_kv_heads"] = cache.n_kv_heads
    return out


# ---- the worker (runs under torchrun) ---------------------------------------------------

def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def measure_load(load, warm_up) -> dict:
    """Peak resident memory (MB) above the resident memory before `load()`. `warm_up()` loads a
    tiny checkpoint the same way first: lazy imports and allocator arenas (~80 MB) are not the model."""
    warm_up()
    before = _status_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    result = load()
    return {"peak_mb": _status_mb("VmHWM") - before, "result": result}


def worker(mode: str, workdir: Path) -> int:
    import torch.distributed as dist

    from annotated_llama.parallel import tensor_parallel as tp
    from annotated_llama.parallel.tp_checkpoint import build_rank_model
    from annotated_llama.parallel.tp_launch import run_tensor_parallel

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if mode == "baseline":  # the single-process load: one torch.load of the whole checkpoint
        def load(name, vocab_size):
            sd = torch.load(workdir / name / "consolidated.00.pth", weights_only=True)
            with torch.device("meta"):
                model = Transformer(ModelArgs.from_params_json(workdir / name / "params.json", vocab_size=vocab_size))
            sd.pop("rope.freqs")
            model.load_state_dict(sd, assign=True)
            return model
        m = measure_load(lambda: load("memory", MEMORY["vocab_size"]), lambda: load("meta-1", TINY["vocab_size"]))
        (workdir / "baseline.json").write_text(json.dumps({"peak_mb": m["peak_mb"]}))
        return 0
    if mode == "run":  # run_tensor_parallel (serve's entry) with a front end that prints greedy tokens
        path, n = sys.argv[3], int(sys.argv[4])

        def front_end(model):
            print("greedy", exercise(model)["greedy"], flush=True)

        try:
            return run_tensor_parallel(path, n, front_end)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2

    # mode "parity": memory first (a fresh process), then every checkpoint variant;
    # mode "parity-no-memory": the variants alone (4 ranks on 2 cores: the memory figure is for 2)
    results = {}
    if mode == "parity":
        m = measure_load(lambda: build_rank_model(workdir / "memory", world, rank),
                         lambda: build_rank_model(workdir / "meta-1", world, rank))
        memory = {"peak_mb": m["peak_mb"], "params_mb": sum(p.numel() * 4 for p in m["result"].parameters()) / 2**20}
        del m
    dist.init_process_group("gloo")
    if mode == "parity":
        results["memory"] = [None] * world
        dist.all_gather_object(results["memory"], memory)
    for variant in VARIANTS:
        model = build_rank_model(workdir / variant, world, rank)
        if rank == 0:
            tp.lead(model)
            results[variant] = exercise(model)
            tp.stop_followers(model)
        else:
            tp.follow(model)
    if rank == 0:
        torch.save(results, workdir / f"results-{world}.pt")
    dist.barrier()
    dist.destroy_process_group()
    return 0


# ---- the tests ------------------------------------------------------------------------------

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
TORCHRUN_4 = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4"]


def run_together(commands, timeout=DEADLINE):
    """Run the commands at once (torch's import time dominates each); every one must finish
    within `timeout` seconds, so a hang fails the test instead of the CI job."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    procs = [subprocess.Popen(c, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for c in commands]
    deadline, results = time.time() + timeout, []
    try:
        for p in procs:
            out, err = p.communicate(timeout=max(1.0, deadline - time.time()))
            results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return results


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from safetensors.torch import save_file

    from annotated_llama.weights.hf import meta_to_hf_state_dict

    root = tmp_path_factory.mktemp("tp")
    model = random_model(TINY, seed=0)
    args, sd = model.params, model.state_dict()
    save_meta(sd, args, root / "meta-1", 1)
    save_meta(sd, args, root / "meta-2", 2)
    save_meta(sd, args, root / "meta-4", 4)
    save_meta(sd, args, root / "meta-2-vocab", 2, vocab_parallel=True)
    (root / "safetensors").mkdir()
    (root / "safetensors" / "params.json").write_text(json.dumps(args.to_params_json()))
    save_file({k: v.contiguous() for k, v in sd.items()}, root / "safetensors" / "model.safetensors")
    (root / "hf").mkdir()
    (root / "hf" / "config.json").write_text(json.dumps(args.to_hf_config()))
    save_file({k: v.contiguous() for k, v in meta_to_hf_state_dict(sd, args).items()}, root / "hf" / "model.safetensors")
    cli = random_model({**TINY, "vocab_size": 32000}, seed=2)  # LLaMA's 32k tokenizer fits it
    save_meta(cli.state_dict(), cli.params, root / "cli", 2)
    (root / "cli" / "tokenizer.model").write_bytes((ASSETS / "llama-spm.model").read_bytes())
    big = random_model(MEMORY, seed=1)
    save_meta(big.state_dict(), big.params, root / "memory", 1)
    return root, exercise(model)


@pytest.mark.slow
def test_two_ranks_match_one_process_and_load_a_slice(checkpoints):
    root, reference = checkpoints
    t0 = time.time()
    run, baseline = run_together([TORCHRUN + [__file__, "parity", str(root)],
                                  [sys.executable, __file__, "baseline", str(root)]])
    assert run.returncode == 0, run.stderr[-3000:]
    assert baseline.returncode == 0, baseline.stderr[-3000:]
    results = torch.load(root / "results-2.pt", weights_only=True)
    print(f"torchrun launch + baseline: {time.time() - t0:.1f} s")
    assert_matches(results, reference, world=2)

    single = json.loads((root / "baseline.json").read_text())["peak_mb"]
    for rank, m in enumerate(results["memory"]):
        print(f"rank {rank}: peak {m['peak_mb']:.1f} MB while loading its {m['params_mb']:.1f} MB slice; "
              f"single-process load {single:.1f} MB; ratio {m['peak_mb'] / single:.2f}")
        assert single > 50  # the model is 62 MB: the baseline really loaded it
        assert m["peak_mb"] < 0.6 * single + 4, (rank, m, single)


def assert_matches(results: dict, reference: dict, world: int) -> None:
    for variant in VARIANTS:
        got = results[variant]
        for key in ("prefill", "decode", "ragged", "per_row", "forked", "no_cache"):
            err = (got[key] - reference[key]).abs().max().item()
            print(f"{world} ranks {variant:13s} {key:9s} max |diff| = {err:.2e}")
            torch.testing.assert_close(got[key], reference[key], rtol=0, atol=1e-5, msg=f"{world} ranks {variant} {key}")
        assert got["greedy"] == reference["greedy"], variant
        assert got["cache_kv_heads"] == TINY["n_kv_heads"] // world  # each rank caches only its share


@pytest.mark.slow
def test_four_ranks_match_one_process(checkpoints):
    """4 ranks: 1 kv head each (TINY's 4 kv heads for 8 query heads), a 1-shard checkpoint read as
    quarters, a 2-shard one as halves of shards, a 4-shard one file by file, and safetensors/HF slices."""
    root, reference = checkpoints
    t0 = time.time()
    (run,) = run_together([TORCHRUN_4 + [__file__, "parity-no-memory", str(root)]])
    assert run.returncode == 0, run.stderr[-3000:]
    print(f"4-rank torchrun launch: {time.time() - t0:.1f} s")
    assert_matches(torch.load(root / "results-4.pt", weights_only=True), reference, world=4)


def test_tp_that_does_not_divide_the_heads_fails_before_starting_processes(checkpoints, capsys):
    from annotated_llama.__main__ import main

    assert main(["generate", "--model", str(checkpoints[0] / "cli"), "--tp", "3", "Hello"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["annotated-llama generate: error: --tp 3: the model's n_heads (8) is not divisible by 3"]


@pytest.mark.slow
def test_generate_tp_2_and_errors_end_every_rank(checkpoints, tmp_path, capsys):
    from annotated_llama.__main__ import main

    root, _ = checkpoints
    missing = tmp_path / "missing"
    missing.mkdir()
    for f in ("params.json", "consolidated.00.pth", "tokenizer.model"):  # rank 1's consolidated.01.pth is gone
        (missing / f).write_bytes((root / "cli" / f).read_bytes())
    generate = ["-m", "annotated_llama", "generate", "--temperature", "0", "--max-new-tokens", "12", "--json"]
    t0 = time.time()
    launches = [  # all at once: each spends most of its time importing torch
        [sys.executable, *generate, "--model", str(root / "cli"), "--tp", "2", "In the beginning"],
        [sys.executable, *generate, "--model", str(missing), "--tp", "2", "In the beginning"],
        TORCHRUN + [__file__, "run", str(root), str(root / "meta-2"), "4"],  # 2 processes, --tp 4
    ]
    tp_cli, no_file, mismatch = run_together(launches)
    print(f"3 launches: {time.time() - t0:.1f} s")

    # the single-process CLI (weights/ merges the shards) is the reference
    capsys.readouterr()
    assert main(generate[2:] + ["--model", str(root / "cli"), "In the beginning"]) == 0
    single = json.loads(capsys.readouterr().out)
    assert tp_cli.returncode == 0, tp_cli.stderr[-3000:]
    got = json.loads(tp_cli.stdout)  # rank 0 alone printed: one JSON object
    assert got["tokens"] == single["tokens"] and got["text"] == single["text"]
    assert len(got["tokens"]) == 12


    for bad, message in ((no_file, r"^annotated-llama generate: error: rank 1: \S+missing/consolidated\.01\.pth: "
                                   r"no such file \(rank 1 of 2 needs it; the checkpoint has 2 shards\)$"),
                         (mismatch, r"^error: --tp 4 does not match the 2 processes torchrun started")):
        print(bad.stderr.strip()[-400:])
        assert bad.returncode != 0  # and every rank ended before the deadline
        errors = [line for line in bad.stderr.splitlines() if "error:" in line]
        assert len(errors) == 1, bad.stderr[-3000:]  # one line, from rank 0 only
        assert re.search(message, errors[0]), errors[0]
    assert no_file.stderr.strip().count("\n") == 0  # the relaunching CLI passes on that line alone


def test_serve_tp_that_does_not_divide_the_heads_fails_before_starting_processes(checkpoints, capsys):
    from annotated_llama.__main__ import main

    t0 = time.time()
    assert main(["serve", "--model", str(checkpoints[0] / "cli"), "--tp", "3", "--port", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["annotated-llama serve: error: --tp 3: the model's n_heads (8) is not divisible by 3"]
    assert time.time() - t0 < 10  # no torchrun, no uvicorn


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_serve_tp_2_answers_like_one_process_and_stops_every_rank(checkpoints):
    """`serve --tp 2` (relaunched under torchrun): concurrent greedy completions, batched by the
    engine on rank 0 with every step mirrored on rank 1, equal Llama.text_completion's on
    one process; a SIGTERM to the command then ends every process, cleanly."""
    import signal
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    from annotated_llama.inference.generation import Llama

    root, _ = checkpoints
    model_dir = root / "cli"
    # Greedy runs on this random model can repeat one token; each prompt gets its own length so the
    # rows finish at different steps and free their blocks while the others go on.
    asks = [("In the beginning", 12), ("The capital of France is", 7), ("1 2 3 4", 10)]
    port = _free_port()
    t0 = time.time()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    server = subprocess.Popen(
        [sys.executable, "-m", "annotated_llama", "serve", "--tp", "2", "--model", str(model_dir),
         "--port", str(port), "--max-batch-size", "4"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # the reference, while the server starts: one process, weights/ merging the shards
        llama = Llama.build(str(model_dir), max_seq_len=TINY["max_seq_len"])
        want = [llama.text_completion([p], temperature=0, max_gen_len=n)[0]["generation"] for p, n in asks]

        url, deadline = f"http://127.0.0.1:{port}", time.time() + 60
        while True:
            assert server.poll() is None, server.stdout.read()[-3000:]
            assert time.time() < deadline, "serve --tp 2 did not answer /health within 60 s"
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        started = time.time() - t0

        def ask(prompt_and_n):
            prompt, n = prompt_and_n
            r = httpx.post(url + "/v1/completions", timeout=60,
                           json={"model": "cli", "prompt": prompt, "max_tokens": n, "temperature": 0})
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["text"]

        with ThreadPoolExecutor(len(asks)) as pool:  # at once: they share decode steps
            got = list(pool.map(ask, asks))
        assert got == want
        assert any(w for w in want)  # the comparison compared text
        stats = httpx.get(url + "/metrics", timeout=5)
        print(f"serve --tp 2: /health after {started:.1f} s; {len(asks)} completions equal; "
              f"{stats.text[:300] if stats.status_code == 200 else ''}")
    finally:
        ranks = _descendants(server.pid)  # torchrun and its ranks (each rank in a session of its own)
        stopped = time.time()
        server.terminate()  # SIGTERM to the command alone: it passes the stop on to the ranks
        try:
            server.wait(timeout=40)
        except subprocess.TimeoutExpired:
            server.kill()
        stop_deadline = time.time() + 10
        while (left := [pid for pid in ranks if _alive(pid)]) and time.time() < stop_deadline:
            time.sleep(0.2)
        for pid in left:
            os.kill(pid, signal.SIGKILL)
    log = server.stdout.read()
    print(f"{len(ranks)} processes gone {time.time() - stopped:.1f} s after SIGTERM; total {time.time() - t0:.1f} s")
    assert len(ranks) == 3, ranks  # torchrun + 2 ranks
    assert not left, f"processes still running after SIGTERM: {left}"
    assert server.returncode == 0, log[-3000:]
    assert "Traceback" not in log, log[-3000:]


class _Output:
    """Collects a pipe's text on a thread, so a test can wait for the first output while the process runs."""

    def __init__(self, pipe):
        import threading

        self.text = ""
        self.thread = threading.Thread(target=self._read, args=(pipe,), daemon=True)
        self.thread.start()

    def _read(self, pipe):
        for chunk in iter(lambda: pipe.read(64), ""):
            self.text += chunk


@pytest.mark.slow
def test_ctrl_c_ends_generate_and_serve_tp_2_quietly(checkpoints, tmp_path):
    """Ctrl-C at a terminal sends SIGINT to the foreground process group; here, to the group of each
    command, once `generate --tp 2` is streaming text and once `serve --tp 2` answers /health. Each
    must exit with status 130, print no traceback (from torchrun or any rank), and leave no process."""
    import signal

    import httpx

    root, _ = checkpoints
    long = tmp_path / "long"  # a long context: generation is still going when Ctrl-C comes
    model = random_model({**TINY, "vocab_size": 32000, "max_seq_len": 2048}, seed=3)
    save_meta(model.state_dict(), model.params, long, 2)
    (long / "tokenizer.model").write_bytes((root / "cli" / "tokenizer.model").read_bytes())
    port = _free_port()
    commands = {
        "generate": ["generate", "--model", str(long), "--tp", "2", "--temperature", "0", "--ignore-eos",
                     "--max-new-tokens", "0", "In the beginning"],
        "serve": ["serve", "--model", str(root / "cli"), "--tp", "2", "--port", str(port)],
    }
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    procs, outs, errs, ranks, t0 = {}, {}, {}, {}, time.time()
    try:
        for name, args in commands.items():  # both at once: each spends most of its time importing torch
            procs[name] = subprocess.Popen([sys.executable, "-m", "annotated_llama", *args], env=env, text=True,
                                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
            outs[name], errs[name] = _Output(procs[name].stdout), _Output(procs[name].stderr)

        def ready(name):
            if name == "generate":
                return len(outs[name].text) > 20  # streaming: rank 0 is inside its forward calls
            try:
                return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        waiting, deadline = set(commands), time.time() + 120
        while waiting:
            for name in sorted(waiting):
                assert procs[name].poll() is None, (name, errs[name].text[-3000:])
                if ready(name):
                    ranks[name] = _descendants(procs[name].pid)  # torchrun and its 2 ranks
                    os.killpg(procs[name].pid, signal.SIGINT)  # what the terminal does on Ctrl-C
                    print(f"{name}: Ctrl-C after {time.time() - t0:.1f} s")
                    waiting.discard(name)
            assert time.time() < deadline, f"not ready within 120 s: {waiting}"
            time.sleep(0.2)
        for name, p in procs.items():
            p.wait(timeout=60)
            outs[name].thread.join(5)
            errs[name].thread.join(5)
        stop_deadline = time.time() + 10
        while any(_alive(pid) for pids in ranks.values() for pid in pids) and time.time() < stop_deadline:
            time.sleep(0.2)
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        left = [pid for pids in ranks.values() for pid in pids if _alive(pid)]
        for pid in left:
            os.kill(pid, signal.SIGKILL)
    print(f"all stopped {time.time() - t0:.1f} s after the start")
    for name, p in procs.items():
        err = errs[name].text
        print(f"{name}: exit {p.returncode}; {len(outs[name].text)} characters out; stderr: {err[-600:]!r}")
        assert len(ranks[name]) == 3, (name, ranks[name])  # torchrun + 2 ranks were running at Ctrl-C
        assert p.returncode == 130, (name, err[-3000:])
        assert "Traceback" not in err + outs[name].text, (name, err[-3000:])
        assert not [line for line in err.splitlines() if "error" in line.lower() or "torch" in line], (name, err)
    assert errs["generate"].text.strip() == ""  # one empty line at most (after the interrupted text)
    assert not left, f"processes still running after Ctrl-C: {left}"


def _parents() -> dict[int, int]:
    parent = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    return parent


def _descendants(pid: int) -> list[int]:
    parent, found, frontier = _parents(), [], {pid}
    while frontier:
        frontier = {p for p, pp in parent.items() if pp in frontier}
        found += sorted(frontier)
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


if __name__ == "__main__":
    sys.exit(worker(sys.argv[1], Path(sys.argv[2])))
