"""Downloads against a local HTTP server that drops, stalls, corrupts and refuses."""

import os

import pytest

from annotated_llama.__main__ import main

from fixtures import md5, payload


def download(*argv):
    return main(["download", "--timeout", "0.5", "--backoff", "0.01", "--quiet", *map(str, argv)])


def final_names(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and not p.name.endswith(".part"))


def test_dropped_connection_resumes_from_the_right_byte(server, tmp_path):
    data = payload(300_000)
    server.files["/w.bin"] = data
    server.plans["/w.bin"] = ["drop:100000", "drop:50000", "ok"]
    assert download("--url", f"{server.url}/w.bin", "--dest", tmp_path / "w.bin", "--md5", md5(data)) == 0
    assert server.requests("/w.bin") == [None, "bytes=100000-", "bytes=150000-"]
    assert (tmp_path / "w.bin").read_bytes() == data
    assert not (tmp_path / "w.bin.part").exists()


def test_stalled_server_is_abandoned_after_the_read_timeout(server, tmp_path):
    data = payload(200_000)
    server.files["/w.bin"] = data
    server.plans["/w.bin"] = ["stall:70000", "ok"]
    assert download("--url", f"{server.url}/w.bin", "--dest", tmp_path / "w.bin", "--md5", md5(data)) == 0
    assert not server.release.is_set()  # finished while the first response was still hanging
    assert server.requests("/w.bin") == [None, "bytes=70000-"]
    assert (tmp_path / "w.bin").read_bytes() == data


def test_corrupt_bytes_fail_md5_and_are_fetched_again(server, tmp_path):
    data = payload(50_000)
    server.files["/w.bin"] = data
    server.plans["/w.bin"] = ["corrupt", "ok"]
    assert download("--url", f"{server.url}/w.bin", "--dest", tmp_path / "w.bin", "--md5", md5(data)) == 0
    assert server.requests("/w.bin") == [None, None]  # the bad bytes were not resumed from
    assert (tmp_path / "w.bin").read_bytes() == data


def test_always_corrupt_never_gets_the_final_name(server, tmp_path, capsys):
    server.files["/w.bin"] = payload(20_000)
    server.plans["/w.bin"] = ["corrupt"]
    rc = download("--url", f"{server.url}/w.bin", "--dest", tmp_path / "w.bin", "--md5", md5(payload(20_000)),
                  "--retries", "2")
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "md5 mismatch" in err[0]
    assert final_names(tmp_path) == [] and not (tmp_path / "w.bin.part").exists()


def test_server_that_ignores_range_restarts_cleanly(server, tmp_path):
    data = payload(120_000)
    server.files["/w.bin"] = data
    server.plans["/w.bin"] = ["drop:40000", "ignore-range"]
    assert download("--url", f"{server.url}/w.bin", "--dest", tmp_path / "w.bin", "--md5", md5(data)) == 0
    assert (tmp_path / "w.bin").read_bytes() == data


@pytest.mark.parametrize("code, words", [(403, "expired"), (404, "Not Found")])
def test_403_and_404_are_one_line_messages(server, tmp_path, capsys, code, words):
    server.files["/w.bin"] = payload(1000)
    server.plans["/w.bin"] = [code]
    rc = download("--url", f"{server.url}/w.bin?Signature=secret", "--dest", tmp_path / "w.bin")
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert str(code) in err[0] and words in err[0] and "secret" not in err[0]
    assert final_names(tmp_path) == []


def meta_release(server, models):
    """Meta's bucket layout: tokenizer files at the top, one folder per model with its shards."""
    tokenizer = payload(5000, seed=1)
    server.files["/tokenizer.model"] = tokenizer
    server.files["/tokenizer_checklist.chk"] = f"{md5(tokenizer)}  tokenizer.model\n".encode()
    for model, shards in models.items():
        sums = {}
        for i in range(shards):
            sums[f"consolidated.{i:02d}.pth"] = payload(30_000 + i, seed=i + 2)
        sums["params.json"] = b'{"dim": 4096, "n_layers": 32, "n_heads": 32, "vocab_size": -1}'
        for name, data in sums.items():
            server.files[f"/{model}/{name}"] = data
        server.files[f"/{model}/checklist.chk"] = "".join(f"{md5(d)}  {n}\n" for n, d in sums.items()).encode()


def test_meta_layout_with_a_flaky_server(server, tmp_path):
    meta_release(server, {"7B": 1, "13B": 2})
    server.plans["/13B/consolidated.01.pth"] = ["drop:10000", "corrupt", "ok"]
    url = f"{server.url}/*?Policy=abc&Signature=xyz"
    assert download("--meta-url", url, "--models", "7B,13B", "--dest", tmp_path / "llama") == 0
    assert final_names(tmp_path / "llama") == sorted([
        "tokenizer.model", "tokenizer_checklist.chk", "7B/checklist.chk", "7B/consolidated.00.pth", "7B/params.json",
        "13B/checklist.chk", "13B/consolidated.00.pth", "13B/consolidated.01.pth", "13B/params.json"])
    for name in final_names(tmp_path / "llama"):
        assert (tmp_path / "llama" / name).read_bytes() == server.files["/" + name]
    assert all(query == "Policy=abc&Signature=xyz" for _, _, query in server.log)
    assert server.requests("/13B/consolidated.01.pth") == [None, "bytes=10000-", None]
    # Running again fetches only the checklists (afresh: they verify everything else); every other
    # file is verified in place by its md5.
    before = len(server.log)
    assert download("--meta-url", url, "--models", "7B,13B", "--dest", tmp_path / "llama") == 0
    again = server.log[before:]
    assert sorted(p for p, _, _ in again) == ["/13B/checklist.chk", "/7B/checklist.chk", "/tokenizer_checklist.chk"]
    assert all(rng is None for _, rng, _ in again)


def test_meta_layout_stops_at_an_expired_link_keeping_verified_files(server, tmp_path, capsys):
    meta_release(server, {"13B": 2})
    server.plans["/13B/consolidated.01.pth"] = ["drop:5000", 403]
    rc = download("--meta-url", f"{server.url}/*?sig=1", "--models", "13B", "--dest", tmp_path)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "403" in err[0] and "new URL" in err[0]
    names = final_names(tmp_path)
    assert "13B/consolidated.00.pth" in names and "13B/consolidated.01.pth" not in names
    assert (tmp_path / "13B" / "consolidated.01.pth.part").stat().st_size == 5000  # kept for resuming
    server.plans["/13B/consolidated.01.pth"] = ["ok"]  # a fresh link: resumes at byte 5000
    assert download("--meta-url", f"{server.url}/*?sig=2", "--models", "13B", "--dest", tmp_path) == 0
    assert server.requests("/13B/consolidated.01.pth")[-1] == "bytes=5000-"
    assert (tmp_path / "13B" / "consolidated.01.pth").read_bytes() == server.files["/13B/consolidated.01.pth"]


def test_existing_corrupt_file_is_replaced_only_with_force(server, tmp_path, capsys):
    data = payload(40_000)
    server.files["/w.bin"] = data
    (tmp_path / "w.bin").write_bytes(b"x" * 40_000)  # final name, wrong bytes (same size)
    assert download("--url", f"{server.url}/w.bin", "--dest", tmp_path / "w.bin", "--md5", md5(data)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "w.bin: already exists" in err[0] and "--force" in err[0]
    assert (tmp_path / "w.bin").read_bytes() == b"x" * 40_000 and server.log == []
    assert download("--url", f"{server.url}/w.bin", "--dest", tmp_path / "w.bin", "--md5", md5(data), "--force") == 0
    assert (tmp_path / "w.bin").read_bytes() == data


def test_bad_arguments_are_one_line_errors(tmp_path, capsys):
    assert download("--meta-url", "http://127.0.0.1:9/no-star", "--dest", tmp_path) == 2
    assert download("--url", "http://127.0.0.1:9/x", "--dest", tmp_path / "x", "--md5", "abc") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "'*'" in err[0] and "--md5" in err[1]
    assert os.listdir(tmp_path) == []
