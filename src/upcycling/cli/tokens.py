"""The tokens stage's commands: tokenize (whole), train-tokenizer, tokenize-shard, tokenize-gather."""

from __future__ import annotations

from pathlib import Path

from upcycling.cli.common import job_spec, log, results_root
from upcycling.core.errors import InputError


def _corpus(args, spec: dict):
    """The corpus files a tokens job reads (labels relative to --workdir) and the corpus options."""
    from upcycling.data.corpus import CorpusOptions, check_unchanged, resolve_sources

    sources = resolve_sources(spec["files"], args.workdir)
    check_unchanged(sources, spec.get("sizes"))  # the sizes the plan split the corpus by
    return sources, CorpusOptions.from_config(spec["corpus"])


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

    spec = job_spec(args, "train_tokenizer")
    sources, options = _corpus(args, spec)
    out = results_root(args) / spec["out"]
    make_tokenizer(sources, options, spec["tokenizer"], out, base_dir=args.workdir)
    return 0


def cmd_tokenize_shard(args) -> int:
    from upcycling.data.tokenize import tokenize_shard

    spec = job_spec(args, "tokenize_shard", {"tokens": args.tokens, "shard": args.shard})
    sources, options = _corpus(args, spec)
    results = results_root(args)
    tokenizer_file, out = results / spec["tokenizer_file"], results / spec["out"]
    tokenize_shard(sources, options, tokenizer_file, out, spec["index"], spec["count"], spec["eot_token"])
    return 0


def cmd_tokenize_gather(args) -> int:
    from upcycling.data.corpus import CorpusOptions
    from upcycling.data.tokenize import gather_shards

    spec = job_spec(args, "tokenize", {"tokens": args.tokens})
    results = results_root(args)
    options = CorpusOptions.from_config(spec["corpus"])
    gather_shards(results / spec["tokens_dir"], spec["plan"], options, results / spec["tokenizer_file"])
    return 0
