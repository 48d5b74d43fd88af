"""`upcycling`: the pipeline's stages as commands. The Snakefile's rules call these.

    upcycling check-config   validate a sweep config (schema + semantic checks)
    upcycling tokenize       corpus -> tokenizer.json, token shards (train/val memmaps), meta.json
    upcycling train-tokenizer / tokenize-shard / tokenize-gather   the same, step by step (Snakemake)
    upcycling train          one training job (dense, upcycled or scratch MoE; WSD stable or final)
    upcycling transform      dense export -> a second-stage method's initial export (MoE upcycling, growth, ...)
    upcycling aggregate      every metrics JSON -> results/losses.zarr
    upcycling fit            losses.zarr -> results/fits/*.json
    upcycling report         fits + store -> results/report/ (summary.md + figures)
    upcycling predict        planning: predicted loss and upcycle-or-scratch advice
    upcycling plan           the admin's view: jobs per rule, resources, GPU-hours, disk
    upcycling calibrate      measure training throughput on this node; write it into the config
    upcycling clean          delete checkpoints that no job of the sweep will read
    upcycling unlock         remove a results directory's lock whose process is gone
    upcycling submit         one training job to Slurm through submitit (requeued on preemption)

A job runs from its spec: the rules pass ``--spec`` (the job's Snakemake params, see
upcycling.pipeline.jobs); by hand, ``--config`` plus the job's identity builds the same spec from the same
inventory. Bad input (config, corpus, tokens, checkpoints, fits, arguments) and a disk that
refuses a write (full, over quota, read-only) print one ``error: ...`` line and exit 2; Ctrl-C
that reaches the top prints one line and exits 130.
"""

from __future__ import annotations

import argparse
import sys

from upcycling.cli import analysis, locking, tokens, training
from upcycling.cli.common import add_source, inventory_of, positive, setup_logging
from upcycling.core.errors import InputError, storage_error


def cmd_check_config(args) -> int:
    inventory = inventory_of(args)
    runs = sum(1 for job in inventory.jobs if job.rule.endswith("_final"))
    print(f"{args.config}: valid; {runs} runs, {len(inventory.jobs)} jobs")
    return 0


def cmd_clean(args) -> int:
    from upcycling.pipeline.clean import clean

    freed = clean(inventory_of(args), dry_run=args.dry_run)
    print(f"{'would free' if args.dry_run else 'freed'} {freed / 1e9:.3g} GB")
    return 0


def _parser() -> argparse.ArgumentParser:
    from upcycling.cluster import launch, plan
    from upcycling.pipeline import jobargs

    parser = argparse.ArgumentParser(
        prog="upcycling", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="STAGE")

    def command(name: str, func, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text)
        sub.set_defaults(func=func)
        return sub

    p = command("check-config", cmd_check_config, "validate a sweep config")
    p.add_argument("--config", default="config/config.yaml", help="sweep config YAML")
    p.add_argument("--workdir", default=".", help="directory that relative paths in the config start from")

    p = command("tokenize", tokens.cmd_tokenize, "the whole tokens stage in one process (every shard)")
    add_source(p, "(unused: the rules run the three steps)")
    p.add_argument("--out", help="output directory (default: <results_dir>/tokens)")

    p = command(
        "train-tokenizer",
        tokens.cmd_train_tokenizer,
        "tokens stage, step 1: tokenizer.json (trained on a sample, or given)",
    )
    add_source(p, "train_tokenizer job's spec")

    p = command("tokenize-shard", tokens.cmd_tokenize_shard, "tokens stage, step 2: one shard's token memmaps")
    add_source(p, "tokenize_shard job's spec")
    p.add_argument("--shard", help="with --config: which shard, e.g. 00002-of-00004")
    p.add_argument("--tokens", default="tokens", help="with --config: tokens, or tokens_stage2 (stage2.corpus)")

    p = command(
        "tokenize-gather", tokens.cmd_tokenize_gather, "tokens stage, step 3: check the shards, write meta.json"
    )
    add_source(p, "tokenize (gather) job's spec")
    p.add_argument("--tokens", default="tokens", help="with --config: tokens, or tokens_stage2 (stage2.corpus)")

    p = command("train", training.cmd_train, "one training job of a dense, upcycled or scratch MoE run")
    add_source(p, "training job's spec")
    jobargs.add_arguments(p, required=False)
    p.add_argument("--log-every-steps", type=positive(int), help="progress line every N steps")
    p.add_argument("--checkpoint-every-tokens", type=positive(int), help="save a checkpoint every N tokens")
    p.add_argument("--keep-checkpoint", action="store_true", help="keep a final job's DeepSpeed checkpoint")
    p.add_argument("--history-log", help="also append the log lines here (every attempt, with a header each)")

    p = command("transform", training.cmd_transform, "dense export -> a second-stage method's initial export")
    add_source(p, "transform job's spec")
    p.add_argument("--size", help="with --config: the dense model label")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--d1", type=int, help="with --config: the dense budget D1")
    p.add_argument("--variant", help="with --config: e<E>_k<k>_g<G> (moe_upcycle), continue, grow_depth, grow_width")

    p = command("aggregate", analysis.cmd_aggregate, "every metrics JSON -> the zarr results store")
    add_source(p, "aggregate job's spec")
    p.add_argument("--out", help="the store to write (default: <results_dir>/losses.zarr)")

    p = command("fit", analysis.cmd_fit, "fit the scaling laws to a results store")
    add_source(p, "fit job's spec")
    p.add_argument("--store", required=True, help="results store (losses.zarr)")
    p.add_argument("--out-dir", required=True, help="where the fits' JSON files go")
    p.add_argument("--workers", type=int, default=1, help="laws fitted side by side, one process each")
    p.add_argument(
        "--parameter-counts",
        choices=["non_embedding", "total"],
        help="N1, N2 and P without or with the embedding parameters (default: config fit.parameter_counts)",
    )
    p.add_argument(
        "--more-data-never-hurts",
        action="store_true",
        help="prior: keep every data exponent's local slope >= 0 (default: config fit.more_data_never_hurts)",
    )

    p = command("report", analysis.cmd_report, "summary.md and figures from a store and its fits")
    p.add_argument("--store", required=True)
    p.add_argument("--fits", required=True, help="directory of the fits' JSON files")
    p.add_argument("--out-dir", required=True)

    p = command("predict", analysis.cmd_predict, "planning: predicted loss, and upcycle or train from scratch")
    p.add_argument("--fits", default="results/fits", help="directory of fitted laws")
    p.add_argument(
        "--n1",
        type=positive(float),
        required=True,
        help="dense model parameters, counted as the fits count them (non-embedding by default)",
    )
    p.add_argument("--d1", type=positive(float), required=True, help="dense pretraining tokens")
    p.add_argument("--d2", type=positive(float), required=True, help="MoE training tokens after upcycling")
    p.add_argument("--experts", type=positive(int), required=True)
    p.add_argument("--top-k", type=positive(int), required=True)
    p.add_argument("--granularity", type=positive(int), default=1)
    p.add_argument(
        "--method",
        default="moe_upcycle",
        choices=["moe_upcycle", "continue", "grow_depth", "grow_width"],
        help="second-stage method",
    )
    p.add_argument(
        "--count-sunk-cost",
        action="store_true",
        help="count the dense model's compute against upcycling (default: it exists anyway)",
    )

    p = command("plan", plan.run, "the admin's view: jobs per rule, resources, GPU-hours, disk")
    plan.add_arguments(p)

    from upcycling.cluster import calibrate

    p = command(
        "calibrate", calibrate.run, "measure this node's training tokens/s per size; write them into the config"
    )
    calibrate.add_arguments(p)

    p = command("clean", cmd_clean, "delete checkpoints that no job of the sweep will read")
    p.add_argument("--config", default="config/config.yaml", help="sweep config YAML")
    p.add_argument("--workdir", default=".", help="directory that relative paths in the config start from")
    p.add_argument("--dry-run", action="store_true", help="list what would be deleted")

    p = command("unlock", locking.cmd_unlock, "remove a results directory's lock whose process is gone")
    p.add_argument("results_dir", help="the results directory (the config's results_dir)")

    p = command("submit", launch.run, "submit one training job to Slurm with submitit")
    launch.add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        setup_logging(getattr(args, "history_log", None))  # inside: a read-only log directory is an error line too
        with locking.results_lock(args):  # one run per results directory (upcycling.core.lock)
            return args.func(args)
    except KeyboardInterrupt:
        # A training job saves its checkpoint on SIGINT itself; whatever still gets here published nothing partial.
        return _fail(args, f"`upcycling {args.command}` interrupted (SIGINT, Ctrl-C): rerun it to finish", 130)
    except InputError as exc:
        return _fail(args, str(exc))
    except OSError as exc:  # a full, read-only or forbidden file system; any other OSError is a bug
        error = storage_error(exc)
        if error is None:
            raise
        return _fail(args, str(error))
    except ModuleNotFoundError as exc:
        extra = EXTRA_OF_MODULE.get((exc.name or "").partition(".")[0])
        if extra is None:
            raise
        return _fail(
            args,
            f"`upcycling {args.command}` needs {exc.name}, which this environment lacks: "
            f"pip install 'upcycling[{extra}]' (or '.[{extra}]' from a checkout)",
        )


def _fail(args, message: str, code: int = 2) -> int:
    """The one ``error:`` line on stderr (and in the history log, where the job keeps one); the exit code."""
    print(f"error: {message}", file=sys.stderr)
    if getattr(args, "history_log", None):
        try:
            with open(args.history_log, "a") as history:
                history.write(f"error: {message}\n")
        except OSError:
            pass  # the log's directory may be the very thing that cannot be written
    return code


# The stage extra (pyproject.toml) that installs each optional library.
EXTRA_OF_MODULE = {
    **dict.fromkeys(("tokenizers", "pyarrow"), "tokens"),
    **dict.fromkeys(("torch", "deepspeed", "safetensors"), "train"),
    **dict.fromkeys(("xarray", "pandas", "zarr", "numcodecs", "lmfit", "scipy", "matplotlib"), "analysis"),
}
