"""Starting and stopping the processes of tensor parallelism (`generate --tp N`, `serve --tp N`).

Outside torchrun, a command relaunches itself under it (`relaunch`), after checking that the
model splits N ways, so a bad `--tp` fails before any process starts. Under torchrun, every
rank joins the process group and loads its slice (`start`); rank 0 then runs the command's
front end while the others follow its forward calls (tensor_parallel.py). An error on any rank
ends every rank, and the user sees rank 0's one line.

Stopping: torchrun runs in a session of its own, as do the ranks it starts, so a Ctrl-C at the
terminal reaches the relaunching process alone. It stops the ranks in order: rank 0 first (a
server finishes its requests and tells the followers to stop; a generation just ends), then
whatever is left, SIGKILL after a grace period or a second Ctrl-C. torchrun, left to itself,
would SIGINT every rank at once and print a traceback of its own.
"""

from __future__ import annotations

import atexit
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ..core.model import Transformer, set_context_length
from ..core.tokenizer import Tokenizer, default_tokenizer_path
from ..default_model import default_model_dir
from ..inference.generation import Llama
from .tensor_parallel import check_divisible, follow, lead, stop_followers
from .tp_checkpoint import build_rank_model, inspect_checkpoint

RANK_LOGS = "ANNOTATED_LLAMA_TP_LOGS"  # set by `relaunch`: the dir where each rank writes its stderr and pid
ERROR_LINE = re.compile(r"^annotated-llama [\w-]+: error: (.*)$")  # how __main__ reports a bad input
GRACE_S = 10.0  # after a stop signal, how long rank 0 may take to finish before everything is killed
# Ctrl-C, kill, and the terminal closing: the signals torchrun would have received in our session
STOP_SIGNALS = [signal.SIGINT, signal.SIGTERM] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])


def agree(error: str | None, group=None) -> None:
    """Collective: raise ValueError on every rank if any rank had an error (none waits forever)."""
    errors = [None] * dist.get_world_size(group)
    dist.all_gather_object(errors, error, group=group)
    first = next((e for e in errors if e), None)
    if first:
        raise ValueError(first)


def _shutdown():
    dist.barrier()  # tearing down right after collectives aborted (gloo) without a barrier first
    dist.destroy_process_group()


def _report_to_relauncher(rank: int) -> None:
    # Under `relaunch`: this rank's pid (to stop rank 0 first) and stderr go to files it reads.
    logs = os.environ.get(RANK_LOGS)
    if not logs:
        return  # started by hand under torchrun: stderr stays torchrun's
    pid_file = Path(logs) / f"rank{rank}.pid"
    pid_file.with_suffix(".tmp").write_text(str(os.getpid()))
    pid_file.with_suffix(".tmp").replace(pid_file)  # never seen half-written
    sys.stderr.flush()
    fd = os.open(Path(logs) / f"rank{rank}.err", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(fd, 2)  # sys.stderr writes to fd 2, so warnings and logging follow
    os.close(fd)


def start(model_path, tp: int, *, device="cpu", dtype=None, max_seq_len=None, timeout=None) -> Transformer:
    """Under torchrun: join the process group and load this rank's slice of `model_path`. An
    error on any rank ends every rank: rank 0 raises ValueError (one line), the others exit quietly.
    `timeout` (a timedelta): how long a follower may wait for rank 0's next call (a server idles)."""
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    _report_to_relauncher(rank)
    if torch.device(device).type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        device = torch.device("cuda", torch.cuda.current_device())
    dist.init_process_group("nccl" if torch.device(device).type == "cuda" else "gloo", timeout=timeout)
    model, error = None, None
    try:
        if world != tp:
            raise ValueError(f"--tp {tp} does not match the {world} processes torchrun started (WORLD_SIZE={world})")
        model = build_rank_model(model_path, world, rank, dtype=dtype, device=device)
        if max_seq_len is not None and max_seq_len < model.params.max_seq_len:
            set_context_length(model, max_seq_len)  # on every rank: the same checks, the same cache
    except Exception as e:  # any failure: every rank must hear of it, or the others would wait
        message = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        error = (f"rank {rank}: " if rank else "") + (message.splitlines()[0] if message else type(e).__name__)
    try:
        agree(error)
    except ValueError:
        _shutdown()
        if rank > 0:
            raise SystemExit(2) from None  # rank 0 reports it
        raise
    return model


def run_tensor_parallel(model_path, tp: int, front_end, *, device="cpu", dtype=None, argv=None, timeout=None) -> int:
    """Run `front_end(model)` on rank 0 of `tp` processes while the others follow its forward calls
    (e.g. `serve --tp N`: the front end creates the app and runs uvicorn). Outside torchrun,
    relaunch this command (`argv`, default sys.argv[1:]) under it first."""
    if "WORLD_SIZE" not in os.environ:
        return relaunch(model_path, tp, sys.argv[1:] if argv is None else argv)
    model = start(model_path, tp, device=device, dtype=dtype, timeout=timeout)
    if dist.get_rank() > 0:
        follow(model)
        _shutdown()
        return 0
    lead(model)
    try:
        with torch.inference_mode():
            return front_end(model) or 0
    finally:
        stop_followers(model)
        _shutdown()


def build_llama(args):
    """`generate`/`chat --tp N`: a `Llama` on rank 0 over its slice of the model. The other ranks
    follow rank 0 and exit when it does; outside torchrun this relaunches the command under it."""
    if args.model is None:
        args.model = str(default_model_dir())
    if getattr(args, "lora", None):
        raise ValueError(f"--lora {args.lora}: not supported with --tp (merge it first: annotated-llama merge-lora)")
    if "WORLD_SIZE" not in os.environ:
        raise SystemExit(relaunch(args.model, args.tp, sys.argv[1:]))
    dtype = getattr(torch, args.dtype) if args.dtype else None
    model = start(args.model, args.tp, device=args.device, dtype=dtype, max_seq_len=args.max_seq_len)
    if dist.get_rank() > 0:
        follow(model)
        _shutdown()
        raise SystemExit(0)
    lead(model)
    atexit.register(lambda: (stop_followers(model), _shutdown()))  # however rank 0's command ends
    tokenizer = rank0_tokenizer(model, args.model, args.tokenizer)
    return Llama(model, tokenizer, seed=1 if args.seed is None else args.seed)


def rank0_tokenizer(model: Transformer, model_path, tokenizer_path=None):
    """The tokenizer rank 0 needs (the followers never tokenize), checked against the model."""

    tokenizer_path = tokenizer_path or default_tokenizer_path(model_path)
    if tokenizer_path is None:
        raise ValueError(f"{model_path}: no tokenizer.model found beside the weights; pass --tokenizer PATH")
    tokenizer = Tokenizer(tokenizer_path)
    tokenizer.check_fits(model.params.vocab_size)
    return tokenizer


# ---- the relaunching process ------------------------------------------------------------------

def relaunch(model_path, tp: int, argv: list[str]) -> int:
    """Run `annotated-llama ARGV` under torchrun with `tp` processes and wait for them.

    Rank 0's stdout (the text) and stderr (warnings, a server's log) stream through, except its
    one-line error, raised here as ValueError. torchrun's own output and the other ranks' are
    shown only when they failed without saying why. Ctrl-C stops every rank, then raises
    KeyboardInterrupt (exit status 130); SIGTERM or SIGHUP too, then returns 0 if the ranks ended
    cleanly (a server does), else 128 + the signal, as a shell reports a process it killed."""
    args, _, _ = inspect_checkpoint(model_path)
    check_divisible(args, tp)  # fail before starting any process
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={tp}",
           "-m", "annotated_llama", *argv]
    env = dict(os.environ)
    # torchrun would set 1 thread per process (and warn); share the cores out instead.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // tp)))
    with tempfile.TemporaryDirectory(prefix="annotated-llama-tp-") as logs:
        env[RANK_LOGS] = logs
        logs = Path(logs)
        rank0_errors = _Tail(logs / "rank0.err")
        with _Stopper(logs) as stopper, open(logs / "torchrun.err", "w+") as torchrun_err:
            stopper.torchrun = subprocess.Popen(cmd, env=env, stderr=torchrun_err, start_new_session=True)
            while stopper.torchrun.poll() is None:
                time.sleep(0.1)
                rank0_errors.pump()
                stopper.step()
            rank0_errors.pump(final=True)
            rc = stopper.torchrun.returncode
            if stopper.signals:
                if signal.SIGINT in stopper.signals:
                    raise KeyboardInterrupt
                return 0 if rc == 0 else 128 + stopper.signals[0]
            if rc and rank0_errors.errors:
                raise ValueError(ERROR_LINE.match(rank0_errors.errors[0]).group(1))
            for line in rank0_errors.errors:  # (from a run that ended well: pass them on)
                sys.stderr.write(line + "\n")
            if rc:  # no line from rank 0: everything the others said
                torchrun_err.seek(0)
                sys.stderr.write(torchrun_err.read())
                for f in sorted(logs.glob("rank*.err")):
                    if f.name != "rank0.err":
                        sys.stderr.write(f.read_text(errors="replace"))
                raise OSError(f"the {tp} tensor-parallel processes failed (torchrun exit status {rc}; output above)")
    return 0


class _Tail:
    """Passes a growing file (rank 0's stderr) through to our stderr, line by line, except the
    `annotated-llama CMD: error:` lines, which it keeps in `errors`."""

    def __init__(self, path: Path):
        self.path, self.offset, self.partial, self.errors = path, 0, b"", []

    def pump(self, final: bool = False) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return  # rank 0 has not started yet
        self.offset += len(data)
        *lines, self.partial = (self.partial + data).split(b"\n")
        if final and self.partial:
            lines, self.partial = lines + [self.partial], b""
        for raw in lines:
            line = raw.decode("utf-8", errors="replace")
            if ERROR_LINE.match(line):
                self.errors.append(line)
            else:
                sys.stderr.write(line + "\n")
        sys.stderr.flush()


class _Stopper:
    """While active, STOP_SIGNALS stop torchrun's ranks instead of this process: rank 0
    first, then the rest once it has exited; SIGKILL for all after GRACE_S or a second signal."""

    def __init__(self, logs: Path):
        self.logs, self.torchrun, self.signals = logs, None, []
        self.since, self.seen, self.termed, self.scanned = None, {}, set(), 0.0

    def __enter__(self):
        self.previous = {}
        if threading.current_thread() is threading.main_thread():  # signal.signal works there only
            for s in STOP_SIGNALS:
                self.previous[s] = signal.signal(s, self._on_signal)
        return self

    def _on_signal(self, signum, frame):
        self.signals.append(signum)
        self.since = self.since or time.monotonic()

    def step(self) -> None:
        if not self.signals and time.monotonic() - self.scanned < 1.0:
            return  # while running, a look at the ranks a second is enough (it reads all of /proc)
        self.scanned = time.monotonic()
        ranks = _children(self.torchrun.pid)
        self.seen.update(ranks)
        if not self.signals:
            return
        if len(self.signals) > 1 or time.monotonic() - self.since > GRACE_S:
            self._kill(ranks)
            return
        rank0 = self._rank0_pid()
        if rank0 in ranks:  # rank 0 first: the others may be inside a collective with it
            targets = [rank0]
        elif Path("/proc").is_dir():
            targets = list(ranks)
        else:  # no /proc to find the ranks in: torchrun passes the signal on
            targets = [self.torchrun.pid]
        for pid in targets:
            if pid not in self.termed:
                self.termed.add(pid)
                _signal(pid, signal.SIGTERM)

    def _rank0_pid(self) -> int | None:
        try:
            return int((self.logs / "rank0.pid").read_text())
        except (OSError, ValueError):
            return None

    def _kill(self, ranks) -> None:
        for pid in [*ranks, self.torchrun.pid]:
            _signal(pid, signal.SIGKILL)

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        if self.torchrun is not None and self.torchrun.poll() is None:  # we are leaving on an error
            self._kill(_children(self.torchrun.pid))
            self.torchrun.wait()
        for pid, started in self.seen.items():  # no rank outlives us (same pid and start time: the same process)
            if _start_time(pid) == started:
                _signal(pid, signal.SIGKILL)


def _signal(pid: int, sig) -> None:
    try:
        os.kill(pid, sig)
    except OSError:
        pass  # gone meanwhile


def _start_time(pid: int) -> int | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] == "Z" else int(fields[19])  # state, ..., starttime (proc(5) field 22)


def _children(pid: int) -> dict[int, int]:
    """{child pid: its start time} of `pid`'s live children, from /proc (Linux; elsewhere {})."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        if int(fields[1]) == pid and fields[0] != "Z":
            found[int(stat.parent.name)] = int(fields[19])
    return found
