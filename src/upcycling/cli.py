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
    upcycling submit         one training job to Slurm through submitit (requeued on preemption)

A job runs from its spec: the rules pass ``--spec`` (the job's Snakemake params, see
upcycling.pipeline.jobs); by hand, ``--config`` plus the job's identity builds the same spec from the same
inventory. Bad input (config, corpus, tokens, checkpoints, fits, arguments) prints one
``error: ...`` line and exits 2.
"""

from __future__ import annotations

import argparse
import importlib
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


def _setup_logging(history: str | None = None) -> None:
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


def _add_source(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--spec", help=f"the {what} as JSON (what the Snakefile's rules pass)")
    parser.add_argument("--config", help="sweep config YAML (instead of --spec)")
    parser.add_argument("--workdir", default=".", help="directory that relative paths in the config start from")


def _inventory(args):
    from upcycling.pipeline.jobs import Inventory
    from upcycling.sweep.load import checked_corpora, load_sweep

    if not args.config:
        raise InputError("give --spec (as the Snakefile's rules do) or --config with a sweep config")
    sweep = load_sweep(args.config, base_dir=args.workdir, check_corpus=False)
    return Inventory(sweep, corpora=checked_corpora(sweep, args.workdir))  # the corpus found once


def _spec(args, rule: str, wildcards: dict | None = None) -> dict:
    """The job's spec: --spec as given, else the inventory's job of that rule and wildcards."""
    if args.spec:
        try:
            return json.loads(args.spec)
        except json.JSONDecodeError as exc:
            raise InputError(
                f"--spec is not JSON ({exc}): pass the job's spec as the rules do, or use --config"
            ) from None
    return _inventory(args).find(rule, wildcards or {}).spec


def cmd_check_config(args) -> int:
    inventory = _inventory(args)
    runs = sum(1 for job in inventory.jobs if job.rule.endswith("_final"))
    print(f"{args.config}: valid; {runs} runs, {len(inventory.jobs)} jobs")
    return 0


def _corpus(args, spec: dict):
    """The corpus files a tokens job reads (labels relative to --workdir) and the corpus options."""
    from upcycling.data.corpus import CorpusOptions, resolve_sources

    return resolve_sources(spec["files"], args.workdir), CorpusOptions.from_config(spec["corpus"])


def cmd_tokenize(args) -> int:
    """The whole tokens stage in one process (by hand; the rules run it as the three steps below)."""
    from upcycling.data.tokenize import tokenize_corpus
    from upcycling.sweep.load import load_sweep

    if not args.config:
        raise InputError(
            "give --config with a sweep config (the rules run train-tokenizer, tokenize-shard and "
            "tokenize-gather with their specs)"
        )
    sweep = load_sweep(args.config, base_dir=args.workdir)
    out = Path(args.out) if args.out else sweep.tokens_dir
    meta = tokenize_corpus(sweep.mapping["corpus"], sweep.mapping["tokenizer"], out, base_dir=args.workdir)
    log.info(
        "tokens in %s: %d train, %d val (vocab %d) in %d shards",
        out,
        meta["train_tokens"],
        meta["val_tokens"],
        meta["vocab_size"],
        len(meta["shards"]),
    )
    return 0


def cmd_train_tokenizer(args) -> int:
    from upcycling.data.tokenizer import make_tokenizer

    spec = _spec(args, "train_tokenizer")
    sources, options = _corpus(args, spec)
    make_tokenizer(sources, options, spec["tokenizer"], Path(spec["out"]), base_dir=args.workdir)
    return 0


def cmd_tokenize_shard(args) -> int:
    from upcycling.data.tokenize import tokenize_shard

    spec = _spec(args, "tokenize_shard", {"tokens": args.tokens, "shard": args.shard})
    sources, options = _corpus(args, spec)
    tokenize_shard(
        sources, options, spec["tokenizer_file"], spec["out"], spec["index"], spec["count"], spec["eot_token"]
    )
    return 0


def cmd_tokenize_gather(args) -> int:
    from upcycling.data.corpus import CorpusOptions
    from upcycling.data.tokenize import gather_shards

    spec = _spec(args, "tokenize", {"tokens": args.tokens})
    gather_shards(spec["tokens_dir"], spec["plan"], CorpusOptions.from_config(spec["corpus"]), spec["tokenizer_file"])
    return 0


def _hooks() -> tuple:
    """Hooks named in UPCYCLING_HOOKS ('module:factory,...'; the tests' fault injection)."""
    hooks = []
    for entry in filter(None, os.environ.get("UPCYCLING_HOOKS", "").split(",")):
        module, _, factory = entry.partition(":")
        hooks.append(getattr(importlib.import_module(module), factory)())
    return tuple(hooks)


def cmd_train(args) -> int:
    from upcycling.cluster.launch import apply_slurm_env
    from upcycling.pipeline import jobargs
    from upcycling.train.loop import RunOptions, main_guarded

    apply_slurm_env()  # under srun: RANK/WORLD_SIZE/... from the Slurm environment
    if args.spec:
        spec, options = _spec(args, ""), RunOptions()
    else:
        try:
            rule, wildcards = jobargs.job_key(args)
        except ValueError as exc:
            raise InputError(str(exc)) from None
        inventory = _inventory(args)
        spec, training = inventory.find(rule, wildcards).spec, inventory.sweep.training
        options = RunOptions(
            training.log_every_steps, training.checkpoint_every_tokens, training.keep_final_checkpoints
        )
    overrides = {
        key: value
        for key, value in (
            ("log_every_steps", args.log_every_steps),
            ("checkpoint_every_tokens", args.checkpoint_every_tokens),
            ("keep_checkpoint", args.keep_checkpoint or None),
        )
        if value is not None
    }
    options = RunOptions(**{**options.__dict__, **overrides})
    _log_attempt(spec["run_id"])
    os.chdir(args.workdir)
    return main_guarded(spec, options, _hooks())


def _log_attempt(run_id: str) -> None:
    """A header per attempt: the log is appended to, so every attempt's story stays in it."""
    import socket
    import time

    slurm = os.environ.get("SLURM_JOB_ID")
    where = f"Slurm job {slurm} (restart {os.environ.get('SLURM_RESTART_COUNT', 0)})" if slurm else "no Slurm job"
    log.info(
        "==== %s: attempt on %s, %s, pid %d, started %s ====",
        run_id,
        socket.gethostname(),
        where,
        os.getpid(),
        time.strftime("%Y-%m-%d %H:%M:%S"),
    )


def cmd_transform(args) -> int:
    """A second-stage method's initial export from the dense export at D1 (upcycling.transform.methods)."""
    from upcycling.model.export import load_adam_moments, load_hf, save_hf
    from upcycling.transform.grow import transform
    from upcycling.transform.methods import Stage2Options, describe
    from upcycling.transform.upcycle import upcycle_adam_moments

    spec = _spec(
        args, "transform", {"size": args.size, "seed": str(args.seed), "d1": str(args.d1), "variant": args.variant}
    )
    method, options, dense_dir = spec["method"], Stage2Options(**spec["options"]), Path(spec["dense"])
    dense_state, dense_cfg, _ = load_hf(dense_dir)
    try:
        state, stage2_cfg = transform(dense_state, dense_cfg, method, options, seed=spec["seed"])
    except ValueError as exc:  # a method or options that cannot make this model
        raise InputError(f"{method} from {dense_dir}: {exc}") from None
    moments = None
    if spec["copy_optimizer_state"]:
        dense_moments = load_adam_moments(dense_dir)
        if dense_moments is None:
            raise InputError(
                f"config key 'moe.copy_optimizer_state': {dense_dir} holds no Adam moments "
                "(optimizer.safetensors): rerun the dense stage with this config, or set it to false"
            )
        moments = (*upcycle_adam_moments(dense_moments[0], dense_moments[1], stage2_cfg), dense_moments[2])
    out = Path(spec["out"])
    save_hf(
        state,
        stage2_cfg,
        out,
        adam_moments=moments,
        extra={**describe(method, options), "transformed_from": str(dense_dir), "seed": spec["seed"]},
    )
    log.info(
        "%s: %s -> %s (%d layers, %d heads x %d, FFN %d, %d experts top-%d)",
        method,
        dense_dir,
        out,
        stage2_cfg.n_layers,
        stage2_cfg.n_heads,
        stage2_cfg.head_dim,
        stage2_cfg.ffn_hidden,
        stage2_cfg.experts,
        stage2_cfg.top_k,
    )
    return 0


def cmd_aggregate(args) -> int:
    import yaml

    from upcycling.analysis.store import aggregate
    from upcycling.core.metrics import code_version

    spec = _spec(args, "aggregate")
    out = args.out or spec["out"]
    ds = aggregate(
        spec["runs"], out, config_text=yaml.safe_dump(spec["config"], sort_keys=False), code_version=code_version()
    )
    log.info("aggregated %d runs into %s (dims %s)", len(spec["runs"]), out, dict(ds.sizes))
    return 0


def cmd_fit(args) -> int:
    from upcycling.analysis.fitstage import fit_all
    from upcycling.analysis.store import load_losses
    from upcycling.core.publish import staging_dir

    settings = dict(_spec(args, "fit")["fit"])
    if args.parameter_counts:
        settings["parameter_counts"] = args.parameter_counts
    if args.more_data_never_hurts:
        settings["more_data_never_hurts"] = True
    try:
        fits = fit_all(
            load_losses(args.store),
            settings,
            out_dir=None,
            workers=args.workers,
            counts=settings["parameter_counts"],
            monotone=settings["more_data_never_hurts"],
        )
    except ValueError as error:  # a store without the chosen parameter counts
        raise InputError(str(error)) from None
    with staging_dir(args.out_dir) as staged:  # all fits appear together, or none
        for key, fit in fits.items():
            fit.save(staged / f"{key}.json")
    statuses = [fit.status for fit in fits.values()]
    log.info(
        "fit: %d laws fitted (%d converged, %d at a bound, %d singular, %d not converged), %d skipped -> %s",
        sum(s != "skipped" for s in statuses),
        statuses.count("converged"),
        statuses.count("at_bound"),
        statuses.count("singular"),
        statuses.count("not_converged"),
        statuses.count("skipped"),
        args.out_dir,
    )
    return 0


def cmd_report(args) -> int:
    from upcycling.analysis.fitstage import load_fits
    from upcycling.analysis.report import write_report
    from upcycling.analysis.store import load_losses

    fits = load_fits(args.fits)
    if not fits:
        raise InputError(f"no fits in {args.fits}: run `upcycling fit` first")
    written = write_report(load_losses(args.store), fits, None, args.out_dir)
    log.info("report: %s", ", ".join(str(path) for path in written.values()))
    return 0


def cmd_predict(args) -> int:
    from upcycling.analysis.advice import predict
    from upcycling.analysis.fitresult import to_jsonable
    from upcycling.analysis.fitstage import load_fits

    if args.top_k > args.experts:
        raise InputError(f"--top-k {args.top_k} is more than --experts {args.experts}: routing picks k of E experts")
    fits = load_fits(args.fits)
    if not fits:
        raise InputError(f"no fits in {args.fits}: run the pipeline (or `upcycling fit`) first")
    try:
        result = predict(
            fits,
            args.n1,
            args.d1,
            args.d2,
            args.experts,
            args.top_k,
            args.granularity,
            method=args.method,
            count_sunk_cost=args.count_sunk_cost,
        )
    except ValueError as error:
        raise InputError(str(error)) from None
    print(json.dumps(to_jsonable(result), indent=1))
    return 0


def cmd_clean(args) -> int:
    from upcycling.pipeline.clean import clean

    freed = clean(_inventory(args), dry_run=args.dry_run)
    print(f"{'would free' if args.dry_run else 'freed'} {freed / 1e9:.3g} GB")
    return 0


def _positive(kind):
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

    p = command("tokenize", cmd_tokenize, "the whole tokens stage in one process (every shard)")
    _add_source(p, "(unused: the rules run the three steps)")
    p.add_argument("--out", help="output directory (default: <results_dir>/tokens)")

    p = command(
        "train-tokenizer", cmd_train_tokenizer, "tokens stage, step 1: tokenizer.json (trained on a sample, or given)"
    )
    _add_source(p, "train_tokenizer job's spec")

    p = command("tokenize-shard", cmd_tokenize_shard, "tokens stage, step 2: one shard's token memmaps")
    _add_source(p, "tokenize_shard job's spec")
    p.add_argument("--shard", help="with --config: which shard, e.g. 00002-of-00004")
    p.add_argument("--tokens", default="tokens", help="with --config: tokens, or tokens_stage2 (stage2.corpus)")

    p = command("tokenize-gather", cmd_tokenize_gather, "tokens stage, step 3: check the shards, write meta.json")
    _add_source(p, "tokenize (gather) job's spec")
    p.add_argument("--tokens", default="tokens", help="with --config: tokens, or tokens_stage2 (stage2.corpus)")

    p = command("train", cmd_train, "one training job of a dense, upcycled or scratch MoE run")
    _add_source(p, "training job's spec")
    jobargs.add_arguments(p, required=False)
    p.add_argument("--log-every-steps", type=_positive(int), help="progress line every N steps")
    p.add_argument("--checkpoint-every-tokens", type=_positive(int), help="save a checkpoint every N tokens")
    p.add_argument("--keep-checkpoint", action="store_true", help="keep a final job's DeepSpeed checkpoint")
    p.add_argument("--history-log", help="also append the log lines here (every attempt, with a header each)")

    p = command("transform", cmd_transform, "dense export -> a second-stage method's initial export")
    _add_source(p, "transform job's spec")
    p.add_argument("--size", help="with --config: the dense model label")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--d1", type=int, help="with --config: the dense budget D1")
    p.add_argument("--variant", help="with --config: e<E>_k<k>_g<G> (moe_upcycle), continue, grow_depth, grow_width")

    p = command("aggregate", cmd_aggregate, "every metrics JSON -> the zarr results store")
    _add_source(p, "aggregate job's spec")
    p.add_argument("--out", help="the store to write (default: <results_dir>/losses.zarr)")

    p = command("fit", cmd_fit, "fit the scaling laws to a results store")
    _add_source(p, "fit job's spec")
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

    p = command("report", cmd_report, "summary.md and figures from a store and its fits")
    p.add_argument("--store", required=True)
    p.add_argument("--fits", required=True, help="directory of the fits' JSON files")
    p.add_argument("--out-dir", required=True)

    p = command("predict", cmd_predict, "planning: predicted loss, and upcycle or train from scratch")
    p.add_argument("--fits", default="results/fits", help="directory of fitted laws")
    p.add_argument(
        "--n1",
        type=_positive(float),
        required=True,
        help="dense model parameters, counted as the fits count them (non-embedding by default)",
    )
    p.add_argument("--d1", type=_positive(float), required=True, help="dense pretraining tokens")
    p.add_argument("--d2", type=_positive(float), required=True, help="MoE training tokens after upcycling")
    p.add_argument("--experts", type=_positive(int), required=True)
    p.add_argument("--top-k", type=_positive(int), required=True)
    p.add_argument("--granularity", type=_positive(int), default=1)
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

    p = command("submit", launch.run, "submit one training job to Slurm with submitit")
    launch.add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _setup_logging(getattr(args, "history_log", None))
    try:
        return args.func(args)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        if getattr(args, "history_log", None):
            with open(args.history_log, "a") as history:
                history.write(f"error: {exc}\n")
        return 2
    except ModuleNotFoundError as exc:
        extra = EXTRA_OF_MODULE.get((exc.name or "").partition(".")[0])
        if extra is None:
            raise
        print(
            f"error: `upcycling {args.command}` needs {exc.name}, which this environment lacks: "
            f"pip install 'upcycling[{extra}]' (or '.[{extra}]' from a checkout)",
            file=sys.stderr,
        )
        return 2


# The stage extra (pyproject.toml) that installs each optional library.
EXTRA_OF_MODULE = {
    **dict.fromkeys(("tokenizers", "pyarrow"), "tokens"),
    **dict.fromkeys(("torch", "deepspeed", "safetensors"), "train"),
    **dict.fromkeys(("xarray", "pandas", "zarr", "numcodecs", "lmfit", "scipy", "matplotlib"), "analysis"),
}


if __name__ == "__main__":
    sys.exit(main())
