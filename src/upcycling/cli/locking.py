"""Which commands take the results directory's lock (upcycling.core.lock), and `upcycling unlock`.

A command that writes results (the tokens stage, train, transform, aggregate, clean) holds the lock
of the results directory its spec or config names while it runs, unless the snakemake driver that
runs it as a job holds it already (it says so in the environment). Only the first process of a
multi-process job takes it: the others are its own ranks.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from upcycling.cli.common import results_root

# The commands that write into a results directory (fit and report write where --out-dir says).
WRITERS = (
    "tokenize",
    "train-tokenizer",
    "tokenize-shard",
    "tokenize-gather",
    "train",
    "transform",
    "aggregate",
    "clean",
)


def _first_process() -> bool:
    return all(os.environ.get(name, "0") in ("", "0") for name in ("RANK", "SLURM_PROCID"))


@contextlib.contextmanager
def results_lock(args) -> Iterator[None]:
    """The lock of the results directory ``args`` write to, for the command's run."""
    from upcycling.core.lock import results_locked

    if args.command not in WRITERS or not _first_process():
        yield
        return
    with results_locked(results_root(args), f"upcycling {args.command}"):
        yield


def cmd_unlock(args) -> int:
    from upcycling.core.lock import unlock

    print(unlock(args.results_dir))
    return 0
