"""What every command shares: logging, where a job's spec comes from, argument types."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from upcycling.core.errors import InputError

log = logging.getLogger("upcycling")


def _add_rank(record: logging.LogRecord) -> bool:
    # Read at every record: `upcycling train` sets RANK from the Slurm environment after startup.
    record.rank = os.environ.get("RANK", "0")
    return True


def setup_logging(history: str | None = None) -> None:
    """Log lines to stdout (Snakemake's per-attempt log) and, when given, appended to ``history``:
    Snakemake deletes a job's log before every attempt, the history keeps them all."""
    logging.basicConfig(
        level=logging.INFO, stream=sys.stdout, format="%(asctime)s [rank %(rank)s] %(levelname)s %(name)s: %(message)s"
    )
    root = logging.getLogger()
    if history:
        Path(history).parent.mkdir(parents=True, exist_ok=True)
        appended = logging.FileHandler(history, mode="a")
        appended.setFormatter(root.handlers[0].formatter)
        root.addHandler(appended)
    for handler in root.handlers:
        handler.addFilter(_add_rank)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


def add_source(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--spec", help=f"the {what} as JSON (what the Snakefile's rules pass)")
    parser.add_argument("--config", help="sweep config YAML (instead of --spec)")
    parser.add_argument("--workdir", default=".", help="directory that relative paths in the config start from")
    parser.add_argument(
        "--results",
        help="the results directory the spec's paths start from (the rules pass the sweep's results_dir; "
        "default: the config's results_dir with --config, else the working directory)",
    )


def results_root(args) -> Path:
    """Where a job spec's paths start (they are relative to the results directory, so that a spec
    is the same wherever the results live): --results, else the config's results_dir, else '.'."""
    if getattr(args, "results", None):
        return Path(args.results)
    if getattr(args, "config", None):
        from upcycling.sweep.load import load_sweep

        return load_sweep(args.config, base_dir=args.workdir, check_corpus=False).results_dir
    return Path(".")


def inventory_of(args):
    from upcycling.pipeline.jobs import Inventory
    from upcycling.sweep.load import checked_corpora, load_sweep

    if not args.config:
        raise InputError("give --spec (as the Snakefile's rules do) or --config with a sweep config")
    sweep = load_sweep(args.config, base_dir=args.workdir, check_corpus=False)
    return Inventory(sweep, corpora=checked_corpora(sweep, args.workdir))  # the corpus found once


def job_spec(args, rule: str, wildcards: dict | None = None) -> dict:
    """The job's spec: --spec as given, else the inventory's job of that rule and wildcards."""
    if args.spec:
        try:
            spec = json.loads(args.spec)
        except json.JSONDecodeError as exc:
            raise InputError(
                f"--spec is not JSON ({exc}): pass the job's spec as the rules do, or use --config"
            ) from None
        if not isinstance(spec, dict):
            raise InputError(f"--spec is a JSON {type(spec).__name__}, not an object: {_REBUILD}")
        return JobSpec(spec)
    return JobSpec(inventory_of(args).find(rule, wildcards or {}).spec)


_REBUILD = "pass the job's spec as the rules do (its Snakemake params), or use --config with the job's flags"


class JobSpec(dict):
    """A job's spec whose missing key is an InputError naming it (a hand-written or stale --spec),
    not a KeyError traceback."""

    def __missing__(self, key):
        raise InputError(f"--spec lacks the key {key!r} (it has {', '.join(map(repr, self)) or 'none'}): {_REBUILD}")


def positive(kind):
    """argparse type: a number of ``kind`` above zero (named in the error)."""

    def parse(text: str):
        try:
            value = kind(float(text)) if kind is int and "e" in text.lower() else kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{text} must be above zero")
        return value

    return parse
