"""`upcycling`: the pipeline's stages as commands. The Snakefile's rules call these.

    upcycling check-config   validate a sweep config (schema + semantic checks)
    upcycling tokenize       corpus -> tokenizer.json, token shards (train/val memmaps), meta.json
    upcycling train-tokenizer / tokenize-shard / tokenize-gather   the same, step by step (Snakemake)
    upcycling train          one training job (dense, upcycled or scratch MoE; WSD stable or final)
    upcycling upcycle        dense checkpoint -> MoE initial checkpoint (HF Mixtral layout)
    upcycling aggregate      every metrics JSON -> results/losses.zarr
    upcycling fit            losses.zarr -> results/fits/*.json
    upcycling report         fits + store -> results/report/ (summary.md + figures)
    upcycling predict        planning: predicted loss and upcycle-or-scratch advice
    upcycling plan           the admin's view: jobs per rule, resources, GPU-hours
    upcycling submit         one training job to Slurm through submitit (requeued on preemption)
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger("upcycling")


def _add_rank(record: logging.LogRecord) -> bool:
    # Read at every record: `upcycling train` sets RANK from the Slurm environment after startup.
    record.rank = os.environ.get("RANK", "0")
    return True


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format="%(asctime)s [rank %(rank)s] %(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(_add_rank)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


def _load(args) -> dict:
    from .config import load_config

    return load_config(args.config, base_dir=args.workdir)


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="config/config.yaml", help="sweep config YAML")
    parser.add_argument("--workdir", default=".", help="directory that relative paths in the config start from")


def cmd_check_config(args) -> int:
    cfg = _load(args)
    from .sweep import all_metrics

    print(f"{args.config}: valid; {len(all_metrics(cfg))} runs")
    return 0


def _tokens_stage(args):
    """(config, tokens dir, corpus sources, corpus options, the sources of each shard)."""
    cfg = _load(args)
    from .sweep import tokens_dir
    from .tokenize import CorpusOptions, resolve_sources, shard_sources

    sources = resolve_sources(cfg["corpus"]["paths"], args.workdir)
    out = Path(args.out) if getattr(args, "out", None) else tokens_dir(cfg)
    return cfg, out, sources, CorpusOptions.from_config(cfg["corpus"]), shard_sources(sources, cfg["corpus"]["shards"])


def cmd_tokenize(args) -> int:
    cfg = _load(args)
    from .sweep import tokens_dir
    from .tokenize import tokenize_corpus

    out = Path(args.out) if args.out else tokens_dir(cfg)
    meta = tokenize_corpus(cfg["corpus"], cfg["tokenizer"], out, base_dir=args.workdir)
    log.info("tokens in %s: %d train, %d val (vocab %d) in %d shards", out, meta["train_tokens"],
             meta["val_tokens"], meta["vocab_size"], len(meta["shards"]))
    return 0


def cmd_train_tokenizer(args) -> int:
    from .tokens import tokenizer_path
    from .tokenize import make_tokenizer

    cfg, out, sources, options, _ = _tokens_stage(args)
    make_tokenizer(sources, options, cfg["tokenizer"], tokenizer_path(out), base_dir=args.workdir)
    return 0


def cmd_tokenize_shard(args) -> int:
    from .tokens import parse_shard_name, shard_dir, tokenizer_path
    from .tokenize import tokenize_shard

    cfg, out, _, options, groups = _tokens_stage(args)
    try:
        index, count = parse_shard_name(args.shard)
    except ValueError as exc:
        raise SystemExit(f"--shard: {exc}") from None
    if count != len(groups):
        raise SystemExit(f"--shard {args.shard}: the config has corpus.shards={len(groups)}, not {count}")
    tokenize_shard(groups[index], options, tokenizer_path(out), shard_dir(out, index, count), index, count,
                   cfg["tokenizer"]["eot_token"])
    return 0


def cmd_tokenize_gather(args) -> int:
    from .tokenize import gather_shards

    _, out, _, options, groups = _tokens_stage(args)
    gather_shards(out, [[source.label for source in group] for group in groups], options)
    return 0


def _lineage(args):
    from .sweep import Lineage

    if args.family == "dense":
        return Lineage("dense", args.size, args.seed)
    return Lineage(args.family, args.size, args.seed, args.d1 if args.family == "upcycled" else 0,
                   args.experts, args.top_k, args.granularity)


def build_train_job(cfg: dict, args):
    """The TrainJob for one (lineage, stable point | final budget), from the config alone."""
    import json

    from . import sweep
    from .flops import count_params
    from .model import model_config_from, moe_options_from
    from .train import Schedule, TrainJob

    lineage = _lineage(args)
    training = cfg["training"]
    meta = json.loads((sweep.tokens_dir(cfg) / "meta.json").read_text())
    is_moe = lineage.family != "dense"
    model = model_config_from(cfg, lineage.size, meta["vocab_size"], lineage.experts if is_moe else 1,
                              lineage.top_k, lineage.granularity)
    dense_model = model_config_from(cfg, lineage.size, meta["vocab_size"])
    wsd = training["schedule"] == "wsd"

    if args.stable is not None:  # a WSD stable job
        if not wsd:
            raise SystemExit("--stable needs training.schedule: wsd")
        point = args.stable
        if point not in sweep.stable_points(cfg, lineage.family):
            raise SystemExit(f"--stable {point} is not a stable point of {lineage.family}: "
                             f"{sweep.stable_points(cfg, lineage.family)}")
        previous = sweep.previous_stable_point(cfg, lineage.family, point)
        end_tokens, job_name = point, f"stable_{point}"
        schedule_end = None
        state_out, metrics_out = sweep.stable_state_path(cfg, lineage, point), None
    else:
        budget = args.budget
        if budget not in sweep.budgets(cfg, lineage.family):
            raise SystemExit(f"--budget {budget} is not a {lineage.family} budget of the config: "
                             f"{sweep.budgets(cfg, lineage.family)}")
        previous = sweep.decay_start(cfg, budget) if wsd else None
        end_tokens, job_name, schedule_end = budget, sweep.run_dir(cfg, lineage, budget).name, budget
        state_out, metrics_out = None, sweep.metrics_path(cfg, lineage, budget)

    resume_from = sweep.checkpoint_dir(cfg, lineage, f"stable_{previous}") if previous is not None else None
    init_weights = sweep.upcycled_init_dir(cfg, lineage) if lineage.family == "upcycled" and resume_from is None else None
    schedule = Schedule(peak_lr=training["lr"], warmup_tokens=training["warmup_tokens"],
                        min_lr_ratio=training["min_lr_ratio"], kind=training["schedule"],
                        decay_start=sweep.decay_start(cfg, schedule_end) if (wsd and schedule_end) else None,
                        decay_end=schedule_end)
    coords = {"size": lineage.size, "init": lineage.family,
              "method": "dense" if lineage.family == "dense" else "moe_upcycle", "seed": lineage.seed,
              "d1_tokens": end_tokens if lineage.family == "dense" else lineage.d1,
              "d2_tokens": 0 if lineage.family == "dense" else end_tokens,
              "experts": lineage.experts, "top_k": lineage.top_k, "granularity": lineage.granularity}
    export_out = None
    if lineage.family == "dense" and metrics_out is not None:
        export_out = sweep.dense_export_dir(cfg, lineage.size, lineage.seed, end_tokens)
    return TrainJob(
        run_id=f"{lineage.name}/{job_name}", model=model, moe=moe_options_from(cfg),
        tokens_dir=sweep.tokens_dir(cfg), checkpoint_dir=sweep.checkpoint_dir(cfg, lineage, job_name),
        end_tokens=end_tokens, schedule=schedule, seed=lineage.seed, training=training,
        resume_from=resume_from, init_weights=init_weights, state_out=state_out, metrics_out=metrics_out,
        export_out=export_out, coords=coords, dense_counts=count_params(dense_model),
        export_adam_moments=export_out is not None and cfg["moe"]["copy_optimizer_state"],
    )


def cmd_train(args) -> int:
    if (args.stable is None) == (args.budget is None):
        raise SystemExit("give exactly one of --stable POINT (a WSD stable job) or --budget D (a run's final job)")
    if args.family == "upcycled" and args.d1 is None:
        raise SystemExit("--family upcycled needs --d1 (the dense budget it was upcycled from)")
    from .launch import apply_slurm_env

    apply_slurm_env()  # under srun: RANK/WORLD_SIZE/... from the Slurm environment
    cfg = _load(args)
    os.chdir(args.workdir)
    from .train import main_guarded

    return main_guarded(build_train_job(cfg, args))


def cmd_upcycle(args) -> int:
    cfg = _load(args)
    from . import sweep
    from .config import ConfigError
    from .export import load_adam_moments, load_hf, save_hf
    from .upcycle import upcycle_adam_moments, upcycle_state

    dense_dir = Path(args.dense) if args.dense else sweep.dense_export_dir(cfg, args.size, args.seed, args.d1)
    dense_state, dense_cfg, _ = load_hf(dense_dir)
    moe_state, moe_cfg = upcycle_state(dense_state, dense_cfg, args.experts, args.top_k, args.granularity,
                                       router_init_std=cfg["moe"]["router_init_std"], seed=args.seed)
    moments = None
    if cfg["moe"]["copy_optimizer_state"]:
        dense_moments = load_adam_moments(dense_dir)
        if dense_moments is None:
            raise ConfigError(f"config key 'moe.copy_optimizer_state': {dense_dir} holds no Adam moments "
                              "(optimizer.safetensors): rerun the dense stage with this config, or set it to false")
        moments = (*upcycle_adam_moments(dense_moments[0], dense_moments[1], moe_cfg), dense_moments[2])
    lineage = _lineage(argparse.Namespace(**{**vars(args), "family": "upcycled"}))
    out = Path(args.out) if args.out else sweep.upcycled_init_dir(cfg, lineage)
    save_hf(moe_state, moe_cfg, out, extra={"upcycled_from": str(dense_dir)}, adam_moments=moments)
    log.info("upcycled %s -> %s (E=%d, k=%d, G=%d)", dense_dir, out, args.experts, args.top_k, args.granularity)
    return 0


def cmd_aggregate(args) -> int:
    cfg = _load(args)
    from .results import aggregate
    from .sweep import all_metrics
    from .train import code_version

    paths = args.metrics or [str(path) for path in all_metrics(cfg)]
    ds = aggregate(paths, args.out, config_text=Path(args.config).read_text(), code_version=code_version())
    log.info("aggregated %d runs into %s (dims %s)", len(paths), args.out, dict(ds.sizes))
    return 0


def cmd_fit(args) -> int:
    cfg = _load(args)
    from .export import atomic_dir, commit_dir
    from .report import fit_all
    from .results import load_losses

    fits = fit_all(load_losses(args.store), cfg["fit"], out_dir=None, workers=args.workers)
    out_dir = Path(args.out_dir)
    tmp = atomic_dir(out_dir)  # all fits appear together, or none
    for key, fit in fits.items():
        fit.save(tmp / f"{key}.json")
    commit_dir(tmp, out_dir)
    log.info("fit: %d laws fitted, %d skipped -> %s", sum(fit.ok for fit in fits.values()),
             sum(not fit.ok for fit in fits.values()), out_dir)
    return 0


def cmd_report(args) -> int:
    _load(args)
    from .report import load_fits, write_report
    from .results import load_losses

    fits = load_fits(args.fits)
    written = write_report(load_losses(args.store), fits, None, args.out_dir)
    log.info("report: %s", ", ".join(str(path) for path in written.values()))
    return 0


def cmd_predict(args) -> int:
    import json

    from .fitting import to_jsonable
    from .report import load_fits, predict

    if args.top_k > args.experts:
        raise SystemExit(f"--top-k {args.top_k} is more than --experts {args.experts}: routing picks k of E experts")
    fits = load_fits(args.fits)
    if not fits:
        raise SystemExit(f"no fits in {args.fits}: run the pipeline (or `upcycling fit`) first")
    result = predict(fits, args.n1, args.d1, args.d2, args.experts, args.top_k, args.granularity,
                     count_sunk_cost=args.count_sunk_cost)
    print(json.dumps(to_jsonable(result), indent=1))
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="upcycling", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="STAGE")

    p = commands.add_parser("check-config", help="validate a sweep config")
    _add_config(p)
    p.set_defaults(func=cmd_check_config)

    p = commands.add_parser("tokenize", help="the whole tokens stage in one process (every shard)")
    _add_config(p)
    p.add_argument("--out", help="output directory (default: <results_dir>/tokens)")
    p.set_defaults(func=cmd_tokenize)

    p = commands.add_parser("train-tokenizer", help="tokens stage, step 1: tokenizer.json (trained on a sample, or given)")
    _add_config(p)
    p.add_argument("--out", help="tokens directory (default: <results_dir>/tokens)")
    p.set_defaults(func=cmd_train_tokenizer)

    p = commands.add_parser("tokenize-shard", help="tokens stage, step 2: one shard's token memmaps")
    _add_config(p)
    p.add_argument("--shard", required=True, help="which shard, e.g. 00002-of-00004")
    p.add_argument("--out", help="tokens directory (default: <results_dir>/tokens)")
    p.set_defaults(func=cmd_tokenize_shard)

    p = commands.add_parser("tokenize-gather", help="tokens stage, step 3: check the shards, write meta.json")
    _add_config(p)
    p.add_argument("--out", help="tokens directory (default: <results_dir>/tokens)")
    p.set_defaults(func=cmd_tokenize_gather)

    p = commands.add_parser("train", help="one training job of a dense, upcycled or scratch MoE run")
    _add_config(p)
    p.add_argument("--family", choices=["dense", "upcycled", "scratch"], required=True)
    p.add_argument("--size", required=True, help="dense model label (config dense_models)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--d1", type=int, help="upcycled: the dense budget D1 it starts from")
    p.add_argument("--experts", type=int, default=1)
    p.add_argument("--top-k", type=int, default=1)
    p.add_argument("--granularity", type=int, default=1)
    p.add_argument("--stable", type=int, help="WSD: train the stable phase up to this many tokens")
    p.add_argument("--budget", type=int, help="train the run of this budget D to its end (metrics JSON)")
    p.set_defaults(func=cmd_train)

    p = commands.add_parser("upcycle", help="dense checkpoint -> MoE initial checkpoint")
    _add_config(p)
    p.add_argument("--size", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--d1", type=int, required=True)
    p.add_argument("--experts", type=int, required=True)
    p.add_argument("--top-k", type=int, required=True)
    p.add_argument("--granularity", type=int, default=1)
    p.add_argument("--dense", help="HF Llama export to upcycle (default: the pipeline's dense run)")
    p.add_argument("--out", help="output directory (default: the pipeline's layout)")
    p.set_defaults(func=cmd_upcycle)

    p = commands.add_parser("aggregate", help="every metrics JSON -> the zarr results store")
    _add_config(p)
    p.add_argument("--out", required=True, help="the store to write, e.g. results/losses.zarr")
    p.add_argument("metrics", nargs="*", help="metrics JSON files (default: every run of the config)")
    p.set_defaults(func=cmd_aggregate)

    p = commands.add_parser("fit", help="fit the scaling laws to a results store")
    _add_config(p)
    p.add_argument("--store", required=True, help="results store (losses.zarr)")
    p.add_argument("--out-dir", required=True, help="where the fits' JSON files go")
    p.add_argument("--workers", type=int, default=1, help="laws fitted side by side, one process each")
    p.set_defaults(func=cmd_fit)

    p = commands.add_parser("report", help="summary.md and figures from a store and its fits")
    _add_config(p)
    p.add_argument("--store", required=True)
    p.add_argument("--fits", required=True, help="directory of the fits' JSON files")
    p.add_argument("--out-dir", required=True)
    p.set_defaults(func=cmd_report)

    p = commands.add_parser("predict", help="planning: predicted loss, and upcycle or train from scratch")
    p.add_argument("--fits", default="results/fits", help="directory of fitted laws")
    p.add_argument("--n1", type=_positive(float), required=True, help="dense model parameters (e.g. 3.5e8)")
    p.add_argument("--d1", type=_positive(float), required=True, help="dense pretraining tokens")
    p.add_argument("--d2", type=_positive(float), required=True, help="MoE training tokens after upcycling")
    p.add_argument("--experts", type=_positive(int), required=True)
    p.add_argument("--top-k", type=_positive(int), required=True)
    p.add_argument("--granularity", type=_positive(int), default=1)
    p.add_argument("--count-sunk-cost", action="store_true",
                   help="count the dense model's compute against upcycling (default: it exists anyway)")
    p.set_defaults(func=cmd_predict)

    from . import launch, plan

    p = commands.add_parser("plan", help="the admin's view: jobs per rule, resources, GPU-hours")
    plan.add_arguments(p)
    p.set_defaults(func=plan.run)

    p = commands.add_parser("submit", help="submit one training job to Slurm with submitit")
    launch.add_arguments(p)
    p.set_defaults(func=launch.run)

    args = parser.parse_args(argv)
    _setup_logging()
    from .config import ConfigError
    from .corpus import CorpusError
    from .tokens import TokenFilesError

    try:
        return args.func(args)
    except (ConfigError, CorpusError, TokenFilesError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
