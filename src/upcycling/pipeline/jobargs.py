"""The one parser of a training job's identity on the command line (``upcycling train`` and
``upcycling submit`` share it), and its translation to the job inventory's rule and wildcards.

    --family dense --size xs [--seed 0] (--stable POINT | --budget D)
    --family upcycled --size xs --d1 D1 --experts 4 --top-k 2 [--granularity 1] [--reinit-ratio 0.5] (--stable | --budget)
    --family scratch --size xs --experts 4 --top-k 2 (--stable | --budget)
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from upcycling.pipeline.jobs import BUDGET_KEY
from upcycling.pipeline.lineages import Lineage


def add_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--family", choices=sorted(BUDGET_KEY), required=required)
    parser.add_argument("--size", required=required, help="dense model label (config dense_models)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--d1", type=int, help="upcycled: the dense budget D1 it starts from")
    parser.add_argument("--experts", type=int, default=1)
    parser.add_argument("--top-k", type=int, default=1)
    parser.add_argument("--granularity", type=int, default=1)
    parser.add_argument(
        "--reinit-ratio", type=float, default=0.0, help="upcycled moe_upcycle: Drop-Upcycling's r (sweep.reinit_ratio)"
    )
    parser.add_argument(
        "--method",
        default="moe_upcycle",
        help="second-stage method of an upcycled or scratch run: moe_upcycle (with --experts, "
        "--top-k, --granularity), continue, grow_depth, grow_width",
    )
    parser.add_argument("--stable", type=int, help="WSD: the stable job that trains up to this many tokens")
    parser.add_argument("--budget", type=int, help="the job that ends the run of this budget D (metrics JSON)")


def job_key(args: argparse.Namespace) -> tuple[str, dict[str, str]]:
    """(rule, wildcards) of the job the arguments name; ValueError saying what is missing."""
    if (args.stable is None) == (args.budget is None):
        raise ValueError("give exactly one of --stable POINT (a WSD stable job) or --budget D (a run's final job)")
    if args.family == "upcycled" and args.d1 is None:
        raise ValueError("--family upcycled needs --d1 (the dense budget it was upcycled from)")
    # The lineage's wildcards, as the inventory names its jobs (its budgets do not enter them).
    wildcards = Lineage(
        args.family,
        args.size,
        args.seed,
        budgets=(),
        d1=args.d1,
        experts=args.experts,
        top_k=args.top_k,
        granularity=args.granularity,
        method=args.method,
        reinit_ratio=args.reinit_ratio,
    ).wildcards
    if args.stable is not None:
        return f"{args.family}_stable", {**wildcards, "point": str(args.stable)}
    return f"{args.family}_final", {**wildcards, BUDGET_KEY[args.family]: str(args.budget)}


_PARSER = argparse.ArgumentParser(add_help=False)
add_arguments(_PARSER)


def parse(arguments: Sequence[str]) -> argparse.Namespace:
    """The identity flags among ``arguments`` (others are ignored); ValueError when incomplete."""
    try:
        args, _ = _PARSER.parse_known_args(list(arguments))
    except SystemExit:
        raise ValueError(f"not the arguments of a training job: {' '.join(arguments)}") from None
    job_key(args)
    return args
