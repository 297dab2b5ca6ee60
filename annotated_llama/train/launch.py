"""`annotated-llama pretrain --nproc-per-node N`: torchrun's launcher, run in this process, quietly.

Under plain `torchrun`, a rank that fails prints its one line (annotated_llama/__main__.py makes
every rank but one stay silent) and exits with status 2; torchrun then raises ChildFailedError in
its own process and prints that exception's traceback and a failure table (about 45 lines) after
the line. Nothing a rank does can change that: torch/distributed/launcher/api.py raises for any
non-zero exit status, and torch/distributed/run.py lets the exception escape its `main`. What
makes it quiet is owning the launcher: this calls the same `torch.distributed.run.run(args)`,
catches ChildFailedError, and exits with the rank's status, its one line being all the output.
"""

from __future__ import annotations

import logging
import os
import sys


def launch(nproc: int, argv: list[str]) -> int:
    """Run `annotated-llama ARGV` in `nproc` processes on this machine; the exit status of the
    first rank that failed (its own one-line error is its output), else 0."""
    # here: torchrun's machinery (~1.7 s to import) only when --nproc-per-node asks for processes
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    # torchrun's "Setting OMP_NUM_THREADS" banner and its error log lines: the ranks speak for themselves
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    torchrun_args = get_args_parser().parse_args(
        ["--standalone", f"--nproc-per-node={nproc}", "-m", "annotated_llama", *argv])
    try:
        run(torchrun_args)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        if failure.exitcode == 2:  # a user error: the rank has said it in one line
            return 2
        # killed, or a crash with a traceback already above
        how = f"signal {-failure.exitcode}" if failure.exitcode < 0 else f"exit status {failure.exitcode}"
        print(f"annotated-llama: error: rank {rank} of {nproc} ended with {how} (its output is above)",
              file=sys.stderr)
        return 1
    except SignalException as e:  # Ctrl-C or a kill: torchrun has stopped the ranks
        print(file=sys.stderr)
        return 128 + int(e.sigval)
    return 0
