"""Load and check a sweep config: the JSON schema first, then what a schema cannot say.

Public: ``load_sweep(path)``, ``sweep_from_mapping(mapping, base_dir)`` (both return the typed,
frozen :class:`upcycling.sweep.settings.Sweep`), ``checked_corpora(sweep, base_dir)`` (the corpus checks
alone, returning the files found), ``ConfigError``, ``SCHEMA_PATH``. Every error names the
offending key and how to fix it, and is raised when the DAG is built (the Snakefile calls
``sweep_from_mapping``, then ``checked_corpora``), before any expensive work.

One validator serves the Snakefile and the CLI alike: jsonschema's Draft 2020-12 extended to fill
the schema's defaults (the defaults live only in the schema). It is ours rather than
``snakemake.utils.validate`` because that one stops at the first error with a generic message and
hands the same default object to every config that lacks the key; this one lists up to five
errors, each with its key path and a hint, and copies every default.
"""

from __future__ import annotations

import copy
import json
import math
import os
from importlib.resources import files
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from upcycling.core.errors import InputError
from upcycling.sweep.models import model_config, options_for, token_sets
from upcycling.sweep.settings import Sweep
from upcycling.transform.methods import reinit_suffix, target_config

SCHEMA_PATH = Path(str(files("upcycling") / "schemas" / "config.schema.yaml"))
# Byte-level BPE on English prose gives ~4 bytes per token; 3 keeps the corpus-size check on the
# safe side (it may only let through a D that the exact check at training time then refuses).
BYTES_PER_TOKEN_ESTIMATE = 3.0


class ConfigError(InputError):
    """A config value that cannot work; the message names the key and the fix."""


def _schema() -> dict:
    return yaml.safe_load(SCHEMA_PATH.read_text())


def _with_defaults(validator_class):
    """A validator that also fills in schema defaults (a fresh copy of each)."""
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, subschema in properties.items():
                if "default" in subschema and name not in instance:
                    instance[name] = copy.deepcopy(subschema["default"])
        yield from validate_properties(validator, properties, instance, schema)

    # A YAML float is no integer, even 64.0 (JSON Schema itself lets 64.0 pass, and it would reach
    # the model as a float); nor is a boolean.
    strict_types = validator_class.TYPE_CHECKER.redefine(
        "integer", lambda checker, instance: isinstance(instance, int) and not isinstance(instance, bool)
    )
    return jsonschema.validators.extend(validator_class, {"properties": set_defaults}, type_checker=strict_types)


# What to write instead, for keys whose schema message alone does not say it.
_KEY_HINTS = {
    "sweep.reinit_ratio": (
        " (sweep.reinit_ratio is a list of distinct numbers between 0 and 1, e.g. [0, 0.5]: "
        "the fraction of each expert's FFN units re-drawn; 0 is plain sparse upcycling)"
    ),
}


def _schema_error_message(error: jsonschema.ValidationError) -> str:
    key = ".".join(str(part) for part in error.absolute_path) or "<top level>"
    hint = ""
    if error.validator == "additionalProperties":
        hint = " (a misspelt key? see src/upcycling/schemas/config.schema.yaml for the allowed keys)"
    hint += next((text for prefix, text in _KEY_HINTS.items() if key.startswith(prefix)), "")
    wanted = error.validator_value if isinstance(error.validator_value, (str, list)) else ()
    if error.validator == "type" and isinstance(error.instance, float) and "integer" in wanted:
        whole = f"write {int(error.instance)}" if error.instance.is_integer() else "give a whole number"
        hint += f" ({whole}: an integer key takes no decimal point or exponent)"
    return f"config key '{key}': {error.message}{hint}"


def load_sweep(path: str | os.PathLike, base_dir: str | os.PathLike | None = None, check_corpus: bool = True) -> Sweep:
    """Read a YAML config and run every check. base_dir: where relative corpus paths start
    (default: the working directory). ``check_corpus=False``: every check but those needing the
    corpus on disk (a paper-scale sweep can be planned where its corpus is not)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist: pass --config with a YAML sweep config")
    try:
        mapping = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    return sweep_from_mapping(mapping, base_dir if base_dir is not None else Path.cwd(), check_corpus)


def sweep_from_mapping(mapping: Any, base_dir: str | os.PathLike = ".", check_corpus: bool = True) -> Sweep:
    """Validate a config mapping (a copy: the argument is left as it is), fill the schema's
    defaults, check the semantics, and return the typed sweep; ConfigError naming key and fix."""
    if not isinstance(mapping, dict):
        raise ConfigError("the config must be a YAML mapping of sections (corpus, tokenizer, data, ...)")
    schema = _schema()
    mapping = _coerce_strings(copy.deepcopy(mapping), schema, schema)
    validator = _with_defaults(jsonschema.Draft202012Validator)(schema)
    errors = sorted(validator.iter_errors(mapping), key=lambda e: list(e.absolute_path))
    if errors:
        raise ConfigError("; ".join(_schema_error_message(e) for e in errors[:5]))
    moe = mapping["moe"]
    if moe["dispatch"] is None:  # what null means, written out: every MoE job's spec names the dispatch it runs
        moe["dispatch"] = "gshard" if moe["drop_tokens"] else "grouped"
    sweep = Sweep.from_mapping(mapping)
    _check_semantics(sweep)
    if check_corpus:
        checked_corpora(sweep, base_dir)
    return sweep


def _coerce_strings(value, subschema: dict, schema: dict):
    """Strings where the schema wants numbers, booleans or lists, read as YAML: Snakemake hands
    nested ``--config section={key: value}`` overrides over as strings."""
    if "$ref" in subschema:
        subschema = schema["definitions"][subschema["$ref"].rsplit("/", 1)[1]]
    types = subschema.get("type", [])
    types = {types} if isinstance(types, str) else set(types)
    if isinstance(value, str) and types & {"number", "integer", "boolean", "array", "null"} and "string" not in types:
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            return value
    if isinstance(value, dict):
        properties = subschema.get("properties", {})
        extra = subschema.get("additionalProperties")
        return {
            key: _coerce_strings(item, properties.get(key, extra if isinstance(extra, dict) else {}), schema)
            for key, item in value.items()
        }
    if isinstance(value, list) and isinstance(subschema.get("items"), dict):
        return [_coerce_strings(item, subschema["items"], schema) for item in value]
    return value


def _strictly_increasing(values, key: str) -> None:
    for earlier, later in zip(values, values[1:]):
        if later <= earlier:
            raise ConfigError(
                f"config key '{key}': values must be strictly increasing, got {list(values)}: "
                "sort them and drop duplicates"
            )


def _token_budgets(sweep: Sweep) -> dict[str, tuple[int, ...]]:
    budgets = {"sweep.d1_tokens": sweep.sweep.d1_tokens, "sweep.d2_tokens": sweep.sweep.d2_tokens}
    if sweep.baselines.scratch_moe and sweep.baselines.scratch_d_tokens:
        budgets["baselines.scratch_d_tokens"] = sweep.baselines.scratch_d_tokens
    if sweep.sweep.model_config is not None:
        budgets["sweep.model_config.d2_tokens"] = (sweep.sweep.model_config.d2_tokens,)
    return budgets


def _check_moe_shape(experts: int, top_k: int, granularity: int, ep_size: int, key: str) -> None:
    if top_k > experts:
        raise ConfigError(
            f"config key '{key}.top_k': k={top_k} exceeds E={experts} ({key}.experts): top-k routing needs k <= E"
        )
    if experts % granularity:
        raise ConfigError(
            f"config key '{key}.experts': E={experts} is not a multiple of granularity "
            f"G={granularity}: granular upcycling makes E = G x expansion experts"
        )
    if granularity > 1 and top_k % granularity:
        raise ConfigError(
            f"config key '{key}.top_k': k={top_k} is not a multiple of granularity G={granularity}: "
            "with granular upcycling a token must reach all G slices of a dense FFN, so k = G x k'"
        )
    if experts % ep_size:
        raise ConfigError(
            f"config key 'moe.ep_size': {ep_size} does not divide E={experts} ({key}.experts): "
            "choose an expert-parallel size that divides every expert count of the sweep"
        )


def _check_semantics(sweep: Sweep) -> None:
    axes, training, moe, seq_len = sweep.sweep, sweep.training, sweep.moe, sweep.data.seq_len
    if moe.dispatch == "grouped" and moe.drop_tokens:
        raise ConfigError(
            "config keys 'moe.dispatch' / 'moe.drop_tokens': the grouped dispatch never drops tokens: set "
            "moe.drop_tokens: false, or moe.dispatch: gshard for GShard's capacity limit"
        )

    budgets = _token_budgets(sweep)
    for key, values in budgets.items():
        _strictly_increasing(values, key)
        if values[0] < seq_len:
            raise ConfigError(
                f"config key '{key}': {values[0]} tokens is less than one sequence (data.seq_len={seq_len}): "
                "raise the token budget or lower data.seq_len"
            )

    for label, dims in sweep.dense_models.items():
        key = f"dense_models.{label}"
        if dims.d_model % dims.n_heads:
            raise ConfigError(
                f"config key '{key}.n_heads': {dims.n_heads} heads do not divide d_model={dims.d_model}: "
                "pick n_heads that divides d_model"
            )
        if (dims.d_model // dims.n_heads) % 2:
            raise ConfigError(
                f"config key '{key}.n_heads': head size d_model/n_heads={dims.d_model // dims.n_heads} "
                "is odd, and rotary embeddings need an even head size: change n_heads or d_model"
            )
        for granularity in axes.granularity:
            if dims.ffn_hidden % granularity:
                raise ConfigError(
                    f"config key 'sweep.granularity': G={granularity} does not divide "
                    f"{key}.ffn_hidden={dims.ffn_hidden}: each expert is an equal slice of the dense FFN"
                )

    for experts in axes.experts:
        for top_k in axes.top_k:
            for granularity in axes.granularity:
                _check_moe_shape(experts, top_k, granularity, moe.ep_size, "sweep")
    if any(math.isnan(ratio) for ratio in axes.reinit_ratio):  # NaN passes the schema's bounds
        raise ConfigError(
            f"config key 'sweep.reinit_ratio': {list(axes.reinit_ratio)} holds NaN: give numbers between 0 and 1"
        )
    if len({reinit_suffix(ratio) for ratio in axes.reinit_ratio}) != len(axes.reinit_ratio):
        raise ConfigError(
            f"config key 'sweep.reinit_ratio': {list(axes.reinit_ratio)} has values that agree to 6 significant "
            "digits, and the variant labels in the output paths would collide: keep one of them"
        )
    if any(ratio > 0 for ratio in axes.reinit_ratio) and "moe_upcycle" not in sweep.stage2.methods:
        raise ConfigError(
            f"config key 'sweep.reinit_ratio': {list(axes.reinit_ratio)} re-initialises upcycled experts, but "
            "stage2.methods has no moe_upcycle: add moe_upcycle to stage2.methods or set sweep.reinit_ratio: [0]"
        )
    if axes.model_config is not None:
        extra = axes.model_config
        if extra.d1_tokens not in axes.d1_tokens:
            raise ConfigError(
                f"config key 'sweep.model_config.d1_tokens': {extra.d1_tokens} is not one of sweep.d1_tokens "
                f"{list(axes.d1_tokens)}: the extra MoEs are upcycled from a dense checkpoint the sweep trains"
            )
        if extra.d2_tokens not in axes.d2_tokens:
            raise ConfigError(
                f"config key 'sweep.model_config.d2_tokens': {extra.d2_tokens} is not one of sweep.d2_tokens "
                f"{list(axes.d2_tokens)}: the law compares these MoEs with the sweep's own at that (D1, D2)"
            )
        for experts in extra.experts:
            for top_k in extra.top_k:
                _check_moe_shape(experts, top_k, 1, moe.ep_size, "sweep.model_config")

    if moe.copy_optimizer_state and (training.zero_stage != 0 or training.precision == "bf16"):
        raise ConfigError(
            "config key 'moe.copy_optimizer_state': copying the dense Adam moments needs training.zero_stage 0 "
            "and fp32 training (ZeRO and the bf16 optimizer keep them flattened): set zero_stage: 0 and "
            "precision: fp32, or copy_optimizer_state: false"
        )

    if training.wsd:
        shortest = min(min(values) for values in budgets.values())
        stable_tokens = training.decay_start(shortest)
        if training.warmup_tokens >= stable_tokens:
            raise ConfigError(
                f"config key 'training.warmup_tokens': {training.warmup_tokens} tokens of warmup do not fit "
                f"before the decay of the shortest run ({shortest} tokens, decay from {stable_tokens}): "
                "lower warmup_tokens or raise the smallest D"
            )

    slurm = sweep.slurm
    if slurm.nodes > 1 and slurm.gpus_per_job % slurm.nodes:
        raise ConfigError(
            f"config key 'slurm.gpus_per_job': {slurm.gpus_per_job} GPUs do not split evenly over "
            f"slurm.nodes={slurm.nodes}: give a multiple of the node count (one training process per GPU, "
            "the same on every node)"
        )
    if slurm.throughput_tokens_per_s is not None:
        missing = sorted(set(sweep.dense_models) - set(slurm.throughput_tokens_per_s))
        if missing:
            raise ConfigError(
                f"config key 'slurm.throughput_tokens_per_s': no throughput for dense model(s) {missing}: "
                "add one per size (tokens/s of one GPU, from benchmarks/bench_train.py)"
            )

    if len(set(training.seeds)) != len(training.seeds):
        raise ConfigError("config key 'training.seeds': seeds repeat: list each seed once")

    growth = stage2_problem(sweep)
    if growth is not None:
        raise ConfigError(growth)


def resolve_corpus_paths(patterns, base_dir: Path, key: str = "corpus") -> list:
    """The corpus files (upcycling.data.corpus.Source) the patterns of ``{key}.paths`` name; ConfigError
    if one matches nothing or names a file or directory the tokens stage cannot read."""
    from upcycling.data.corpus import CorpusError, resolve_sources

    try:
        return resolve_sources(patterns, base_dir)
    except CorpusError as exc:
        raise ConfigError(f"config key '{key}.paths': {str(exc).removeprefix('corpus.paths: ')}") from None


def checked_corpora(sweep: Sweep, base_dir: str | os.PathLike) -> dict[str, list]:
    """The checks that need the corpus on disk (the last of ``sweep_from_mapping``'s). Returns each
    token set's corpus files (upcycling.data.corpus.Source) for ``upcycling.pipeline.jobs.Inventory``, which then
    need not find them again."""
    base_dir = Path(base_dir)
    tokenizer_path = sweep.tokenizer.path
    if tokenizer_path:
        full = Path(tokenizer_path) if os.path.isabs(tokenizer_path) else base_dir / tokenizer_path
        if not full.is_file():
            raise ConfigError(
                f"config key 'tokenizer.path': {tokenizer_path} does not exist: give a tokenizer.json "
                "or set path to null to train one"
            )
    corpora = {"tokens": _check_one_corpus(sweep, base_dir, "corpus", sweep.corpus, "tokens", _token_budgets(sweep))}
    if "tokens_stage2" in token_sets(sweep):
        corpora["tokens_stage2"] = _check_one_corpus(
            sweep,
            base_dir,
            "stage2.corpus",
            sweep.stage2.corpus,
            "tokens_stage2",
            {"sweep.d2_tokens": sweep.sweep.d2_tokens},
        )
    return corpora


def _check_one_corpus(sweep: Sweep, base_dir: Path, key: str, corpus, tokens: str, budgets: dict) -> list:
    """The corpus's files exist, can be sharded so, and hold the tokens its runs train on; returns them."""
    from upcycling.data.corpus import estimated_text_bytes

    files_found = resolve_corpus_paths(corpus.paths, base_dir, key)
    if corpus.shards > len(files_found):
        raise ConfigError(
            f"config key '{key}.shards': {corpus.shards} shards, but {key}.paths names {len(files_found)} "
            f"files and a shard is whole files: lower {key}.shards to at most {len(files_found)}"
        )
    # Exact token count once the tokens exist; before that, an estimate from the corpus size.
    results = sweep.results_dir if sweep.results_dir.is_absolute() else base_dir / sweep.results_dir
    meta_path = results / tokens / "meta.json"
    if meta_path.is_file():
        train_tokens = json.loads(meta_path.read_text())["train_tokens"]
        how = f"{train_tokens} training tokens in {meta_path}"
    else:
        corpus_bytes = sum(estimated_text_bytes(source) for source in files_found)
        train_tokens = int(corpus_bytes * (1 - corpus.val_fraction) / BYTES_PER_TOKEN_ESTIMATE)
        how = f"about {train_tokens} training tokens estimated from {corpus_bytes} bytes of {key}"
    budget = int(train_tokens * sweep.data.max_epochs)
    for budget_key, values in budgets.items():
        if max(values) > budget:
            raise ConfigError(
                f"config key '{budget_key}': {max(values)} tokens exceed what "
                f"{'the corpus' if key == 'corpus' else key} supplies within "
                f"data.max_epochs={sweep.data.max_epochs} ({how}, so at most {budget}): "
                f"add text to {key}.paths, raise data.max_epochs, or lower the token budget"
            )
    return files_found


def stage2_problem(sweep: Sweep) -> str | None:
    """Why a growth in ``stage2.methods`` does not fit a dense model of the sweep (a factor giving
    fractional units, heads that transformers cannot load), or None; moe_upcycle is left to the
    sweep's E/k/G checks."""
    options = options_for(sweep)
    for label in sweep.dense_models:
        dense = model_config(sweep, label, vocab_size=1)
        for method in sweep.stage2.methods:
            if method == "moe_upcycle":
                continue
            try:
                target_config(dense, method, options)
            except ValueError as exc:
                return f"stage2 method {method} on dense model '{label}': {exc}"
    return None
