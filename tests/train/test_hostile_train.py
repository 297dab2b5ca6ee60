"""Training under faults: a damaged newest checkpoint, a process killed while writing one, a full
disk, a resume with other flags, LoRA seeding and LoRA checkpoints, and ranks under torchrun.

Every case asserts the exit status, one line naming the argument or file, no traceback, and that
nothing outside its place was written or changed; resumed runs are compared bitwise with an
uninterrupted one."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from annotated_llama import ModelArgs, Tokenizer, Transformer

from fixtures import RECORDS, REPO, cli



def args6(shards, params_json, out, steps=6, *extra):  # noqa: F811
    return ["pretrain", "--data", shards, "--preset", params_json, "--out", out, "--max-steps", steps,
            "--batch-size", 2, "--seq-len", 16, "--lr", 3e-3, "--warmup-steps", 2, "--dtype", "float32",
            "--log-every", 1, "--eval-windows", 1, "--ckpt-every", 2, "--keep-checkpoints", 3, "--seed", 3, *extra]


def errors(stderr: str) -> list[str]:
    # stderr without the training log's progress lines ("step=3 loss=...", "resuming from ...")
    info = ("step=", "resuming from", "data: ", "trainable parameters: ")  # and fine-tuning's two lines
    return [line for line in stderr.strip().splitlines() if not line.startswith(info)]


def one_line(proc, *needles):
    lines = errors(proc.stderr)
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for n in needles:
        assert str(n) in lines[0], (n, lines[0])
    return lines[0]


def weights(ckpt):
    return load_file(Path(ckpt) / "model.safetensors")


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def whole(shards, params_json, tmp_path_factory):  # noqa: F811
    """An uninterrupted 6-step run: ckpt-2, ckpt-4, ckpt-6."""
    out = tmp_path_factory.mktemp("whole") / "run"
    cli(*args6(shards, params_json, out))
    assert sorted(p.name for p in out.glob("ckpt-*")) == ["ckpt-0000002", "ckpt-0000004", "ckpt-0000006"]
    return out


def damaged_copy(whole, tmp_path, damage):
    run = tmp_path / "run"
    shutil.copytree(whole, run)
    damage(run / "ckpt-0000006")
    return run


DAMAGES = {
    "truncated weights": lambda c: (c / "model.safetensors").write_bytes((c / "model.safetensors").read_bytes()[:999]),
    "garbage weights": lambda c: (c / "model.safetensors").write_bytes(b"\0" * 5000),
    "truncated state": lambda c: (c / "train_state.pt").write_bytes((c / "train_state.pt").read_bytes()[:300]),
    "empty state": lambda c: (c / "train_state.pt").write_bytes(b""),
    "state of another step": lambda c: shutil.copyfile(c.parent / "ckpt-0000004" / "train_state.pt",
                                                       c / "train_state.pt"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_newest_checkpoint_falls_back_to_the_newest_intact_one(whole, shards, params_json, tmp_path,
                                                                         damage):  # noqa: F811
    run = damaged_copy(whole, tmp_path, DAMAGES[damage])
    proc = cli(*args6(shards, params_json, run), "--resume")
    lines = [line for line in proc.stderr.splitlines() if not line.startswith(("step=", "loss="))]
    assert any("skipping a damaged checkpoint" in line and "ckpt-0000006" in line for line in lines), proc.stderr
    assert any("resuming from" in line and "ckpt-0000004" in line for line in lines), proc.stderr
    assert same(weights(run / "ckpt-0000006"), weights(whole / "ckpt-0000006"))  # bitwise the uninterrupted run
    assert not list(run.glob(".tmp-*"))


def test_no_intact_checkpoint_is_one_line(whole, shards, params_json, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    shutil.copytree(whole, run)
    for c in run.glob("ckpt-*"):
        (c / "train_state.pt").write_bytes(b"x")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    one_line(cli(*args6(shards, params_json, run), "--resume", check=False), "--resume", "train_state.pt")
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_resume_with_changed_flags_is_refused_naming_them(whole, shards, params_json, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    shutil.copytree(whole, run)
    shutil.rmtree(run / "ckpt-0000006")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    tried = 0
    for extra, named in ((["--lr", 1e-2], ["--lr"]),
                         (["--batch-size", 3, "--seq-len", 8], ["--batch-size", "--seq-len"]),
                         (["--seed", 4], ["--seed"]), (["--max-steps", 8], ["--max-steps"]),
                         (["--grad-accum", 2], ["--grad-accum"]), (["--weight-decay", 0.0], ["--weight-decay"])):
        argv = args6(shards, params_json, run)
        for flag, value in zip(extra[::2], extra[1::2]):
            if flag in argv:
                argv[argv.index(flag) + 1] = value
            else:
                argv += [flag, value]
        line = one_line(cli(*argv, "--resume", check=False), "--resume", "--allow-changed-flags", *named)
        assert "ckpt-0000004" in line
        assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
        tried += 1
    # the same flags resume (bitwise); changed ones with the override flag continue, and say so
    cli(*args6(shards, params_json, run), "--resume")
    assert same(weights(run / "ckpt-0000006"), weights(whole / "ckpt-0000006"))
    shutil.rmtree(run / "ckpt-0000006")
    argv = args6(shards, params_json, run)
    argv[argv.index("--lr") + 1] = 1e-2
    proc = cli(*argv, "--resume", "--allow-changed-flags")
    assert "resuming with changed flags: --lr 0.003 -> --lr 0.01" in proc.stderr
    assert tried == 6


def test_a_new_run_over_an_old_one_needs_force(whole, shards, params_json, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    shutil.copytree(whole, run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    one_line(cli(*args6(shards, params_json, run), check=False), "--out", "--resume", "--force")
    one_line(cli(*args6(shards, params_json, run), "--resume", "--force", check=False), "--resume", "--force")
    # its own inputs, never, not even with --force
    one_line(cli(*args6(shards, params_json, shards), "--force", check=False), "--out", "never written over")
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    cli(*args6(shards, params_json, run, 2), "--force")  # replaced: the old run's checkpoints are gone
    assert sorted(p.name for p in run.glob("ckpt-*")) == ["ckpt-0000002"]


# ---- a full disk -------------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["torch.save ENOSPC", "safetensors os error 28", "write_files ENOSPC"])
def test_disk_full_while_checkpointing_is_one_line_and_keeps_the_previous(shards, params_json, tmp_path,
                                                                          monkeypatch, how):  # noqa: F811
    import annotated_llama.train.checkpoint as checkpoint

    calls = {"n": 0}
    real_save, real_save_file = checkpoint.torch.save, checkpoint.save_file

    def full_after_first(write):
        def wrapper(obj, path, *a, **kw):
            calls["n"] += 1
            if calls["n"] > 1:  # the second checkpoint: half a file, then the disk is full
                Path(path).write_bytes(b"half")
                if how.startswith("safetensors"):
                    raise Exception("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                                    "message: \"No space left on device\" })")
                raise OSError(errno.ENOSPC, "No space left on device")
            return write(obj, path, *a, **kw)
        return wrapper

    if how.startswith("torch.save"):
        monkeypatch.setattr(checkpoint.torch, "save", full_after_first(real_save))
    elif how.startswith("safetensors"):
        monkeypatch.setattr(checkpoint, "save_file", full_after_first(real_save_file))
    else:  # the caller's params.json/tokenizer.model hook: pretrain's copyfile
        import annotated_llama.train.pretrain as pretrain
        monkeypatch.setattr(pretrain.shutil, "copyfile", full_after_first(shutil.copyfile))
    run = tmp_path / "run"
    proc = cli(*args6(shards, params_json, run), check=False)
    line = one_line(proc, "disk full writing", "ckpt-0000004", "ckpt-0000002 is kept")
    assert line.startswith("annotated-llama pretrain: error: ")
    assert sorted(p.name for p in run.iterdir()) == ["ckpt-0000002", "log.jsonl"]  # no .tmp-ckpt-* left
    weights(run / "ckpt-0000002")  # the previous checkpoint is whole
    monkeypatch.undo()
    cli(*args6(shards, params_json, run, 4), "--resume", "--allow-changed-flags")  # and resumes


UNSHARE = shutil.which("unshare")


def _tmpfs_available():
    if UNSHARE is None:
        return False
    probe = subprocess.run([UNSHARE, "--user", "--map-root-user", "--mount", "sh", "-c",
                            "mount -t tmpfs -o size=64k tmpfs /mnt"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _tmpfs_available(), reason="needs unshare and a user namespace to mount a tmpfs")
def test_disk_full_on_a_small_tmpfs(shards, params_json, tmp_path):  # noqa: F811
    # A real full disk: a tmpfs of 1.3 MB (mounted in a private namespace, no root needed) holds
    # two checkpoints of this model (~0.5 MB each), not a third.
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = (f"import json, os, sys; sys.path.insert(0, {str(REPO / 'tests')!r})\n"
              "from fixtures import cli\n"
              f"argv = {[str(a) for a in args6(shards, params_json, mnt / 'run', 8)]!r}\n"
              "proc = cli(*argv, check=False)\n"
              f"names = sorted(os.listdir({str(mnt / 'run')!r}))\n"
              "print(json.dumps({'rc': proc.returncode, 'err': proc.stderr, 'names': names}))\n")
    cmd = [UNSHARE, "--user", "--map-root-user", "--mount", "sh", "-c",
           f"mount -t tmpfs -o size=1300k tmpfs {mnt} && exec {sys.executable} -c \"$0\"", script]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    errors = [line for line in result["err"].splitlines() if "error" in line]
    assert result["rc"] == 2 and len(errors) == 1 and "Traceback" not in result["err"], result
    assert "disk full writing" in errors[0] and "is kept" in errors[0], errors
    assert not [n for n in result["names"] if n.startswith(".tmp")], result["names"]
    assert any(n.startswith("ckpt-") for n in result["names"]), result["names"]


# ---- killed while writing a checkpoint ----------------------------------------------------------

def test_killed_while_writing_a_checkpoint_resumes_bitwise(whole, shards, params_json, tmp_path):  # noqa: F811
    # SIGKILL from inside torch.save of the second checkpoint: a half-written temporary dir is left
    run = tmp_path / "run"
    script = (f"import os, signal, sys; sys.path.insert(0, {str(REPO / 'tests')!r})\n"
              "import annotated_llama.train.checkpoint as c\n"
              "real, n = c.torch.save, [0]\n"
              "def save(obj, path, *a, **k):\n"
              "    n[0] += 1\n"
              "    if n[0] == 2:\n"
              "        open(path, 'wb').write(b'half')\n"
              "        os.kill(os.getpid(), signal.SIGKILL)\n"
              "    return real(obj, path, *a, **k)\n"
              "c.torch.save = save\n"
              "from annotated_llama.__main__ import main\n"
              f"main({[str(a) for a in args6(shards, params_json, run)]!r})\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert proc.returncode == -signal.SIGKILL
    assert [p.name for p in run.glob(".tmp-ckpt-*")] and not (run / "ckpt-0000004").exists()
    cli(*args6(shards, params_json, run), "--resume")
    assert same(weights(run / "ckpt-0000006"), weights(whole / "ckpt-0000006"))
    assert not list(run.glob(".tmp-*"))


# ---- LoRA and full fine-tuning ----------------------------------------------------------------

@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_tokenizer_path):  # noqa: F811
    from annotated_llama.weights import save_model

    tok = Tokenizer(tiny_tokenizer_path)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("base") / "model"
    save_model(Transformer(ModelArgs.from_name("tiny", vocab_size=tok.n_words, max_seq_len=128)), tok, out,
               format="ours")
    return out


@pytest.fixture
def data(tmp_path):
    p = tmp_path / "train.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return p


def ft(base, data, out, *extra):
    return ["finetune", "--model", base, "--data", data, "--out", out, "--max-steps", 4, "--batch-size", 2,
            "--lr", 3e-3, "--dtype", "float32", "--log-every", 100, "--ckpt-every", 2, *extra]


def test_two_seeded_lora_runs_are_byte_identical(base, data, tmp_path):
    outs = []
    for i, global_seed in enumerate((0, 12345)):
        torch.manual_seed(global_seed)  # whatever the process did before: --seed alone decides
        outs.append(tmp_path / f"run{i}")
        cli(*ft(base, data, outs[-1], "--lora", "--seed", 0))
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name
    cli(*ft(base, data, tmp_path / "seed1", "--lora", "--seed", 1))
    assert (tmp_path / "seed1" / "adapter_model.safetensors").read_bytes() != \
        (outs[0] / "adapter_model.safetensors").read_bytes()


def test_lora_checkpoints_hold_only_what_trains_and_resume_bitwise(base, data, tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    cli(*ft(base, data, whole, "--lora", "--lora-targets", "all"))
    ckpt = whole / "ckpt-0000004"
    saved = weights(ckpt)
    assert saved and all("lora_A" in k or "lora_B" in k for k in saved)  # no frozen base weights
    base_bytes = (base / "model.safetensors").stat().st_size
    assert (ckpt / "model.safetensors").stat().st_size < base_bytes / 4
    state = torch.load(ckpt / "train_state.pt", weights_only=True)
    assert len(state["optimizer"]["state"]) == len(saved)  # AdamW moments of the adapters alone
    # interrupted after step 2: resume gives the uninterrupted adapter, bit for bit
    cli(*ft(base, data, cut, "--lora", "--lora-targets", "all", "--max-steps", 4))
    shutil.rmtree(cut / "ckpt-0000004")  # as if killed before its last checkpoint
    for f in ("adapter_model.safetensors", "adapter_config.json"):
        (cut / f).unlink()
    cli(*ft(base, data, cut, "--lora", "--lora-targets", "all"), "--resume")
    assert (cut / "adapter_model.safetensors").read_bytes() == (whole / "adapter_model.safetensors").read_bytes()
    # another LoRA shape on resume: named, not a traceback
    one_line(cli(*ft(base, data, cut, "--lora", "--lora-targets", "all", "--lora-r", 4), "--resume", check=False),
             "--lora-r")


def test_finetune_never_writes_over_its_model_or_an_earlier_output(base, data, tmp_path):
    before = {p: p.read_bytes() for p in base.rglob("*") if p.is_file()}
    for extra in ([], ["--lora"], ["--force"], ["--lora", "--force"]):
        one_line(cli(*ft(base, data, base, *extra), check=False), "--out", "input", "never written over")
        one_line(cli(*ft(base, data, base.parent, *extra), check=False), "--out", "holds")
    assert {p: p.read_bytes() for p in base.rglob("*") if p.is_file()} == before
    out = tmp_path / "full"
    cli(*ft(base, data, out))
    after_first = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    one_line(cli(*ft(base, data, out), check=False), "--out", "already exists", "--force")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == after_first
    cli(*ft(base, data, out, "--force"))  # replaced on request


# ---- ranks under torchrun -----------------------------------------------------------------------

@pytest.mark.slow
def test_ranks_fail_with_one_line_and_the_launcher_stays_quiet(shards, tmp_path):  # noqa: F811
    bad = tmp_path / "params.json"
    bad.write_text(json.dumps({"dim": 32, "n_layers": 2, "n_heads": 4, "vocab_size": 999}))  # not the data's 400
    argv = ["pretrain", "--data", shards, "--preset", bad, "--out", tmp_path / "run", "--max-steps", 2,
            "--batch-size", 2, "--seq-len", 16, "--parallel", "ddp", "--dtype", "float32"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    # two ranks fail alike: rank 0's line is the whole output (rank 1 stays silent, and torchrun's own
    # ChildFailedError traceback, which plain `torchrun` prints after it, is caught: train/launch.py)
    proc = subprocess.run([sys.executable, "-m", "annotated_llama", *map(str, argv), "--nproc-per-node", "2"],
                          capture_output=True, text=True, timeout=180, env=env)
    one_line(proc, "annotated-llama pretrain: error:", "999", "400")
    assert not (tmp_path / "run").exists()


def test_ranks_under_torchrun_say_one_line_between_them(monkeypatch, capsys):
    # In-process, with torchrun's environment: rank 0 reports a bad input, rank 1 stays silent (it ran
    # the same checks); a rank whose peer died reports nothing of gloo's (no peer address), rank 0 one line.
    import annotated_llama.cli.tokenize as command
    from annotated_llama.__main__ import main

    def fails_with(error):
        def run(args):
            raise error
        return run

    cases = [(ValueError("--preset x.json: vocab_size 999 does not match the tokenizer's 400"), 0, "vocab_size 999"),
             (ValueError("--preset x.json: vocab_size 999 does not match the tokenizer's 400"), 1, None),
             (RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:29500"), 1, None),
             (RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:29500"), 0,
              "another process of this run stopped")]
    for error, rank, said in cases:
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setattr(command, "run", fails_with(error))
        assert main(["tokenize", "x"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        if said is None:
            assert err == [], err
        else:
            assert len(err) == 1 and said in err[0] and "127.0.0.1" not in err[0], err
    monkeypatch.setenv("WORLD_SIZE", "1")  # alone, a RuntimeError is a bug: its traceback stays
    with pytest.raises(RuntimeError):
        main(["tokenize", "x"])
