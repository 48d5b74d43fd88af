"""Load and check a sweep config: the JSON schema first, then what a schema cannot say.

Public: ``load_config(path)``, ``validate_config(cfg, base_dir)``, ``ConfigError``,
``config_sha256(cfg)``. Every error names the offending key and how to fix it, and is raised at
DAG build (the Snakefile calls ``validate_config``), before any expensive work.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import jsonschema
import yaml

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "config.schema.yaml"
# Byte-level BPE on English prose gives ~4 bytes per token; 3 keeps the corpus-size check on the
# safe side (it may only let through a D that the exact check at training time then refuses).
BYTES_PER_TOKEN_ESTIMATE = 3.0


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key and the fix."""


def _schema() -> dict:
    with open(SCHEMA_PATH) as fh:
        return yaml.safe_load(fh)


def _with_defaults(validator_class):
    """A validator that also fills in schema defaults, as snakemake.utils.validate does."""
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, subschema in properties.items():
                if "default" in subschema and name not in instance:
                    instance[name] = json.loads(json.dumps(subschema["default"]))
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


def _schema_error_message(error: jsonschema.ValidationError) -> str:
    key = ".".join(str(part) for part in error.absolute_path) or "<top level>"
    hint = ""
    if error.validator == "additionalProperties":
        hint = " (a misspelt key? see workflow/schemas/config.schema.yaml for the allowed keys)"
    return f"config key '{key}': {error.message}{hint}"


def load_config(
    path: str | os.PathLike, base_dir: str | os.PathLike | None = None, check_corpus: bool = True
) -> dict:
    """Read a YAML config, fill defaults, and run every check. base_dir: where relative paths start.

    ``check_corpus=False``: every check but those needing the corpus on disk (for planning)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist: pass --config with a YAML sweep config")
    try:
        cfg = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    return validate_config(cfg, base_dir if base_dir is not None else Path.cwd(), check_corpus=check_corpus)


def write_config(cfg: dict, path: str | os.PathLike) -> Path:
    """Write a (validated) config as YAML, atomically, and only when its content changed.

    The Snakefile writes the sweep it built the DAG from (after any ``--config KEY=VALUE``
    overrides) and hands that file to every job, so jobs see exactly the DAG's config; leaving an
    unchanged file alone keeps concurrent jobs that parse the Snakefile from racing on it."""
    path = Path(path)
    text = yaml.safe_dump(cfg, sort_keys=False)
    if not (path.is_file() and path.read_text() == text):
        write_text_atomic(path, text)
    return path


def write_text_atomic(path: Path, text: str) -> None:
    """Write under a temporary name, then rename: readers see the old file or the new, whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def validate_config(
    cfg: Any, base_dir: str | os.PathLike = ".", check_schema: bool = True, check_corpus: bool = True
) -> dict:
    """Validate in place (filling defaults); raise ConfigError naming the key and the fix.

    ``check_corpus=False`` skips the checks that need the corpus and tokenizer files on disk, so a
    paper-scale sweep can be planned on a machine that does not hold its corpus."""
    if not isinstance(cfg, dict):
        raise ConfigError("the config must be a YAML mapping of sections (corpus, tokenizer, data, ...)")
    if check_schema:
        validator = _with_defaults(jsonschema.Draft202012Validator)(_schema())
        errors = sorted(validator.iter_errors(cfg), key=lambda e: list(e.absolute_path))
        if errors:
            raise ConfigError("; ".join(_schema_error_message(e) for e in errors[:5]))
    _check_semantics(cfg, Path(base_dir), check_corpus)
    return cfg


def _strictly_increasing(values: list[int], key: str) -> None:
    for earlier, later in zip(values, values[1:]):
        if later <= earlier:
            raise ConfigError(
                f"config key '{key}': values must be strictly increasing, got {values}: "
                "sort them and drop duplicates"
            )


def _check_semantics(cfg: dict, base_dir: Path, check_corpus: bool) -> None:
    sweep, training, moe, data = cfg["sweep"], cfg["training"], cfg["moe"], cfg["data"]
    seq_len = data["seq_len"]

    token_keys = {"sweep.d1_tokens": sweep["d1_tokens"], "sweep.d2_tokens": sweep["d2_tokens"]}
    if cfg["baselines"].get("scratch_moe") and "scratch_d_tokens" in cfg["baselines"]:
        token_keys["baselines.scratch_d_tokens"] = cfg["baselines"]["scratch_d_tokens"]
    for key, values in token_keys.items():
        _strictly_increasing(values, key)
        if values[0] < seq_len:
            raise ConfigError(
                f"config key '{key}': {values[0]} tokens is less than one sequence (data.seq_len={seq_len}): "
                "raise the token budget or lower data.seq_len"
            )

    for label, dims in cfg["dense_models"].items():
        key = f"dense_models.{label}"
        if dims["d_model"] % dims["n_heads"]:
            raise ConfigError(
                f"config key '{key}.n_heads': {dims['n_heads']} heads do not divide d_model={dims['d_model']}: "
                "pick n_heads that divides d_model"
            )
        if (dims["d_model"] // dims["n_heads"]) % 2:
            raise ConfigError(
                f"config key '{key}.n_heads': head size d_model/n_heads={dims['d_model'] // dims['n_heads']} "
                "is odd, and rotary embeddings need an even head size: change n_heads or d_model"
            )
        for granularity in sweep["granularity"]:
            if dims["ffn_hidden"] % granularity:
                raise ConfigError(
                    f"config key 'sweep.granularity': G={granularity} does not divide "
                    f"{key}.ffn_hidden={dims['ffn_hidden']}: each expert is an equal slice of the dense FFN"
                )

    for experts in sweep["experts"]:
        for top_k in sweep["top_k"]:
            if top_k > experts:
                raise ConfigError(
                    f"config key 'sweep.top_k': k={top_k} exceeds E={experts} (sweep.experts): "
                    "top-k routing needs k <= E"
                )
        for granularity in sweep["granularity"]:
            if experts % granularity:
                raise ConfigError(
                    f"config key 'sweep.experts': E={experts} is not a multiple of granularity G={granularity}: "
                    "granular upcycling makes E = G x expansion experts"
                )
        if experts % moe["ep_size"]:
            raise ConfigError(
                f"config key 'moe.ep_size': {moe['ep_size']} does not divide E={experts}: "
                "choose an expert-parallel size that divides every value of sweep.experts"
            )
    for granularity in sweep["granularity"]:
        for top_k in sweep["top_k"]:
            if granularity > 1 and top_k % granularity:
                raise ConfigError(
                    f"config key 'sweep.top_k': k={top_k} is not a multiple of granularity G={granularity}: "
                    "with granular upcycling a token must reach all G slices of a dense FFN, so k = G x k'"
                )

    if moe["copy_optimizer_state"] and (training["zero_stage"] != 0 or training["precision"] == "bf16"):
        raise ConfigError(
            "config key 'moe.copy_optimizer_state': copying the dense Adam moments needs training.zero_stage 0 "
            "and fp32 training (ZeRO and the bf16 optimizer keep them flattened): set zero_stage: 0 and "
            "precision: fp32, or copy_optimizer_state: false"
        )

    if training["schedule"] == "wsd":
        shortest = min(min(values) for values in token_keys.values())
        stable_tokens = int(shortest * (1 - training["decay_fraction"]))
        if training["warmup_tokens"] >= stable_tokens:
            raise ConfigError(
                f"config key 'training.warmup_tokens': {training['warmup_tokens']} tokens of warmup do not fit "
                f"before the decay of the shortest run ({shortest} tokens, decay from {stable_tokens}): "
                "lower warmup_tokens or raise the smallest D"
            )

    slurm = cfg.get("slurm", {})
    gpus, nodes = slurm.get("gpus_per_job", 1), slurm.get("nodes", 1)
    if nodes > 1 and gpus % nodes:
        raise ConfigError(
            f"config key 'slurm.gpus_per_job': {gpus} GPUs do not split evenly over slurm.nodes={nodes}: "
            "give a multiple of the node count (one training process per GPU, the same on every node)"
        )
    throughput = slurm.get("throughput_tokens_per_s")
    if throughput is not None:
        missing = sorted(set(cfg["dense_models"]) - set(throughput))
        if missing:
            raise ConfigError(
                f"config key 'slurm.throughput_tokens_per_s': no throughput for dense model(s) {missing}: "
                "add one per size (tokens/s of one GPU, from benchmarks/bench_train.py)"
            )

    if len(set(training["seeds"])) != len(training["seeds"]):
        raise ConfigError("config key 'training.seeds': seeds repeat: list each seed once")

    if check_corpus:
        _check_corpus(cfg, base_dir)


def resolve_corpus_paths(patterns: list[str], base_dir: Path) -> list:
    """The corpus files (upcycling.corpus.Source) the patterns name; ConfigError if one matches
    nothing or names a file or directory the tokens stage cannot read."""
    from .corpus import CorpusError, resolve_sources

    try:
        return resolve_sources(patterns, base_dir)
    except CorpusError as exc:
        raise ConfigError(f"config key 'corpus.paths': {str(exc).removeprefix('corpus.paths: ')}") from None


def estimated_text_bytes(source) -> int:
    """Bytes of text in a corpus file (upcycling.corpus.Source), cheaply estimated."""
    from .corpus import estimated_text_bytes as estimate

    return estimate(source)


def _check_corpus(cfg: dict, base_dir: Path) -> None:
    corpus, data = cfg["corpus"], cfg["data"]
    files = resolve_corpus_paths(corpus["paths"], base_dir)
    if corpus.get("shards", 1) > len(files):
        raise ConfigError(
            f"config key 'corpus.shards': {corpus.get('shards', 1)} shards, but corpus.paths names {len(files)} "
            f"files and a shard is whole files: lower corpus.shards to at most {len(files)}"
        )
    tokenizer_path = cfg["tokenizer"].get("path")
    if tokenizer_path:
        full = Path(tokenizer_path) if os.path.isabs(tokenizer_path) else base_dir / tokenizer_path
        if not full.is_file():
            raise ConfigError(
                f"config key 'tokenizer.path': {tokenizer_path} does not exist: give a tokenizer.json "
                "or set path to null to train one"
            )

    # Exact token count once the tokens exist; before that, an estimate from the corpus size.
    meta_path = Path(cfg.get("results_dir", "results"))
    meta_path = (meta_path if meta_path.is_absolute() else base_dir / meta_path) / "tokens" / "meta.json"
    if meta_path.is_file():
        train_tokens = json.loads(meta_path.read_text())["train_tokens"]
        how = f"{train_tokens} training tokens in {meta_path}"
    else:
        corpus_bytes = sum(estimated_text_bytes(source) for source in files)
        train_tokens = int(corpus_bytes * (1 - corpus["val_fraction"]) / BYTES_PER_TOKEN_ESTIMATE)
        how = f"about {train_tokens} training tokens estimated from {corpus_bytes} bytes of corpus"
    budget = int(train_tokens * data["max_epochs"])
    runs = {"sweep.d1_tokens": cfg["sweep"]["d1_tokens"], "sweep.d2_tokens": cfg["sweep"]["d2_tokens"]}
    if cfg["baselines"].get("scratch_moe") and "scratch_d_tokens" in cfg["baselines"]:
        runs["baselines.scratch_d_tokens"] = cfg["baselines"]["scratch_d_tokens"]
    for key, values in runs.items():
        if max(values) > budget:
            raise ConfigError(
                f"config key '{key}': {max(values)} tokens exceed what the corpus supplies within "
                f"data.max_epochs={data['max_epochs']} ({how}, so at most {budget}): "
                "add text to corpus.paths, raise data.max_epochs, or lower the token budget"
            )


def config_sha256(cfg: dict) -> str:
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()

