"""The downloader against a malicious and a flaky server: names that try to leave --dest (in every
encoding), lengths that lie or are missing, stalls, files already in place, and a fake Hub.

Every case asserts the exit status, one line of error naming the argument or file, no traceback,
and that nothing outside its place was written or changed."""

import hashlib
import json
import os
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from annotated_llama.__main__ import main

from fixtures import md5, payload

# Names a remote side might send, each of which must be refused. Several encodings of the same
# escape: plain, absolute, Windows separators, percent-encoded, Unicode look-alikes, NUL.
TRAVERSALS = ["../evil", "../../evil", "a/../../evil", "/tmp/evil-abs", "..\\evil", "a\\..\\..\\evil", "C:evil",
              "%2e%2e/evil", "%2e%2e%2fevil", "..%2fevil", "\uff0e\uff0e/evil", "\u2024\u2024/evil",
              "a\u2215..\u2215evil", "\uff0e\uff0e\uff0fevil", "evil\x00.txt", ".", "..", "", "a//b", "./../evil",
              "a/./b", "x" * 300]


@pytest.fixture
def box(tmp_path):
    """(dest, snapshot): dest inside a sandbox whose other contents must never change."""
    sandbox = tmp_path / "sandbox"
    (sandbox / "outside").mkdir(parents=True)
    (sandbox / "outside" / "keep.txt").write_text("the user's file")
    dest = sandbox / "dest"

    def snapshot():
        return {str(p.relative_to(tmp_path)): p.read_bytes() for p in tmp_path.rglob("*")
                if p.is_file() and dest not in p.parents}
    return dest, snapshot


def run(capsys, *argv):
    """(exit status, stderr lines) of `annotated-llama download ARGV` in this process."""
    rc = main(["download", "--timeout", "0.5", "--backoff", "0.01", "--retries", "2", "--quiet", *map(str, argv)])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return rc, captured.err.strip().splitlines()


def finals(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.is_file() and not p.name.endswith(".part") and ".cache" not in p.parts)


# ---- names that try to leave --dest -----------------------------------------------------------

def meta_release(server, names, tokenizer=b"tok"):
    server.files["/tokenizer.model"] = tokenizer
    server.files["/tokenizer_checklist.chk"] = f"{md5(tokenizer)}  tokenizer.model\n".encode()
    shard = payload(3000)
    server.files["/7B/consolidated.00.pth"] = shard
    server.files["/7B/params.json"] = b"{}"
    lines = [f"{md5(shard)}  consolidated.00.pth", f"{md5(b'{}')}  params.json"]
    lines += [f"{md5(b'evil')}  {n}" for n in names]
    server.files["/7B/checklist.chk"] = ("\n".join(lines) + "\n").encode("utf-8", "surrogatepass")


def test_checklist_names_that_leave_dest_are_refused(server, box, capsys):
    dest, snapshot = box
    tried = 0
    for name in TRAVERSALS:
        if not name.strip() or "\n" in name:
            continue  # a checklist line cannot carry these; the Hub and header cases below do
        before = snapshot()
        server.log.clear()
        meta_release(server, [name])
        rc, err = run(capsys, "--meta-url", f"{server.url}/*?sig=x", "--models", "7B", "--dest", dest)
        assert rc == 2 and len(err) == 1, (name, err)
        assert "refused" in err[0] and "checklist.chk" in err[0], (name, err)
        assert snapshot() == before, name  # nothing outside dest written or changed
        assert not any("evil" in p for p, _, _ in server.log), name  # and the name never fetched
        assert not (dest / "7B" / "consolidated.00.pth").exists(), name  # refused before any file was fetched
        tried += 1
    assert tried >= 19


def test_model_names_and_symlinks_in_dest_are_refused(server, box, capsys, tmp_path):
    dest, snapshot = box
    meta_release(server, [])
    before = snapshot()
    for model in ("../7B", "7B/../../x", "7B/../..", "7B\\..\\..", "7B/\uff0e\uff0e"):
        rc, err = run(capsys, "--meta-url", f"{server.url}/*", "--models", model, "--dest", dest)
        assert rc == 2 and len(err) == 1 and "--models" in err[0] and "refused" in err[0], (model, err)
    assert server.log == [] and snapshot() == before
    # A symlink already in dest that points outside: a name through it is refused, not followed.
    meta_release(server, ["link/evil"])
    (dest / "7B").mkdir(parents=True)
    (dest / "7B" / "link").symlink_to(tmp_path / "sandbox" / "outside", target_is_directory=True)
    rc, err = run(capsys, "--meta-url", f"{server.url}/*", "--models", "7B", "--dest", dest)
    assert rc == 2 and len(err) == 1 and "outside" in err[0] and "'link/evil'" in err[0], err
    assert snapshot() == before
    # ... and a symlink at a file's own place (or its .part) too
    (dest / "7B" / "link").unlink()
    meta_release(server, [])
    (dest / "7B" / "params.json.part").symlink_to(tmp_path / "sandbox" / "outside" / "keep.txt")
    rc, err = run(capsys, "--meta-url", f"{server.url}/*", "--models", "7B", "--dest", dest)
    assert rc == 2 and len(err) == 1 and "params.json" in err[0] and "outside" in err[0], err
    assert snapshot() == before


@pytest.mark.parametrize("header", [
    'attachment; filename="../evil"', "attachment; filename*=UTF-8''..%2F..%2Fevil",
    'attachment; filename="/tmp/evil-abs"', 'attachment; filename="..\\\\evil"',
    "attachment; filename*=UTF-8''%EF%BC%8E%EF%BC%8E%EF%BC%8Fevil", 'attachment; filename="a/b"',
    'attachment; filename=".."'])
def test_content_disposition_names_that_leave_dest_are_refused(server, box, capsys, header):
    dest, snapshot = box
    dest.mkdir()
    server.files["/get"] = payload(2000)
    server.plans["/get"] = [f"cd:{header}"]
    before = snapshot()
    rc, err = run(capsys, "--url", f"{server.url}/get", "--dest", dest)
    assert rc == 2 and len(err) == 1 and "refused" in err[0], err
    assert snapshot() == before and finals(dest) == []


def test_url_into_a_dir_takes_a_safe_server_name(server, box, capsys):
    dest, snapshot = box
    dest.mkdir()
    data = payload(5000)
    server.files["/get"] = data
    server.plans["/get"] = ['cd:attachment; filename="model v2.gguf"']
    assert run(capsys, "--url", f"{server.url}/get", "--dest", dest)[0] == 0
    assert finals(dest) == ["model v2.gguf"] and (dest / "model v2.gguf").read_bytes() == data
    server.files["/dl/w%20x.bin"] = data  # no header: the URL's last segment, percent-decoded
    assert run(capsys, "--url", f"{server.url}/dl/w%20x.bin", "--dest", dest)[0] == 0
    assert (dest / "w x.bin").read_bytes() == data
    server.files["/dl/..%2Fevil"] = data  # decoded, it is a traversal
    rc, err = run(capsys, "--url", f"{server.url}/dl/..%2Fevil", "--dest", dest)
    assert rc == 2 and len(err) == 1 and "refused" in err[0]
    # An existing dir is never "already complete" for nothing: the file inside it is what counts.
    rc, err = run(capsys, "--url", f"{server.url}/dl/w%20x.bin", "--dest", dest)
    assert rc == 0 and (dest / "w x.bin").read_bytes() == data


# ---- lengths that lie or are missing --------------------------------------------------------

def test_lengths_missing_or_lying(server, box, capsys):
    dest, snapshot = box
    data = payload(50_000)
    url = f"{server.url}/w.bin"
    server.files["/w.bin"] = data
    cases = 0

    def fresh():
        for p in dest.glob("*"):
            p.unlink()
        server.log.clear()

    # 1. no Content-Length, whole body: proven only by a second request (416 states the length)
    fresh()
    server.plans["/w.bin"] = ["no-length", "ok"]
    assert run(capsys, "--url", url, "--dest", dest / "w.bin")[0] == 0
    assert server.requests("/w.bin") == [None, "bytes=50000-"] and (dest / "w.bin").read_bytes() == data
    cases += 1
    # 2. no Content-Length, cut short: resumed, never taken for the whole file
    fresh()
    server.plans["/w.bin"] = ["no-length-cut:20000", "ok"]
    assert run(capsys, "--url", url, "--dest", dest / "w.bin")[0] == 0
    assert server.requests("/w.bin") == [None, "bytes=20000-"] and (dest / "w.bin").read_bytes() == data
    cases += 1
    # 3. a server that never states a length and ignores Range: no final file, ever
    fresh()
    server.plans["/w.bin"] = ["no-length-cut:20000"]
    rc, err = run(capsys, "--url", url, "--dest", dest / "w.bin")
    assert rc == 2 and len(err) == 1 and "length" in err[0] and "--md5" in err[0], err
    assert finals(dest) == [] and (dest / "w.bin.part").stat().st_size == 20000
    cases += 1
    # 4. ... but with --md5 the content proves it
    fresh()
    server.plans["/w.bin"] = ["no-length"]
    assert run(capsys, "--url", url, "--dest", dest / "w.bin", "--md5", md5(data))[0] == 0
    assert server.requests("/w.bin") == [None]
    cases += 1
    # 5. Content-Length: abc
    fresh()
    server.plans["/w.bin"] = ["bad-length"]
    rc, err = run(capsys, "--url", url, "--dest", dest / "w.bin")
    assert rc == 2 and len(err) == 1 and "invalid Content-Length 'abc'" in err[0] and finals(dest) == []
    cases += 1
    # 6. a Content-Length above what is sent: resumed from where the body stopped
    fresh()
    server.plans["/w.bin"] = ["long-length", "ok"]
    assert run(capsys, "--url", url, "--dest", dest / "w.bin")[0] == 0
    assert (dest / "w.bin").read_bytes() == data and server.requests("/w.bin")[1] == "bytes=50000-"
    cases += 1
    # 7. a .part longer than the file: deleted and fetched again, never renamed
    fresh()
    (dest / "w.bin.part").write_bytes(data + b"junk")
    server.plans["/w.bin"] = ["ok"]
    assert run(capsys, "--url", url, "--dest", dest / "w.bin")[0] == 0
    assert server.requests("/w.bin") == ["bytes=50004-", None] and (dest / "w.bin").read_bytes() == data
    cases += 1
    # 8. a resumed response whose Content-Range total is smaller than what it sends
    fresh()
    (dest / "w.bin.part").write_bytes(data[:10_000])
    server.plans["/w.bin"] = ["bad-total", "ok"]
    assert run(capsys, "--url", url, "--dest", dest / "w.bin")[0] == 0
    assert (dest / "w.bin").read_bytes() == data
    cases += 1
    # 9. a chunked body cut before its last chunk: resumed
    fresh()
    server.plans["/w.bin"] = ["chunked-cut:30000", "ok"]
    assert run(capsys, "--url", url, "--dest", dest / "w.bin")[0] == 0
    assert server.requests("/w.bin") == [None, "bytes=30000-"] and (dest / "w.bin").read_bytes() == data
    cases += 1
    # 10. a server that lies about the file (short length): only an md5 can tell; it never gets the name
    fresh()
    server.plans["/w.bin"] = ["short-length:100"]
    rc, err = run(capsys, "--url", url, "--dest", dest / "w.bin", "--md5", md5(data))
    assert rc == 2 and len(err) == 1 and "md5 mismatch" in err[0] and finals(dest) == []
    cases += 1
    # 11. stalls: no headers at all, then a stall mid-body; both abandoned after the read timeout
    fresh()
    server.plans["/w.bin"] = ["stall-headers", "stall:7000", "ok"]
    t0 = time.monotonic()
    assert run(capsys, "--url", url, "--dest", dest / "w.bin")[0] == 0
    assert time.monotonic() - t0 < 10 and server.requests("/w.bin") == [None, None, "bytes=7000-"]
    assert (dest / "w.bin").read_bytes() == data
    cases += 1
    assert cases == 11


def test_an_existing_different_file_is_never_replaced_without_force(server, box, capsys):
    dest, snapshot = box
    data = payload(40_000)
    server.files["/w.bin"] = data
    url = f"{server.url}/w.bin"
    dest.mkdir()
    mine = dest / "w.bin"
    for content, md5_args in ((b"mine", []), (b"x" * 40_000, ["--md5", md5(data)]), (b"y" * 50_000, [])):
        mine.write_bytes(content)
        rc, err = run(capsys, "--url", url, "--dest", mine, *md5_args)
        assert rc == 2 and len(err) == 1 and "w.bin: already exists" in err[0] and "--force" in err[0], err
        assert mine.read_bytes() == content and not (dest / "w.bin.part").exists()
    # the same length as the server's file, no md5: taken as complete, said so, and nothing downloaded
    mine.write_bytes(data)
    server.log.clear()
    assert run(capsys, "--url", url, "--dest", mine)[0] == 0 and server.requests("/w.bin") == ["bytes=40000-"]
    # --force: replaced, but only by a complete new file
    mine.write_bytes(b"mine")
    server.plans["/w.bin"] = ["stall-headers"]
    rc, err = run(capsys, "--url", url, "--dest", mine, "--force")
    assert rc == 2 and mine.read_bytes() == b"mine"  # gave up: the old file is still there
    server.plans["/w.bin"] = ["ok"]
    assert run(capsys, "--url", url, "--dest", mine, "--force")[0] == 0 and mine.read_bytes() == data


def test_bad_flags_are_one_line(capsys, tmp_path):
    for argv, flag in ((["--url", "http://127.0.0.1:9/x", "--dest", tmp_path, "--timeout", "nan"], "--timeout"),
                       (["--url", "http://127.0.0.1:9/x", "--dest", tmp_path, "--retries", "-1"], "--retries"),
                       (["--url", "http://127.0.0.1:9/x", "--dest", tmp_path, "--revision", "v1"], "--revision"),
                       (["--hf", "org/x", "--dest", tmp_path, "--md5", "0" * 32], "--md5"),
                       (["--hf", "../../x", "--dest", tmp_path], "--hf")):
        try:
            rc = main(["download", *map(str, argv)])
        except SystemExit as e:
            rc = e.code
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and flag in err[0] and "Traceback" not in err[0], (argv, err)
    assert os.listdir(tmp_path) == []


# ---- the Hub ----------------------------------------------------------------------------------

class FakeHub:
    """The routes of the Hub's file API that huggingface_hub's snapshot_download calls (read from
    huggingface_hub's hf_api.py and file_download.py): model info with siblings, the recursive
    tree, and HEAD/GET resolve/{revision}/{file} with ETag, X-Repo-Commit and Range."""

    def __init__(self):
        self.repos, self.log, self.drops = {}, [], {}
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def send(self, code, body=b"", headers=()):
                self.send_response(code)
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def route(self):
                path = self.path.partition("?")[0]
                hub.log.append((self.command, path, self.headers.get("Range"), self.headers.get("Authorization")))
                api = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/(revision|tree)/([^/]+))?", path)
                resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
                repo = hub.repos.get((api or resolve).group(1)) if (api or resolve) else None
                if repo is None:
                    return self.send(404, b'{"error": "Repository not found"}', [("X-Error-Code", "RepoNotFound")])
                if repo.get("token") and self.headers.get("Authorization") != f"Bearer {repo['token']}":
                    code = 403 if self.headers.get("Authorization") else 401
                    return self.send(code, b'{"error": "gated"}', [("X-Error-Code", "GatedRepo")])
                if api:
                    if (api.group(3) or "main") not in ("main", repo["sha"]):
                        return self.send(404, b"{}", [("X-Error-Code", "RevisionNotFound")])
                    files = repo["files"]
                    if api.group(2) == "tree":
                        body = [{"type": "file", "path": n, "size": len(d), "oid": hashlib.sha1(d).hexdigest()}
                                for n, d in files.items()]
                    else:
                        body = {"id": api.group(1), "sha": repo["sha"], "siblings": [{"rfilename": n} for n in files]}
                    return self.send(200, json.dumps(body).encode(), [("Content-Type", "application/json")])
                name = resolve.group(3)
                if name not in repo["files"]:
                    return self.send(404, b"{}", [("X-Error-Code", "EntryNotFound"), ("X-Repo-Commit", repo["sha"])])
                data = repo["files"][name]
                m = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
                start = int(m.group(1)) if m else 0
                headers = [("ETag", f'"{hashlib.sha1(data).hexdigest()}"'), ("X-Repo-Commit", repo["sha"])]
                if start:
                    headers.append(("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}"))
                if self.command == "GET" and name in hub.drops:  # states the whole length, sends a part
                    cut = hub.drops.pop(name)
                    self.send_response(200)
                    for k, v in headers:
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data[:cut])
                    self.close_connection = True
                    return None
                return self.send(206 if start else 200, data[start:], headers)

            do_GET = do_HEAD = route

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads, self.httpd.block_on_close = True, False
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def fetched(self):
        return sorted(p.split("/resolve/", 1)[1].split("/", 1)[1] for c, p, _, _ in self.log
                      if c == "GET" and "/resolve/" in p)


@pytest.fixture
def hub(monkeypatch, tmp_path):
    import huggingface_hub.constants
    import huggingface_hub.utils._detect_agent

    h = FakeHub()
    monkeypatch.setenv("HF_ENDPOINT", h.url)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    # huggingface_hub reads HF_HOME at import; the paths under it go to the test's own dir, and its
    # user-agent registry (fetched from huggingface.co in the background) is taken as empty
    monkeypatch.setattr(huggingface_hub.utils._detect_agent, "_registry", {"standardEnvVars": [], "harnesses": {}})
    monkeypatch.setattr(huggingface_hub.constants, "HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "hf_home" / "token"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "hf_home" / "tokens"))
    yield h
    h.httpd.shutdown()
    h.httpd.server_close()


SHA = "0123456789abcdef0123456789abcdef01234567"


def tiny_repo(**extra):
    files = {"config.json": b'{"model_type": "llama"}', "model.safetensors": payload(20_000),
             "original/params.json": b"{}", "README.md": b"# tiny"}
    return {"sha": SHA, "files": {**files, **extra}}


def test_hub_snapshot_include_revision_and_rerun(hub, box, capsys):
    dest, snapshot = box
    hub.repos["org/tiny"] = tiny_repo()
    before = snapshot()
    assert run(capsys, "--hf", "org/tiny", "--dest", dest, "--include", "*.json", "*.safetensors")[0] == 0
    assert finals(dest) == ["config.json", "model.safetensors", "original/params.json"]
    assert all((dest / n).read_bytes() == hub.repos["org/tiny"]["files"][n] for n in finals(dest))
    assert hub.fetched() == ["config.json", "model.safetensors", "original/params.json"]
    assert snapshot() == before  # huggingface_hub's records stay under dest/.cache
    hub.log.clear()  # a second run fetches nothing: every file is recorded at this commit
    assert run(capsys, "--hf", "org/tiny", "--dest", dest, "--revision", SHA)[0] == 0
    assert hub.fetched() == ["README.md"] and len(finals(dest)) == 4
    rc, err = run(capsys, "--hf", "org/tiny", "--dest", dest, "--revision", "v9")
    assert rc == 2 and len(err) == 1 and "--revision v9" in err[0]
    rc, err = run(capsys, "--hf", "org/nope", "--dest", dest)
    assert rc == 2 and len(err) == 1 and "org/nope" in err[0]
    rc, err = run(capsys, "--hf", "org/tiny", "--dest", dest, "--include", "*.gguf")
    assert rc == 2 and len(err) == 1 and "--include" in err[0] and "config.json" in err[0]


def test_hub_resumes_a_dropped_connection(hub, box, capsys):
    # huggingface_hub >= 2 resumes within a run (Range from the bytes it has); a killed process
    # starts that file again (its temporary file is unique per process, huggingface_hub #4228)
    import random

    from huggingface_hub import constants

    dest, _ = box
    chunk = constants.DOWNLOAD_CHUNK_SIZE  # it writes whole chunks (10 MiB): resumes from the last one
    data = random.Random(0).randbytes(chunk + 1_000_000)
    hub.repos["org/tiny"] = tiny_repo(**{"model.safetensors": data})
    hub.drops["model.safetensors"] = chunk + 500_000  # the first GET hangs up past the first chunk
    assert run(capsys, "--hf", "org/tiny", "--dest", dest, "--include", "model.safetensors")[0] == 0
    gets = [rng for c, p, rng, _ in hub.log if c == "GET" and p.endswith("model.safetensors")]
    assert gets == [None, f"bytes={chunk}-"] and (dest / "model.safetensors").read_bytes() == data


def test_hub_gated_repo_needs_a_token(hub, box, capsys, monkeypatch):
    dest, snapshot = box
    hub.repos["meta/gated"] = {**tiny_repo(), "token": "hf_right"}
    before = snapshot()
    for extra in ([], ["--token", "hf_wrong"]):  # 401 without a token, 403 with a wrong one
        rc, err = run(capsys, "--hf", "meta/gated", "--dest", dest, *extra)
        assert rc == 2 and len(err) == 1 and "meta/gated" in err[0] and "--token" in err[0], err
        assert "hf_wrong" not in err[0]
    assert snapshot() == before and not dest.exists()
    assert run(capsys, "--hf", "meta/gated", "--dest", dest, "--token", "hf_right", "--include", "*.json")[0] == 0
    assert all(auth == "Bearer hf_right" for _, _, _, auth in hub.log[-4:])
    monkeypatch.setenv("HF_TOKEN", "hf_right")  # the token from the environment
    assert run(capsys, "--hf", "meta/gated", "--dest", dest, "--include", "README.md")[0] == 0
    assert (dest / "README.md").read_bytes() == b"# tiny"


def test_hub_names_that_leave_dest_are_refused(hub, box, capsys):
    dest, snapshot = box
    before = snapshot()
    for i, name in enumerate(TRAVERSALS):
        hub.repos[f"org/evil{i}"] = tiny_repo(**{name: b"evil"})
        hub.log.clear()
        rc, err = run(capsys, "--hf", f"org/evil{i}", "--dest", dest)
        assert rc == 2 and len(err) == 1 and "refused" in err[0] and f"org/evil{i} file" in err[0], (name, err)
        assert hub.fetched() == [] and snapshot() == before, name  # nothing fetched, nothing outside written
    # excluded by --include, the bad name is never fetched and never matters
    assert run(capsys, "--hf", "org/evil0", "--dest", dest, "--include", "*.json")[0] == 0


def test_hub_never_replaces_a_file_it_did_not_write(hub, box, capsys):
    dest, _ = box
    hub.repos["org/tiny"] = tiny_repo()
    dest.mkdir()
    (dest / "config.json").write_text("my own config")
    rc, err = run(capsys, "--hf", "org/tiny", "--dest", dest)
    assert rc == 2 and len(err) == 1 and "config.json: already exists" in err[0] and "--force" in err[0]
    assert (dest / "config.json").read_text() == "my own config" and hub.fetched() == []
    assert run(capsys, "--hf", "org/tiny", "--dest", dest, "--force")[0] == 0
    assert (dest / "config.json").read_bytes() == b'{"model_type": "llama"}'
