"""The two HTTP servers the serving benchmarks drive, as subprocesses: ours and llama.cpp's.

Ours is started the way users start it (`annotated-llama serve --model DIR ...`); llama.cpp's
`llama-server` is the binary built by bench/build_llama_server.sh from the source vendored in the
llama-cpp-python sdist (found through --llama-server PATH or the LLAMA_SERVER environment
variable). Each server's output goes to a log file; its /health is polled until it answers 200.
Shared by bench_serving.py and bench_memory.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ours_command(model: Path, port: int, *extra: str) -> list[str]:
    """`annotated-llama serve` (the console script beside this Python, else `python -m annotated_llama`)."""
    script = Path(sys.executable).parent / "annotated-llama"
    head = [str(script)] if script.is_file() else [sys.executable, "-m", "annotated_llama"]
    return head + ["serve", "--model", str(model), "--port", str(port), *extra]


def llama_server_path(given: str | None) -> Path:
    """The llama-server binary from --llama-server or $LLAMA_SERVER; a ValueError names what is missing."""
    path = given or os.environ.get("LLAMA_SERVER") or shutil.which("llama-server")
    if not path:
        raise ValueError("--llama-server: not given and LLAMA_SERVER is not set; build it with "
                         "`bash bench/build_llama_server.sh DEST` and pass DEST/bin/llama-server")
    p = Path(path)
    if not p.is_file() or not os.access(p, os.X_OK):
        raise ValueError(f"--llama-server {p}: not an executable file")
    return p


def status_mib(pid: int, field: str) -> float:
    """VmRSS (resident now) or VmHWM (peak resident) of a process, in MiB; NaN once it has exited."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except FileNotFoundError:
        return float("nan")
    for line in lines:
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    return float("nan")  # a zombie has no memory lines


class Server:
    """One server subprocess: `with Server(name, cmd, port, log) as s:` starts it and waits for /health."""

    def __init__(self, name: str, cmd: list[str], port: int, log: Path, env: dict | None = None,
                 start_timeout: float = 300):
        self.name, self.cmd, self.port, self.log = name, cmd, port, Path(log)
        self.env = {**os.environ, **(env or {})}
        self.url = f"http://127.0.0.1:{port}"
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "Server":
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "w") as f:
            f.write(" ".join(self.cmd) + "\n")
        out = open(self.log, "a")
        self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                     cwd=ROOT, start_new_session=True)  # Ctrl-C here does not reach it first
        out.close()
        t0 = time.monotonic()
        try:
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise
        self.start_s = time.monotonic() - t0
        return self

    def __exit__(self, *exc):
        self.stop()

    def last_log_line(self) -> str:
        lines = [x for x in self.log.read_text(errors="replace").splitlines() if x.strip()]
        return lines[-1][:300] if lines else "(no output)"

    def health(self) -> dict:
        import httpx
        r = httpx.get(self.url + "/health", timeout=10)
        try:
            body = r.json()
        except json.JSONDecodeError:
            body = {"text": r.text[:200]}
        return {"http_status": r.status_code, **(body if isinstance(body, dict) else {"body": body})}

    def wait_healthy(self):
        import httpx
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with status {self.proc.returncode} before answering "
                                   f"/health: {self.last_log_line()} (log: {self.log})")
            try:
                h = self.health()
                if h["http_status"] == 200 and h.get("status", "ok") == "ok":
                    return
            except httpx.HTTPError:
                pass  # not listening yet
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: /health not ok after {self.start_timeout:.0f} s (log: {self.log})")
            time.sleep(0.2)

    def wait_decode_ready(self, timeout: float = 900.0) -> tuple[str, float]:
        """For our server: wait while /health says "decode": "compiling" (its background compile);
        returns (the decode state then, seconds waited). Other servers return at once."""
        start = time.monotonic()
        while True:
            state = self.health().get("decode", "n/a")
            if state != "compiling" or time.monotonic() - start > timeout:
                return state, time.monotonic() - start
            time.sleep(1.0)

    def rss_mib(self) -> float:
        return status_mib(self.proc.pid, "VmRSS")

    def peak_rss_mib(self) -> float:
        return status_mib(self.proc.pid, "VmHWM")

    def stop(self):
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)  # our process only, by its pid
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def commit_and_time() -> tuple[str, str]:
    """(short commit hash, with '+dirty' for uncommitted changes; UTC time) for result headers."""
    git = ["git", "-C", str(ROOT)]
    commit = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(git + ["status", "--porcelain", "--untracked-files=no"], capture_output=True,
                           text=True).stdout.strip()
    return (commit or "unknown") + ("+dirty" if dirty else ""), time.strftime("%Y-%m-%d %H:%M", time.gmtime())


def write_new(path: Path, text: str, force: bool) -> None:
    """Write `text` to `path` through a temporary name; an existing file needs force."""
    path = Path(path)
    if path.exists() and not force:
        raise FileExistsError(f"{path}: already exists (pass --force to replace it)")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
